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


# Released Gemma 2 (transformers 4.x keys: no layer_types) and Gemma 3 1B configs, shrunk.
GEMMA2 = {"architectures": ["Gemma2ForCausalLM"], "num_hidden_layers": 4, "hidden_size": 64,
          "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 32, "vocab_size": 1000, "hidden_act": "gelu_pytorch_tanh",
          "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 24,
          "sliding_window": 4096, "attn_logit_softcapping": 50.0,
          "final_logit_softcapping": 30.0, "rope_theta": 10000.0, "attention_bias": False}
GEMMA3 = {"architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 7, "hidden_size": 64,
          "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 1,
          "head_dim": 32, "vocab_size": 1000, "hidden_activation": "gelu_pytorch_tanh",
          "query_pre_attn_scalar": 32, "sliding_window": 512, "sliding_window_pattern": 6,
          "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
          "final_logit_softcapping": None, "attn_logit_softcapping": None}


def test_gemma2_released_config_alternates_sliding_and_full_layers():
    args = family_for(GEMMA2).model_args(GEMMA2)
    assert args.window_pattern == (1, 0, 1, 0) and args.sliding_window == 4096
    assert (args.attn_logit_softcapping, args.final_logit_softcapping) == (50.0, 30.0)
    assert args.softmax_scale == 24 ** -0.5 and args.kv_channels == 32
    assert args.share_embeddings_and_output_weights and args.activation == "gelu_tanh"
    assert args.zero_centered_norms and args.embedding_scale and args.post_norms


def test_gemma3_4x_config_local_and_global_rope():
    family = family_for(GEMMA3)
    args = family.model_args(GEMMA3)
    assert args.window_pattern == (1, 1, 1, 1, 1, 0, 1) and args.qk_layernorm
    assert args.local_rope_theta == 10000.0 and args.attn_logit_softcapping is None
    assert family.rope_parameters(GEMMA3) == {"rope_theta": 1000000.0, "rope_type": "default"}
    scaled = {**GEMMA3, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    assert family.rope_parameters(scaled)["factor"] == 8.0


@pytest.mark.parametrize("config, key", [
    ({**GEMMA2, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({**GEMMA2, "attention_bias": True}, "attention_bias"),
    ({**GEMMA2, "layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types"),
    ({**GEMMA2, "hidden_activation": "swish"}, "hidden_activation"),
    ({**GEMMA3, "rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                          "rope_theta": 1e4}}},
     "rope_parameters.sliding_attention.rope_type"),
    ({**GEMMA3, "sliding_window": None}, "sliding_window"),
])
def test_gemma_refuses_what_it_cannot_reproduce(config, key):
    with pytest.raises(ValueError, match=key):
        family_for(config).model_args(config)
