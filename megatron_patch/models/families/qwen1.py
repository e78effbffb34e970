"""Qwen (v1: Qwen-1.8B/7B/14B/72B, `QWenLMHeadModel`, remote code).

A Llama-like decoder in GPT-2 naming: fused `c_attn` ([q; k; v], with bias), `c_proj` without
bias, RMSNorm, RoPE on `rotary_pct` of each head. The MLP computes c_proj(w1(x) * silu(w2(x))):
w2 is the gate, w1 the up projection, and config.json's intermediate_size is twice their width.

Config keys with no effect here, by the public modeling code: `use_dynamic_ntk` and
`use_logn_attn` act only in inference beyond `seq_length` tokens (NTK-scaled RoPE base, log-n
query scaling) and never in training; within `seq_length` both are the identity, which is what
the Megatron model computes at any length. `use_flash_attn`, `bf16`/`fp16`/`fp32`,
`softmax_in_fp32`, `use_cache_quantization` (the inference KV cache) and `scale_attn_weights`
(always on) choose kernels, dtypes and caching, not the function.
"""

from __future__ import annotations

from typing import Any

from megatron_patch.models.registry import register
from megatron_patch.models.spec import (
    ConfigField,
    FamilySpec,
    head_dim,
    tie_word_embeddings,
    untied,
)
from megatron_patch.models.weight_rules import GATE_UP, QKV_CONCAT, VOCAB, Rule

_HF_LAYER = "transformer.h.{layer}"



def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"rope_theta": cfg.get("rotary_emb_base", 10000), "rope_type": "default"}


QWEN1 = register(
    FamilySpec(
        name="qwen1",
        architectures=("QWenLMHeadModel",),
        config_fields=(
            ConfigField("num_hidden_layers", "num_layers"),
            ConfigField("hidden_size", "hidden_size"),
            ConfigField("intermediate_size", "ffn_hidden_size",
                        to_megatron=lambda v: v // 2, to_hf=lambda v: v * 2),
            ConfigField("num_attention_heads", "num_attention_heads"),
            # Multi-head attention: one KV group per head.
            ConfigField("num_attention_heads", "num_query_groups"),
            ConfigField("kv_channels", "kv_channels", head_dim),
            ConfigField("vocab_size", "vocab_size"),
            ConfigField("seq_length", "max_sequence_length", 2048),
            ConfigField("layer_norm_epsilon", "layernorm_epsilon", 1e-6),
            ConfigField("rotary_pct", "rotary_percent", 1.0),
            tie_word_embeddings(False),
            ConfigField("attn_dropout_prob", "attention_dropout", 0.0),
        ),
        constants={"add_qkv_bias": True},
        weights=(
            Rule("embedding.word_embeddings.weight", "transformer.wte.weight", VOCAB),
            Rule("decoder.layers.{layer}.input_layernorm.weight", f"{_HF_LAYER}.ln_1.weight"),
            Rule("decoder.layers.{layer}.self_attention.linear_qkv.weight",
                 f"{_HF_LAYER}.attn.c_attn.weight", QKV_CONCAT),
            Rule("decoder.layers.{layer}.self_attention.linear_qkv.bias",
                 f"{_HF_LAYER}.attn.c_attn.bias", QKV_CONCAT),
            Rule("decoder.layers.{layer}.self_attention.linear_proj.weight",
                 f"{_HF_LAYER}.attn.c_proj.weight"),
            Rule("decoder.layers.{layer}.pre_mlp_layernorm.weight", f"{_HF_LAYER}.ln_2.weight"),
            # Megatron's linear_fc1 is [gate; up]: w2 (inside the silu), then w1.
            Rule("decoder.layers.{layer}.mlp.linear_fc1.weight",
                 (f"{_HF_LAYER}.mlp.w2.weight", f"{_HF_LAYER}.mlp.w1.weight"), GATE_UP),
            Rule("decoder.layers.{layer}.mlp.linear_fc2.weight", f"{_HF_LAYER}.mlp.c_proj.weight"),
            Rule("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
            Rule("output_layer.weight", "lm_head.weight", VOCAB, when=untied(False)),
        ),
        requires={
            # no_bias=False puts biases on w1, w2 and both c_proj as well.
            "no_bias": lambda v: v is True,
            # The embedding dropout has no Megatron counterpart apart from hidden_dropout,
            # which would also drop the residual branches.
            "emb_dropout_prob": lambda v: v == 0,
            "rope_scaling": lambda v: v is None,
        },
        rope_parameters=_rope,
    )
)
