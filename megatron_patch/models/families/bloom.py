"""BLOOM (`BloomForCausalLM`): ALiBi, a LayerNorm right after the word embeddings, pre-LN
LayerNorm layers, GELU (tanh approximation), biases on every linear, tied output layer.

Its fused `query_key_value` holds, for each head, that head's q, k and v rows: Megatron's
per-group layout with one query head per group, so it is copied as it is.
"""

from __future__ import annotations

from megatron_patch.models.families.derived import Derived, either, with_bias
from megatron_patch.models.registry import register
from megatron_patch.models.spec import ConfigField, FamilySpec, tie_word_embeddings, untied
from megatron_patch.models.weight_rules import VOCAB, Rule

_HF_LAYER, _MCORE_LAYER = "transformer.h.{layer}", "decoder.layers.{layer}"


# Released BLOOM configs differ: bloom-560m has hidden_size / n_head, bloom (176B) n_embed /
# num_attention_heads.
_hidden = either("hidden_size", "n_embed")
_heads = either("n_head", "num_attention_heads")


BLOOM = register(
    FamilySpec(
        name="bloom",
        architectures=("BloomForCausalLM",),
        config_fields=(
            Derived("n_layer", "num_layers", either("n_layer", "num_hidden_layers")),
            Derived("hidden_size", "hidden_size", _hidden),
            Derived("hidden_size", "ffn_hidden_size", lambda c: 4 * _hidden(c)),
            Derived("n_head", "num_attention_heads", _heads),
            Derived("n_head", "num_query_groups", _heads),
            Derived("hidden_size", "kv_channels", lambda c: _hidden(c) // _heads(c)),
            ConfigField("vocab_size", "vocab_size"),
            # ALiBi has no table: only a default length for training data and generation.
            ConfigField("seq_length", "max_sequence_length", 2048),
            ConfigField("layer_norm_epsilon", "layernorm_epsilon", 1e-5),
            tie_word_embeddings(True),
            ConfigField("hidden_dropout", "hidden_dropout", 0.0),
            ConfigField("attention_dropout", "attention_dropout", 0.0),
        ),
        constants={"normalization": "LayerNorm", "activation": "gelu_tanh",
                   "gated_linear_unit": False, "add_bias_linear": True, "add_qkv_bias": True,
                   "position_embedding_type": "alibi", "embedding_norm": True},
        weights=(
            Rule("embedding.word_embeddings.weight", "transformer.word_embeddings.weight",
                 VOCAB),
            *with_bias("embedding.norm", "transformer.word_embeddings_layernorm"),
            *with_bias(f"{_MCORE_LAYER}.input_layernorm", f"{_HF_LAYER}.input_layernorm"),
            *with_bias(f"{_MCORE_LAYER}.self_attention.linear_qkv",
                       f"{_HF_LAYER}.self_attention.query_key_value"),
            *with_bias(f"{_MCORE_LAYER}.self_attention.linear_proj",
                       f"{_HF_LAYER}.self_attention.dense"),
            *with_bias(f"{_MCORE_LAYER}.pre_mlp_layernorm",
                       f"{_HF_LAYER}.post_attention_layernorm"),
            *with_bias(f"{_MCORE_LAYER}.mlp.linear_fc1", f"{_HF_LAYER}.mlp.dense_h_to_4h"),
            *with_bias(f"{_MCORE_LAYER}.mlp.linear_fc2", f"{_HF_LAYER}.mlp.dense_4h_to_h"),
            *with_bias("decoder.final_layernorm", "transformer.ln_f"),
            Rule("output_layer.weight", "lm_head.weight", VOCAB, when=untied(True)),
        ),
        requires={
            # Post-LN residuals (the residual taken after the norm) are not built.
            "apply_residual_connection_post_layernorm": lambda v: not v,
            # slow_but_exact replays the pretraining TP split of the output projections; it
            # changes only float rounding, which this model does not reproduce.
            "slow_but_exact": lambda v: not v,
        },
    )
)
