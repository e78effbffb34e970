"""Config handling of the zoo families with remote-code formats: values a spec cannot reproduce
are refused with the key named; unit conversions go both ways. No torch computation."""

import pytest

from megatron_patch.convert import engine
from megatron_patch.models import family_for
from megatron_patch.models.weight_rules import bind

QWEN1 = {"architectures": ["QWenLMHeadModel"], "num_hidden_layers": 2, "hidden_size": 64,
         "intermediate_size": 192, "num_attention_heads": 4, "kv_channels": 16,
         "vocab_size": 1000, "seq_length": 256, "no_bias": True}
CHATGLM = {"architectures": ["ChatGLMModel"], "num_layers": 2, "hidden_size": 64,
           "ffn_hidden_size": 96, "num_attention_heads": 4, "kv_channels": 16,
           "padded_vocab_size": 1000, "multi_query_attention": True, "multi_query_group_num": 2,
           "add_qkv_bias": True, "rmsnorm": True, "rope_ratio": 50}
BAICHUAN2 = {"architectures": ["BaichuanForCausalLM"], "num_hidden_layers": 2,
             "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
             "vocab_size": 125696, "hidden_act": "silu", "z_loss_weight": 0}
STARCODER2 = {"architectures": ["Starcoder2ForCausalLM"], "num_hidden_layers": 2,
              "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1000, "hidden_act": "gelu_pytorch_tanh",
              "embedding_dropout": 0.1, "residual_dropout": 0.1}


def test_qwen1_intermediate_size_is_twice_the_mlp_width():
    family = family_for(QWEN1)
    args = family.model_args(QWEN1)
    assert args.ffn_hidden_size == 96 and args.add_qkv_bias and args.num_query_groups == 4
    assert family.hf_config_updates(args)["intermediate_size"] == 192


def test_released_baichuan2_7b_config_is_rope_with_norm_head():
    args = family_for(BAICHUAN2).model_args(BAICHUAN2)
    assert args.norm_head and args.position_embedding_type == "rope"
    assert not family_for({**BAICHUAN2, "vocab_size": 64000}).model_args(
        {**BAICHUAN2, "vocab_size": 64000}).norm_head


def test_released_baichuan2_13b_config_is_alibi_with_norm_head():
    # Baichuan2-13B's config states neither: hidden 5120 (not 4096) means ALiBi, vocab 125696
    # means Baichuan2 (NormHead); Baichuan-13B (vocab 64000) has no NormHead.
    cfg = {**BAICHUAN2, "hidden_size": 5120, "num_attention_heads": 40,
           "intermediate_size": 13696, "model_max_length": 4096}
    args = family_for(cfg).model_args(cfg)
    assert args.norm_head and args.position_embedding_type == "alibi"
    v1 = {**cfg, "vocab_size": 64000}
    assert not family_for(v1).model_args(v1).norm_head


def test_chatglm_rope_ratio_scales_the_base():
    family = family_for(CHATGLM)
    args = family.model_args(CHATGLM)
    assert (args.rotary_percent, args.rotary_interleaved, args.num_query_groups) == (0.5, True, 2)
    assert family.rope_parameters(CHATGLM)["rope_theta"] == 500000.0


@pytest.mark.parametrize("config, key", [
    ({**QWEN1, "no_bias": False}, "no_bias"),
    ({**QWEN1, "emb_dropout_prob": 0.1}, "emb_dropout_prob"),
    ({**CHATGLM, "apply_residual_connection_post_layernorm": True},
     "apply_residual_connection_post_layernorm"),
    ({**CHATGLM, "rmsnorm": False}, "rmsnorm"),
    ({**CHATGLM, "pre_seq_len": 128}, "pre_seq_len"),
    ({k: v for k, v in CHATGLM.items() if k != "multi_query_attention"}, "multi_query_attention"),
    ({**BAICHUAN2, "z_loss_weight": 1e-4}, "z_loss_weight"),
    ({**BAICHUAN2, "tie_word_embeddings": True}, "tie_word_embeddings"),
    ({**STARCODER2, "embedding_dropout": 0.0}, "embedding_dropout"),
    ({**STARCODER2, "hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_values_are_refused_naming_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        family_for(config).model_args(config)


def test_chatglm_cached_rotary_frequencies_are_ignored():
    family = family_for(CHATGLM)
    bindings = bind(family.weights, CHATGLM, 2)
    hf = [n for b in bindings for n in b.hf]
    engine.check_names(bindings, source=hf + ["transformer.rotary_pos_emb.inv_freq"],
                       target=[b.megatron for b in bindings], direction="hf->megatron",
                       ignore=family.hf_ignore)
    assert "transformer.encoder.layers.1.self_attention.query_key_value.bias" in hf
