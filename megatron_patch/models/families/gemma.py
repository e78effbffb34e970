"""Gemma 2 and Gemma 3 (text): Llama-shaped decoders with Gemma's own pieces (models/gemma.py).

Both: embeddings times sqrt(hidden_size); RMSNorms computing x_hat * (1 + weight); GeGLU (tanh
GELU); norms before *and* after attention and MLP; attention scores scaled by
query_pre_attn_scalar ** -0.5; sliding-window and full-attention layers in a pattern
(`layer_types`, else every 2nd (Gemma 2) / 6th (Gemma 3) layer full); tied embeddings by default.
Gemma 2 soft-caps attention scores and final logits (cap * tanh(x / cap)). Gemma 3 adds q/k
norms and rotates its sliding-window layers with their own RoPE base (rope_local_base_freq).
"""

from __future__ import annotations

from typing import Any

from megatron_patch.models import rope
from megatron_patch.models.families.derived import Derived, activation
from megatron_patch.models.families.llama import LLAMA_CONFIG, LLAMA_REQUIRES, LLAMA_WEIGHTS
from megatron_patch.models.families.qwen import QK_NORM
from megatron_patch.models.registry import register
from megatron_patch.models.spec import ConfigField, FamilySpec, tie_word_embeddings, untied
from megatron_patch.models.weight_rules import VOCAB, Rule

_LAYER = "model.layers.{layer}"
_TYPES = {"sliding_attention": 1, "full_attention": 0}


def _layer_types(period: int):
    """HF layer_types, or transformers' default pattern for configs without it: every
    `period`-th layer (sliding_window_pattern in Gemma 3 configs) full, the others sliding."""

    def read(cfg: dict[str, Any]) -> list[str]:
        if cfg.get("layer_types"):
            return list(cfg["layer_types"])
        every = cfg.get("sliding_window_pattern") or period
        return ["sliding_attention" if (i + 1) % every else "full_attention"
                for i in range(cfg["num_hidden_layers"])]

    return read


def window_pattern(period: int):
    def read(cfg: dict[str, Any]) -> tuple[int, ...] | None:
        if cfg.get("sliding_window") is None:
            return None
        return tuple(_TYPES[t] for t in _layer_types(period)(cfg))

    return read


def validate_layer_types(period: int):
    def check(cfg: dict[str, Any]) -> None:
        types = _layer_types(period)(cfg)
        if unknown := sorted(set(types) - set(_TYPES)):
            raise ValueError(f"config.json layer_types {unknown} are not supported; supported: "
                             f"{sorted(_TYPES)}")
        if len(types) != cfg["num_hidden_layers"]:
            raise ValueError(f"config.json layer_types has {len(types)} entries for "
                             f"num_hidden_layers={cfg['num_hidden_layers']}")

    return check


def _gemma3_rope(cfg: dict[str, Any], layer_type: str) -> dict[str, Any]:
    """transformers 5 keeps one rope_parameters entry per layer type; 4.x configs have
    rope_theta + rope_scaling (full attention) and rope_local_base_freq (sliding)."""
    per_type = cfg.get("rope_parameters") or {}
    if layer_type in per_type:
        params = dict(per_type[layer_type])
        params["rope_type"] = params.get("rope_type", params.get("type", "default"))
        return params
    if layer_type == "sliding_attention":
        return {"rope_theta": cfg.get("rope_local_base_freq", 10000.0), "rope_type": "default"}
    return rope.rope_parameters({"rope_theta": cfg.get("rope_theta", 1_000_000.0),
                                 "rope_scaling": cfg.get("rope_scaling")})


def _gemma3_validate(cfg: dict[str, Any]) -> None:
    validate_layer_types(6)(cfg)
    if cfg.get("sliding_window") is None:
        # transformers still rotates "sliding_attention" layers by the local base then.
        raise ValueError("config.json sliding_window=None is not supported for Gemma 3")
    local = _gemma3_rope(cfg, "sliding_attention")
    if local["rope_type"] != "default":
        raise ValueError(f"config.json rope_parameters.sliding_attention.rope_type="
                         f"{local['rope_type']!r} is not supported (default only)")


GEMMA_CONFIG = tuple(f for f in LLAMA_CONFIG
                     if f.megatron != "share_embeddings_and_output_weights") + (
    tie_word_embeddings(True),
    activation("hidden_activation", "gelu_pytorch_tanh"),
    ConfigField("sliding_window", "sliding_window", None),
    Derived("query_pre_attn_scalar", "softmax_scale",
            lambda c: float(c.get("query_pre_attn_scalar") or c["head_dim"]) ** -0.5),
    ConfigField("attn_logit_softcapping", "attn_logit_softcapping", None),
    ConfigField("final_logit_softcapping", "final_logit_softcapping", None),
)

GEMMA_WEIGHTS = tuple(r for r in LLAMA_WEIGHTS
                      if "layernorm" not in r.megatron and r.megatron != "output_layer.weight") + (
    Rule("decoder.layers.{layer}.input_layernorm.weight", f"{_LAYER}.input_layernorm.weight"),
    Rule("decoder.layers.{layer}.self_attention.linear_proj.post_layernorm.weight",
         f"{_LAYER}.post_attention_layernorm.weight"),
    Rule("decoder.layers.{layer}.pre_mlp_layernorm.weight",
         f"{_LAYER}.pre_feedforward_layernorm.weight"),
    Rule("decoder.layers.{layer}.mlp.linear_fc2.post_layernorm.weight",
         f"{_LAYER}.post_feedforward_layernorm.weight"),
    Rule("decoder.final_layernorm.weight", "model.norm.weight"),
    Rule("output_layer.weight", "lm_head.weight", VOCAB, when=untied(True)),
)

GEMMA_CONSTANTS = {"zero_centered_norms": True, "embedding_scale": True, "post_norms": True}

GEMMA_REQUIRES = {
    "attention_bias": LLAMA_REQUIRES["attention_bias"],
    # Bidirectional (encoder) use of the weights: a different function.
    "use_bidirectional_attention": lambda v: not v,
}

GEMMA2 = register(
    FamilySpec(
        name="gemma2",
        architectures=("Gemma2ForCausalLM",),
        config_fields=GEMMA_CONFIG + (
            Derived("layer_types", "window_pattern", window_pattern(2)),
        ),
        constants=GEMMA_CONSTANTS,
        weights=GEMMA_WEIGHTS,
        requires=GEMMA_REQUIRES,
        validate=validate_layer_types(2),
    )
)

GEMMA3 = register(
    FamilySpec(
        name="gemma3",
        architectures=("Gemma3ForCausalLM",),
        config_fields=GEMMA_CONFIG + (
            Derived("layer_types", "window_pattern", window_pattern(6)),
            Derived("rope_parameters", "local_rope_theta",
                    lambda c: float(_gemma3_rope(c, "sliding_attention")["rope_theta"])),
        ),
        constants={**GEMMA_CONSTANTS, "qk_layernorm": True},
        weights=GEMMA_WEIGHTS + QK_NORM,
        requires=GEMMA_REQUIRES,
        rope_parameters=lambda c: _gemma3_rope(c, "full_attention"),
        validate=_gemma3_validate,
    )
)
