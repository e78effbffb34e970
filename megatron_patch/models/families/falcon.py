"""Falcon (`FalconForCausalLM`): RoPE, LayerNorm, GELU, no biases, tied output layer, and
attention + MLP in parallel from the layer input:

- 7B style: one input LayerNorm shared by both branches (`input_layernorm`), multi-query
  attention (one KV head);
- 40B/180B style (`new_decoder_architecture`): a LayerNorm per branch (`ln_attn`, `ln_mlp`;
  `num_ln_in_parallel_attn` may make it one shared norm) and grouped KV heads (`num_kv_heads`);
- `parallel_attn: false` (without the new architecture): an ordinary sequential pre-LN layer.

The fused `query_key_value` is, in every style, Megatron's per-group layout (for each KV group:
its query heads, then its key head and value head), so it is copied as it is: the new
architecture stores exactly that; multi-query stores all query heads then one k and one v (one
group); the old non-multi-query layout stores [q, k, v] per head (groups = heads). A single KV
head is replicated in Megatron (`qkv_grouped`, spec.kv_replicas) so that TP can split it where
the head count allows (not Falcon-7B's 71 heads).
ALiBi Falcon (falcon-rw, `alibi: true`) scales the bias with the scores, unlike BLOOM: refused.
"""

from __future__ import annotations

from typing import Any

from megatron_patch.models.families.derived import Derived, activation, with_bias
from megatron_patch.models.registry import register
from megatron_patch.models.spec import (
    ConfigField,
    FamilySpec,
    head_dim,
    tie_word_embeddings,
    untied,
)
from megatron_patch.models.weight_rules import QKV_GROUPED, VOCAB, Rule

_HF_LAYER, _MCORE_LAYER = "transformer.h.{layer}", "decoder.layers.{layer}"


def _new(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("new_decoder_architecture", False))


def _parallel(cfg: dict[str, Any]) -> bool:
    return _new(cfg) or bool(cfg.get("parallel_attn", True))


def _num_norms(cfg: dict[str, Any]) -> int:
    # transformers: the new architecture defaults to two norms; the old one always has one.
    if not _new(cfg):
        return 1
    n = cfg.get("num_ln_in_parallel_attn")
    return 2 if n is None else int(n)


def _groups(cfg: dict[str, Any]) -> int:
    heads = cfg["num_attention_heads"]
    if _new(cfg):
        return cfg.get("num_kv_heads") or heads
    if cfg.get("multi_query", True):
        return 1
    kv = cfg.get("num_kv_heads") or heads
    if kv != heads:
        raise ValueError(f"Falcon config.json num_kv_heads={kv} without multi_query or "
                         "new_decoder_architecture: its fused layout is per head")
    return heads


def _two_norms(cfg: dict[str, Any]) -> bool:
    return _parallel(cfg) and _num_norms(cfg) == 2


def _one_norm(cfg: dict[str, Any]) -> bool:
    return not _two_norms(cfg)


def _sequential(cfg: dict[str, Any]) -> bool:
    return not _parallel(cfg)


def _bias(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("bias", False))


def _norm(megatron: str, hf: str, when) -> tuple[Rule, ...]:
    return tuple(Rule(r.megatron, r.hf, when=when) for r in with_bias(megatron, hf))


def _validate(cfg: dict[str, Any]) -> None:
    if _new(cfg) and not cfg.get("parallel_attn", True):
        raise ValueError("Falcon config.json new_decoder_architecture=true with "
                         "parallel_attn=false is not a working transformers model: refused")


FALCON = register(
    FamilySpec(
        name="falcon",
        architectures=("FalconForCausalLM",),
        config_fields=(
            ConfigField("num_hidden_layers", "num_layers"),
            ConfigField("hidden_size", "hidden_size"),
            ConfigField("ffn_hidden_size", "ffn_hidden_size", lambda c: 4 * c["hidden_size"]),
            ConfigField("num_attention_heads", "num_attention_heads"),
            Derived("num_kv_heads", "num_query_groups", _groups),
            Derived("hidden_size", "kv_channels", head_dim),
            ConfigField("vocab_size", "vocab_size"),
            ConfigField("max_position_embeddings", "max_sequence_length", 2048),
            ConfigField("layer_norm_epsilon", "layernorm_epsilon", 1e-5),
            tie_word_embeddings(True),
            ConfigField("hidden_dropout", "hidden_dropout", 0.0),
            ConfigField("attention_dropout", "attention_dropout", 0.0),
            activation("activation", "gelu"),
            Derived("bias", "add_bias_linear", _bias),
            Derived("bias", "add_qkv_bias", _bias),
            Derived("parallel_attn", "parallel_attention", _parallel),
            Derived("num_ln_in_parallel_attn", "parallel_attention_norms", _num_norms),
        ),
        constants={"normalization": "LayerNorm", "gated_linear_unit": False},
        weights=(
            Rule("embedding.word_embeddings.weight", "transformer.word_embeddings.weight",
                 VOCAB),
            *_norm(f"{_MCORE_LAYER}.input_layernorm", f"{_HF_LAYER}.input_layernorm", _one_norm),
            *_norm(f"{_MCORE_LAYER}.input_layernorm", f"{_HF_LAYER}.ln_attn", _two_norms),
            *_norm(f"{_MCORE_LAYER}.pre_mlp_layernorm", f"{_HF_LAYER}.ln_mlp", _two_norms),
            *_norm(f"{_MCORE_LAYER}.pre_mlp_layernorm", f"{_HF_LAYER}.post_attention_layernorm",
                   _sequential),
            *with_bias(f"{_MCORE_LAYER}.self_attention.linear_qkv",
                       f"{_HF_LAYER}.self_attention.query_key_value", _bias, QKV_GROUPED),
            *with_bias(f"{_MCORE_LAYER}.self_attention.linear_proj",
                       f"{_HF_LAYER}.self_attention.dense", _bias),
            *with_bias(f"{_MCORE_LAYER}.mlp.linear_fc1", f"{_HF_LAYER}.mlp.dense_h_to_4h", _bias),
            *with_bias(f"{_MCORE_LAYER}.mlp.linear_fc2", f"{_HF_LAYER}.mlp.dense_4h_to_h", _bias),
            *with_bias("decoder.final_layernorm", "transformer.ln_f"),
            Rule("output_layer.weight", "lm_head.weight", VOCAB, when=untied(True)),
        ),
        validate=_validate,
        requires={"alibi": lambda v: not v},
    )
)
