"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (per-head RMSNorm on q and k): Llama otherwise."""

from __future__ import annotations

from megatron_patch.models.families.llama import LLAMA_CONFIG, LLAMA_REQUIRES, LLAMA_WEIGHTS
from megatron_patch.models.registry import register
from megatron_patch.models.spec import FamilySpec
from megatron_patch.models.weight_rules import QKV, Rule

_ATTN = "model.layers.{layer}.self_attn"

QKV_BIAS = Rule("decoder.layers.{layer}.self_attention.linear_qkv.bias",
                (f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias"), QKV)

QK_NORM = (
    Rule("decoder.layers.{layer}.self_attention.q_layernorm.weight", f"{_ATTN}.q_norm.weight"),
    Rule("decoder.layers.{layer}.self_attention.k_layernorm.weight", f"{_ATTN}.k_norm.weight"),
)

QWEN2 = register(
    FamilySpec(
        name="qwen2",
        architectures=("Qwen2ForCausalLM",),
        config_fields=LLAMA_CONFIG,
        constants={"add_qkv_bias": True},
        weights=LLAMA_WEIGHTS + (QKV_BIAS,),
        # Qwen2's sliding window applies to some layers only (max_window_layers); released
        # models keep it off.
        requires={"hidden_act": LLAMA_REQUIRES["hidden_act"],
                  "use_sliding_window": lambda v: not v},
    )
)

QWEN3 = register(
    FamilySpec(
        name="qwen3",
        architectures=("Qwen3ForCausalLM",),
        config_fields=LLAMA_CONFIG,
        constants={"qk_layernorm": True},
        weights=LLAMA_WEIGHTS + QK_NORM,
        requires={"hidden_act": LLAMA_REQUIRES["hidden_act"],
                  "attention_bias": LLAMA_REQUIRES["attention_bias"],
                  "use_sliding_window": lambda v: not v},
    )
)
