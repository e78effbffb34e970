"""Config handling of the zoo families with remote-code formats: values a spec cannot reproduce
are refused with the key named; unit conversions go both ways; abridged configs of released
checkpoints become the model arguments they must, and the position-encoding flags agree with
them. No torch computation."""

import pytest
from harness import training_args

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


@pytest.mark.parametrize("config, message", [
    ({"architectures": ["FalconForCausalLM"], "alibi": True}, "alibi"),
    ({"architectures": ["FalconForCausalLM"], "new_decoder_architecture": True,
      "parallel_attn": False}, "parallel_attn"),
    ({"architectures": ["FalconForCausalLM"], "activation": "swish"}, "activation"),
    ({"architectures": ["OPTForCausalLM"], "do_layer_norm_before": False},
     "do_layer_norm_before"),
    ({"architectures": ["OPTForCausalLM"], "word_embed_proj_dim": 32}, "word_embed_proj_dim"),
    ({"architectures": ["BloomForCausalLM"], "apply_residual_connection_post_layernorm": True},
     "apply_residual_connection_post_layernorm"),
    ({"architectures": ["GPTBigCodeForCausalLM"], "scale_attn_weights": False},
     "scale_attn_weights"),
])
def test_unsupported_configs_are_refused_naming_the_key(config, message):
    from megatron_patch.models import family_for

    base = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
            "vocab_size": 1000, "intermediate_size": 96, "ffn_dim": 96, "hidden_act": "silu",
            "max_position_embeddings": 64, "n_layer": 2, "n_head": 4, "n_embd": 64,
            "n_positions": 64}
    cfg = {**base, **config}
    with pytest.raises(ValueError, match=message):
        family_for(cfg).model_args(cfg)


def test_position_encoding_flags():
    def kind(*flags):
        return training_args("ckpt", "data", extra=flags).position_embedding_type

    assert kind("--use-alibi-mask") == "alibi"
    assert kind("--position-embedding-type", "learned_absolute") == "learned_absolute"
    assert kind("--use-rotary-position-embeddings") == "rope"
    assert kind() is None  # not given: the checkpoint decides
    with pytest.raises(ValueError, match="conflicting"):
        kind("--use-alibi-mask", "--position-embedding-type", "rope")


# Abridged config.json files of released checkpoints (as published), and what they must become.
RELEASED = {
    "bloom-176b": ({"architectures": ["BloomForCausalLM"], "n_embed": 14336,
                    "num_attention_heads": 112, "n_layer": 70, "vocab_size": 250880,
                    "layer_norm_epsilon": 1e-5, "slow_but_exact": False,
                    "apply_residual_connection_post_layernorm": False},
                   dict(num_attention_heads=112, num_query_groups=112, kv_channels=128,
                        ffn_hidden_size=4 * 14336, position_embedding_type="alibi",
                        embedding_norm=True)),
    "falcon-7b": ({"architectures": ["FalconForCausalLM"], "hidden_size": 4544,
                   "num_attention_heads": 71, "num_hidden_layers": 32, "multi_query": True,
                   "new_decoder_architecture": False, "parallel_attn": True, "alibi": False,
                   "bias": False, "vocab_size": 65024},
                  dict(num_query_groups=1, kv_channels=64, parallel_attention=True,
                       parallel_attention_norms=1, add_bias_linear=False, activation="gelu")),
    "falcon-40b": ({"architectures": ["FalconForCausalLM"], "hidden_size": 8192,
                    "num_attention_heads": 128, "num_hidden_layers": 60, "num_kv_heads": 8,
                    "multi_query": True, "new_decoder_architecture": True,
                    "parallel_attn": True, "alibi": False, "bias": False, "vocab_size": 65024},
                   dict(num_query_groups=8, kv_channels=64, parallel_attention=True,
                        parallel_attention_norms=2)),
    "starcoder": ({"architectures": ["GPTBigCodeForCausalLM"], "n_embd": 6144, "n_head": 48,
                   "n_layer": 40, "n_inner": 24576, "n_positions": 8192, "multi_query": True,
                   "activation_function": "gelu_pytorch_tanh", "vocab_size": 49152,
                   "scale_attn_weights": True},
                  dict(num_query_groups=1, ffn_hidden_size=24576, max_sequence_length=8192,
                       position_embedding_type="learned_absolute", activation="gelu_tanh")),
    "galactica-1.3b": ({"architectures": ["OPTForCausalLM"], "hidden_size": 2048,
                        "num_attention_heads": 32, "num_hidden_layers": 24, "ffn_dim": 8192,
                        "max_position_embeddings": 2048, "activation_function": "gelu",
                        "do_layer_norm_before": True, "word_embed_proj_dim": 2048,
                        "vocab_size": 50000, "tie_word_embeddings": True},
                       dict(position_offset=2, activation="gelu", add_bias_linear=True,
                            share_embeddings_and_output_weights=True)),
    "baichuan-13b": ({"architectures": ["BaichuanForCausalLM"], "hidden_size": 5120,
                      "num_attention_heads": 40, "num_hidden_layers": 40,
                      "intermediate_size": 13696, "vocab_size": 64000, "hidden_act": "silu",
                      "model_max_length": 4096, "rms_norm_eps": 1e-6},
                     dict(position_embedding_type="alibi", kv_channels=128, norm_head=False,
                          share_embeddings_and_output_weights=False)),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configs(name):
    from megatron_patch.models import family_for

    config, expected = RELEASED[name]
    args = family_for(config).model_args(config)
    assert {k: getattr(args, k) for k in expected} == expected


def test_multi_query_kv_head_is_replicated_so_tp_can_split_it():
    from megatron_patch.models import check_layout, family_for

    cfg = {"architectures": ["GPTBigCodeForCausalLM"], "n_layer": 2, "n_embd": 64, "n_head": 4,
           "vocab_size": 1000, "n_positions": 64, "multi_query": True}
    args = family_for(cfg).model_args(cfg)
    assert (args.num_query_groups, args.kv_replicas, args.megatron_query_groups) == (1, 4, 4)
    check_layout(args, 1024, 2, 1)
    check_layout(args, 1024, 4, 1)
    with pytest.raises(ValueError, match="4 identical copies"):
        check_layout(args, 1024, 8, 1)
    # Released configs: StarCoder's 48 heads get 8 groups; Falcon-7B's 71 heads have no
    # factor from 2 to 8, so its one KV head cannot be split: refused, saying why.
    starcoder = RELEASED["starcoder"][0]
    assert family_for(starcoder).model_args(starcoder).megatron_query_groups == 8
    falcon7b = RELEASED["falcon-7b"][0]
    args = family_for(falcon7b).model_args(falcon7b)
    assert args.kv_replicas == 1
    with pytest.raises(ValueError, match="multi-query attention.*TP=1 only"):
        check_layout(args, 65024, 2, 1)
    # Grouped-query models keep their groups.
    falcon40b = RELEASED["falcon-40b"][0]
    assert family_for(falcon40b).model_args(falcon40b).kv_replicas == 1
