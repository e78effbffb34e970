"""Qwen (v1) remote code: checkpoints in its own format, oracle transformers' Qwen2ForCausalLM
(the same network: q/k/v biases, RMSNorm, RoPE, SwiGLU; one KV head per query head)."""

import torch

from zoo import Case, native
from zoo.remote_format import llama_layer, save, with_random_biases

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=96, vocab_size=1000, max_position_embeddings=256,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)


def save_qwen1(oracle, hf_dir: str) -> None:
    cfg = oracle.config
    sd = oracle.state_dict()
    tensors = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
               "transformer.ln_f.weight": sd["model.norm.weight"],
               "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        t = llama_layer(sd, i)
        h = f"transformer.h.{i}"
        tensors.update({
            f"{h}.ln_1.weight": t["input_layernorm.weight"],
            f"{h}.attn.c_attn.weight": torch.cat([t[f"self_attn.{p}_proj.weight"] for p in "qkv"]),
            f"{h}.attn.c_attn.bias": torch.cat([t[f"self_attn.{p}_proj.bias"] for p in "qkv"]),
            f"{h}.attn.c_proj.weight": t["self_attn.o_proj.weight"],
            f"{h}.ln_2.weight": t["post_attention_layernorm.weight"],
            # c_proj(w1(x) * silu(w2(x))): w1 is the up projection, w2 the gate.
            f"{h}.mlp.w1.weight": t["mlp.up_proj.weight"],
            f"{h}.mlp.w2.weight": t["mlp.gate_proj.weight"],
            f"{h}.mlp.c_proj.weight": t["mlp.down_proj.weight"],
        })
    save(tensors, {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "kv_channels": cfg.hidden_size // cfg.num_attention_heads,
        # Twice the width of w1 and w2.
        "intermediate_size": 2 * cfg.intermediate_size,
        "layer_norm_epsilon": cfg.rms_norm_eps, "rotary_emb_base": 10000, "rotary_pct": 1.0,
        "seq_length": 256, "max_position_embeddings": 256, "no_bias": True,
        "tie_word_embeddings": False, "use_dynamic_ntk": True, "use_logn_attn": True,
        "use_flash_attn": "auto", "emb_dropout_prob": 0.0, "attn_dropout_prob": 0.0,
        "scale_attn_weights": True, "bf16": False, "fp16": False, "fp32": False,
    }, hf_dir)


CASES = [
    Case("qwen1", with_random_biases(native("Qwen2ForCausalLM", **TINY)), save=save_qwen1),
]
