"""StarCoder2 (`Starcoder2ForCausalLM`): pre-norm LayerNorm (with bias) decoder, GQA, RoPE,
sliding-window attention, biases on every linear layer, a GELU(tanh) MLP without gate, output
layer tied to the embedding by default."""

from __future__ import annotations

from typing import Any

from megatron_patch.models.families.derived import with_bias
from megatron_patch.models.registry import register
from megatron_patch.models.spec import (
    ConfigField,
    FamilySpec,
    head_dim,
    tie_word_embeddings,
    untied,
)
from megatron_patch.models.weight_rules import QKV, VOCAB, Rule

_HF_LAYER = "model.layers.{layer}"
_MCORE_LAYER = "decoder.layers.{layer}"


def _bias(cfg: dict[str, Any]) -> bool:
    return cfg.get("use_bias", True)



def _validate(cfg: dict[str, Any]) -> None:
    # Megatron has one hidden_dropout, used after the embedding and on both residual branches.
    emb, res = cfg.get("embedding_dropout", 0.0), cfg.get("residual_dropout", 0.0)
    if emb != res:
        raise ValueError(f"starcoder2: config.json embedding_dropout={emb!r} differs from "
                         f"residual_dropout={res!r}; Megatron applies one hidden_dropout to both")


_ATTN = f"{_HF_LAYER}.self_attn"

STARCODER2 = register(
    FamilySpec(
        name="starcoder2",
        architectures=("Starcoder2ForCausalLM",),
        config_fields=(
            ConfigField("num_hidden_layers", "num_layers"),
            ConfigField("hidden_size", "hidden_size"),
            ConfigField("intermediate_size", "ffn_hidden_size"),
            ConfigField("num_attention_heads", "num_attention_heads"),
            ConfigField("num_key_value_heads", "num_query_groups",
                        lambda c: c["num_attention_heads"]),
            ConfigField("head_dim", "kv_channels", head_dim),
            ConfigField("vocab_size", "vocab_size"),
            ConfigField("max_position_embeddings", "max_sequence_length", 4096),
            ConfigField("norm_epsilon", "layernorm_epsilon", 1e-5),
            tie_word_embeddings(True),
            ConfigField("sliding_window", "sliding_window", None),
            ConfigField("use_bias", "add_bias_linear", True),
            ConfigField("attention_dropout", "attention_dropout", 0.0),
            ConfigField("residual_dropout", "hidden_dropout", 0.0),
        ),
        constants={"normalization": "LayerNorm", "activation": "gelu_tanh",
                   "gated_linear_unit": False},
        weights=(
            Rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", VOCAB),
            *with_bias(f"{_MCORE_LAYER}.input_layernorm", f"{_HF_LAYER}.input_layernorm"),
            Rule(f"{_MCORE_LAYER}.self_attention.linear_qkv.weight",
                 (f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight", f"{_ATTN}.v_proj.weight"),
                 QKV),
            Rule(f"{_MCORE_LAYER}.self_attention.linear_qkv.bias",
                 (f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias"),
                 QKV, when=_bias),
            *with_bias(f"{_MCORE_LAYER}.self_attention.linear_proj", f"{_ATTN}.o_proj", _bias),
            *with_bias(f"{_MCORE_LAYER}.pre_mlp_layernorm",
                       f"{_HF_LAYER}.post_attention_layernorm"),
            *with_bias(f"{_MCORE_LAYER}.mlp.linear_fc1", f"{_HF_LAYER}.mlp.c_fc", _bias),
            *with_bias(f"{_MCORE_LAYER}.mlp.linear_fc2", f"{_HF_LAYER}.mlp.c_proj", _bias),
            *with_bias("decoder.final_layernorm", "model.norm"),
            Rule("output_layer.weight", "lm_head.weight", VOCAB, when=untied(True)),
        ),
        requires={"hidden_act": lambda v: v == "gelu_pytorch_tanh"},
        validate=_validate,
    )
)
