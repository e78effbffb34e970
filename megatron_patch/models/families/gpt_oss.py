"""GPT-OSS (gpt-oss-20b, gpt-oss-120b): a mixture-of-experts decoder on Megatron-Core.

Attention: q/k/v/o with biases, GQA, a learned per-head logit in every softmax's denominator
(attention sinks: Megatron-Core's softmax_type="learnable", its `softmax_offset`), sliding-window
and full-attention layers alternating (`layer_types`, else even layers sliding), RoPE on halves
with YaRN frequencies (models/rope.py) and YaRN's attention factor, which transformers applies
to cos and sin (so to queries and keys): here squared into the softmax scale.

MoE: a router with a bias, top-k of its logits, softmax over those (Megatron-Core's default);
experts with biases computing (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) where
g = min(gate, limit): Megatron-Core's GLU with quick_gelu (alpha 1.702), activation_func_clamp_
value and glu_linear_offset 1; the bias of the down projection is weighted by the routing
probability as transformers does. Expert biases need expert tensor parallel size 1
(models.expert_tensor_parallel_size).

Checkpoints store each layer's experts stacked: gate_up_proj [E, hidden, 2 * ffn] (x @ W, gate
and up interleaved), down_proj [E, ffn, hidden] and their biases; released ones quantise the two
weights to MXFP4 (`*_blocks`, `*_scales`: convert/mxfp4.py), imported dequantised.
"""

from __future__ import annotations

import math
from typing import Any

from megatron_patch.models import rope
from megatron_patch.models.families.derived import Derived, either
from megatron_patch.models.families.gemma import validate_layer_types, window_pattern
from megatron_patch.models.families.llama import LLAMA_CONFIG, LLAMA_WEIGHTS
from megatron_patch.models.registry import register
from megatron_patch.models.spec import ConfigField, FamilySpec
from megatron_patch.models.weight_rules import (
    QKV,
    STACKED_DOWN,
    STACKED_DOWN_BIAS,
    STACKED_GATE_UP,
    STACKED_GATE_UP_BIAS,
    Rule,
)

_ATTN = "model.layers.{layer}.self_attn"
_MLP = "model.layers.{layer}.mlp"
_MOE = "decoder.layers.{layer}.mlp"
_EXPERT = _MOE + ".experts.local_experts.{expert}"

# transformers' GptOssConfig defaults (config.json may omit them).
_ROPE_DEFAULT = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False, "original_max_position_embeddings": 4096,
                 "rope_theta": 150000.0}
# Megatron-Core's quick_gelu: x * sigmoid(1.702 x).
QUICK_GELU_ALPHA = 1.702


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    if not cfg.get("rope_parameters") and not cfg.get("rope_scaling"):
        return {**_ROPE_DEFAULT, "rope_theta": cfg.get("rope_theta", 150000.0)}
    return rope.rope_parameters({"rope_theta": 150000.0, **cfg})


def _softmax_scale(cfg: dict[str, Any]) -> float:
    params = rope_parameters(cfg)
    factor = rope.yarn_attention_factor(params) if params["rope_type"] == "yarn" else 1.0
    return factor ** 2 / math.sqrt(cfg.get("head_dim") or 64)


def _check(cfg: dict[str, Any]) -> None:
    validate_layer_types(2)(cfg)
    params = rope_parameters(cfg)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json rope partial_rotary_factor="
                         f"{params['partial_rotary_factor']!r} is not supported")
    if params["rope_type"] == "yarn" and params.get("factor") is None:
        raise ValueError("config.json rope factor=None (YaRN's factor from the context "
                         "lengths) is not supported: give factor")


# transformers' GptOssConfig defaults differ from Llama's for these keys.
_OWN_DEFAULTS = (
    ConfigField("head_dim", "kv_channels", 64),
    ConfigField("max_position_embeddings", "max_sequence_length", 131072),
    ConfigField("rms_norm_eps", "layernorm_epsilon", 1e-5),
)

GPT_OSS_CONFIG = tuple(f for f in LLAMA_CONFIG
                       if f.megatron not in {o.megatron for o in _OWN_DEFAULTS}) + _OWN_DEFAULTS + (
    ConfigField("sliding_window", "sliding_window", 128),
    Derived("layer_types", "window_pattern", window_pattern(2)),
    Derived("rope_parameters", "softmax_scale", _softmax_scale),
    ConfigField("num_local_experts", "num_moe_experts", either("num_experts")),
    ConfigField("num_experts_per_tok", "moe_router_topk", either("experts_per_token")),
    # Every MLP is a set of experts this wide.
    ConfigField("intermediate_size", "moe_ffn_hidden_size"),
    ConfigField("router_aux_loss_coef", "moe_aux_loss_coeff", 0.001),
    ConfigField("swiglu_limit", "activation_clamp", 7.0),
)

GPT_OSS_WEIGHTS = tuple(r for r in LLAMA_WEIGHTS if ".mlp." not in r.megatron) + (
    Rule("decoder.layers.{layer}.self_attention.linear_qkv.bias",
         (f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias"), QKV),
    Rule("decoder.layers.{layer}.self_attention.linear_proj.bias", f"{_ATTN}.o_proj.bias"),
    Rule("decoder.layers.{layer}.self_attention.core_attention.softmax_offset",
         f"{_ATTN}.sinks"),
    Rule(f"{_MOE}.router.weight", f"{_MLP}.router.weight"),
    Rule(f"{_MOE}.router.bias", f"{_MLP}.router.bias"),
    Rule(f"{_EXPERT}.linear_fc1.weight", f"{_MLP}.experts.gate_up_proj", STACKED_GATE_UP),
    Rule(f"{_EXPERT}.linear_fc1.bias", f"{_MLP}.experts.gate_up_proj_bias",
         STACKED_GATE_UP_BIAS),
    Rule(f"{_EXPERT}.linear_fc2.weight", f"{_MLP}.experts.down_proj", STACKED_DOWN),
    Rule(f"{_EXPERT}.linear_fc2.bias", f"{_MLP}.experts.down_proj_bias", STACKED_DOWN_BIAS),
)

GPT_OSS = register(
    FamilySpec(
        name="gpt_oss",
        architectures=("GptOssForCausalLM",),
        config_fields=GPT_OSS_CONFIG,
        constants={"add_bias_linear": True, "add_qkv_bias": True, "attention_sinks": True,
                   "activation": "quick_gelu", "glu_linear_offset": 1.0,
                   "moe_router_pre_softmax": False},
        weights=GPT_OSS_WEIGHTS,
        requires={
            # Megatron-Core biases o_proj and the experts with q/k/v together (add_bias_linear).
            "attention_bias": lambda v: bool(v),
            "swiglu_alpha": lambda v: v == QUICK_GELU_ALPHA,
            "num_local_experts": lambda v: v > 0,
        },
        validate=_check,
        rope_parameters=rope_parameters,
        rope_types=rope.SUPPORTED_TYPES + ("yarn",),
    )
)
