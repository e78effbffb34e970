"""OPT and Galactica (`OPTForCausalLM`): learned absolute positions read at position + 2 (the
table has two extra leading rows, kept so the checkpoint round-trips whole), pre-LN LayerNorm
layers, ReLU (OPT) or the config's activation_function (Galactica: GELU), biases
(`enable_bias`), tied output layer, multi-head attention from separate q/k/v projections.

Refused: post-LN OPT (`do_layer_norm_before: false`, OPT-350M), an embedding projection
(`word_embed_proj_dim` != hidden_size), norms without weights, a removed final norm.
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
from megatron_patch.models.weight_rules import QKV, VOCAB, Rule

_HF_DECODER = "model.decoder"
_HF_LAYER, _MCORE_LAYER = f"{_HF_DECODER}.layers.{{layer}}", "decoder.layers.{layer}"

# OPT's learned position table starts two rows before position 0 (fairseq's padding offset).
OPT_POSITION_OFFSET = 2


def _bias(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("enable_bias", True))


def _qkv(part: str) -> tuple[str, str, str]:
    return tuple(f"{_HF_LAYER}.self_attn.{p}_proj.{part}" for p in "qkv")


def _validate(cfg: dict[str, Any]) -> None:
    if cfg.get("word_embed_proj_dim") not in (None, cfg["hidden_size"]):
        raise ValueError(f"OPT config.json word_embed_proj_dim={cfg['word_embed_proj_dim']} "
                         f"differs from hidden_size={cfg['hidden_size']}: the embedding "
                         "projections (project_in/project_out) are not supported")


OPT = register(
    FamilySpec(
        name="opt",
        architectures=("OPTForCausalLM",),
        config_fields=(
            ConfigField("num_hidden_layers", "num_layers"),
            ConfigField("hidden_size", "hidden_size"),
            ConfigField("ffn_dim", "ffn_hidden_size"),
            ConfigField("num_attention_heads", "num_attention_heads"),
            ConfigField("num_attention_heads", "num_query_groups"),
            Derived("hidden_size", "kv_channels", head_dim),
            ConfigField("vocab_size", "vocab_size"),
            ConfigField("max_position_embeddings", "max_sequence_length"),
            tie_word_embeddings(True),
            ConfigField("dropout", "hidden_dropout", 0.1),
            ConfigField("attention_dropout", "attention_dropout", 0.0),
            activation("activation_function", "relu"),
            Derived("enable_bias", "add_bias_linear", _bias),
            Derived("enable_bias", "add_qkv_bias", _bias),
        ),
        # torch.nn.LayerNorm's default epsilon: OPT configs have no key for it.
        constants={"normalization": "LayerNorm", "gated_linear_unit": False,
                   "layernorm_epsilon": 1e-5, "position_embedding_type": "learned_absolute",
                   "position_offset": OPT_POSITION_OFFSET},
        weights=(
            Rule("embedding.word_embeddings.weight", f"{_HF_DECODER}.embed_tokens.weight", VOCAB),
            Rule("embedding.position_embeddings.weight", f"{_HF_DECODER}.embed_positions.weight"),
            *with_bias(f"{_MCORE_LAYER}.input_layernorm", f"{_HF_LAYER}.self_attn_layer_norm"),
            Rule(f"{_MCORE_LAYER}.self_attention.linear_qkv.weight", _qkv("weight"), QKV),
            Rule(f"{_MCORE_LAYER}.self_attention.linear_qkv.bias", _qkv("bias"), QKV, when=_bias),
            *with_bias(f"{_MCORE_LAYER}.self_attention.linear_proj",
                       f"{_HF_LAYER}.self_attn.out_proj", _bias),
            *with_bias(f"{_MCORE_LAYER}.pre_mlp_layernorm", f"{_HF_LAYER}.final_layer_norm"),
            *with_bias(f"{_MCORE_LAYER}.mlp.linear_fc1", f"{_HF_LAYER}.fc1", _bias),
            *with_bias(f"{_MCORE_LAYER}.mlp.linear_fc2", f"{_HF_LAYER}.fc2", _bias),
            *with_bias("decoder.final_layernorm", f"{_HF_DECODER}.final_layer_norm"),
            Rule("output_layer.weight", "lm_head.weight", VOCAB, when=untied(True)),
        ),
        validate=_validate,
        requires={
            "do_layer_norm_before": lambda v: bool(v),
            "_remove_final_layer_norm": lambda v: not v,
            "layer_norm_elementwise_affine": lambda v: bool(v),
        },
    )
)
