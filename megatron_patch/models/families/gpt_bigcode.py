"""StarCoder / SantaCoder (`GPTBigCodeForCausalLM`): learned absolute positions (`wpe`),
pre-LN LayerNorm layers, GELU (tanh approximation), biases everywhere, tied output layer,
multi-query attention (or multi-head with `multi_query: false`).

The fused `c_attn` is Megatron's per-group layout in both cases, so it is copied as it is
(`qkv_grouped`): multi-query stores all query heads, then one k and one v (one group); multi-head
stores [q, k, v] per head (groups = heads). Multi-query's one KV head is replicated in Megatron
(spec.kv_replicas) so that tensor parallelism can split it.
"""

from __future__ import annotations

from megatron_patch.models.families.derived import Derived, activation, with_bias
from megatron_patch.models.registry import register
from megatron_patch.models.spec import ConfigField, FamilySpec, tie_word_embeddings, untied
from megatron_patch.models.weight_rules import QKV_GROUPED, VOCAB, Rule

_HF_LAYER, _MCORE_LAYER = "transformer.h.{layer}", "decoder.layers.{layer}"

GPT_BIGCODE = register(
    FamilySpec(
        name="gpt_bigcode",
        architectures=("GPTBigCodeForCausalLM",),
        config_fields=(
            ConfigField("n_layer", "num_layers"),
            ConfigField("n_embd", "hidden_size"),
            ConfigField("n_inner", "ffn_hidden_size", lambda c: 4 * c["n_embd"]),
            ConfigField("n_head", "num_attention_heads"),
            Derived("multi_query", "num_query_groups",
                    lambda c: 1 if c.get("multi_query", True) else c["n_head"]),
            Derived("n_embd", "kv_channels", lambda c: c["n_embd"] // c["n_head"]),
            ConfigField("vocab_size", "vocab_size"),
            ConfigField("n_positions", "max_sequence_length"),
            ConfigField("layer_norm_epsilon", "layernorm_epsilon", 1e-5),
            tie_word_embeddings(True),
            ConfigField("resid_pdrop", "hidden_dropout", 0.1),
            ConfigField("attn_pdrop", "attention_dropout", 0.1),
            activation("activation_function", "gelu_pytorch_tanh"),
        ),
        constants={"normalization": "LayerNorm", "gated_linear_unit": False,
                   "add_bias_linear": True, "add_qkv_bias": True,
                   "position_embedding_type": "learned_absolute"},
        weights=(
            Rule("embedding.word_embeddings.weight", "transformer.wte.weight", VOCAB),
            Rule("embedding.position_embeddings.weight", "transformer.wpe.weight"),
            *with_bias(f"{_MCORE_LAYER}.input_layernorm", f"{_HF_LAYER}.ln_1"),
            *with_bias(f"{_MCORE_LAYER}.self_attention.linear_qkv", f"{_HF_LAYER}.attn.c_attn",
                       transform=QKV_GROUPED),
            *with_bias(f"{_MCORE_LAYER}.self_attention.linear_proj", f"{_HF_LAYER}.attn.c_proj"),
            *with_bias(f"{_MCORE_LAYER}.pre_mlp_layernorm", f"{_HF_LAYER}.ln_2"),
            *with_bias(f"{_MCORE_LAYER}.mlp.linear_fc1", f"{_HF_LAYER}.mlp.c_fc"),
            *with_bias(f"{_MCORE_LAYER}.mlp.linear_fc2", f"{_HF_LAYER}.mlp.c_proj"),
            *with_bias("decoder.final_layernorm", "transformer.ln_f"),
            Rule("output_layer.weight", "lm_head.weight", VOCAB, when=untied(True)),
        ),
        requires={
            "scale_attn_weights": lambda v: bool(v),
            "add_cross_attention": lambda v: not v,
        },
    )
)
