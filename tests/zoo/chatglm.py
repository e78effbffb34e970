"""ChatGLM2/3 and GLM-4 remote code (`ChatGLMModel`, in its own format) and GLM-4 in
transformers (`GlmForCausalLM`); the oracle for all is transformers' GlmForCausalLM."""

import torch

from zoo import Case, native
from zoo.remote_format import llama_layer, save, with_random_biases

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=96, vocab_size=1000, max_position_embeddings=256,
            rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=False,
            pad_token_id=0, eos_token_id=2)


def _glm(rope_theta: float, seed: int):
    rope = dict(rope_type="default", rope_theta=rope_theta, partial_rotary_factor=0.5)
    return with_random_biases(native("GlmForCausalLM", seed=seed, **TINY, rope_parameters=rope))


def _save_chatglm(rope_ratio: float | None):
    def save_chatglm(oracle, hf_dir: str) -> None:
        cfg = oracle.config
        sd = oracle.state_dict()
        tensors = {
            "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
            "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
            "transformer.output_layer.weight": sd["lm_head.weight"],
        }
        for i in range(cfg.num_hidden_layers):
            t = llama_layer(sd, i)
            p = f"transformer.encoder.layers.{i}"
            tensors.update({
                f"{p}.input_layernorm.weight": t["input_layernorm.weight"],
                f"{p}.self_attention.query_key_value.weight": torch.cat(
                    [t[f"self_attn.{x}_proj.weight"] for x in "qkv"]),
                f"{p}.self_attention.query_key_value.bias": torch.cat(
                    [t[f"self_attn.{x}_proj.bias"] for x in "qkv"]),
                f"{p}.self_attention.dense.weight": t["self_attn.o_proj.weight"],
                f"{p}.post_attention_layernorm.weight": t["post_attention_layernorm.weight"],
                f"{p}.mlp.dense_h_to_4h.weight": t["mlp.gate_up_proj.weight"],
                f"{p}.mlp.dense_4h_to_h.weight": t["mlp.down_proj.weight"],
            })
        config = {
            "architectures": ["ChatGLMModel"], "model_type": "chatglm",
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
            "num_layers": cfg.num_hidden_layers, "padded_vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.intermediate_size,
            "kv_channels": cfg.head_dim, "num_attention_heads": cfg.num_attention_heads,
            "seq_length": 256, "hidden_dropout": 0.0, "attention_dropout": 0.0,
            "layernorm_epsilon": cfg.rms_norm_eps, "rmsnorm": True,
            "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
            "add_bias_linear": False, "add_qkv_bias": True, "bias_dropout_fusion": True,
            "multi_query_attention": True,
            "multi_query_group_num": cfg.num_key_value_heads,
            "apply_query_key_layer_scaling": True, "attention_softmax_in_fp32": True,
            "fp32_residual_connection": False, "quantization_bit": 0, "pre_seq_len": None,
            "prefix_projection": False, "original_rope": True, "tie_word_embeddings": False,
            "pad_token_id": 0, "eos_token_id": 2,
        }
        if rope_ratio is not None:
            config["rope_ratio"] = rope_ratio
        save(tensors, config, hf_dir)

    return save_chatglm


CASES = [
    # ChatGLM2/3-6B: no rope_ratio (base 10000).
    Case("chatglm3", _glm(10000.0, seed=4), save=_save_chatglm(None)),
    # ChatGLM3-6B-32k / GLM-4-9B remote code: base 10000 * rope_ratio.
    Case("chatglm3_rope_ratio", _glm(10000.0 * 50, seed=5), save=_save_chatglm(50)),
    Case("glm4", _glm(10000.0, seed=6)),
]
