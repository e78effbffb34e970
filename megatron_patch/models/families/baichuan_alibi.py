"""Baichuan-13B and Baichuan2-13B (`BaichuanForCausalLM` with ALiBi; which configs use ALiBi:
see families/baichuan.py): ALiBi attention, RMSNorm, SwiGLU, no biases, untied output layer,
q, k and v fused as one [q; k; v] concatenation (`W_pack`).
Baichuan2 adds NormHead (output rows normalised in every forward: models/norm_head.py).
"""

from __future__ import annotations

from megatron_patch.models.families.baichuan import uses_alibi, uses_norm_head
from megatron_patch.models.families.derived import Derived
from megatron_patch.models.families.llama import LLAMA_REQUIRES
from megatron_patch.models.registry import register
from megatron_patch.models.spec import (
    ConfigField,
    FamilySpec,
    head_dim,
    tie_word_embeddings,
    untied,
)
from megatron_patch.models.weight_rules import GATE_UP, QKV_CONCAT, VOCAB, Rule

_HF_LAYER, _MCORE_LAYER = "model.layers.{layer}", "decoder.layers.{layer}"


BAICHUAN_ALIBI = register(
    FamilySpec(
        name="baichuan_alibi",
        architectures=("BaichuanForCausalLM",),
        applies=uses_alibi,
        config_fields=(
            ConfigField("num_hidden_layers", "num_layers"),
            ConfigField("hidden_size", "hidden_size"),
            ConfigField("intermediate_size", "ffn_hidden_size"),
            ConfigField("num_attention_heads", "num_attention_heads"),
            ConfigField("num_attention_heads", "num_query_groups"),
            Derived("hidden_size", "kv_channels", head_dim),
            ConfigField("vocab_size", "vocab_size"),
            ConfigField("model_max_length", "max_sequence_length", 4096),
            ConfigField("rms_norm_eps", "layernorm_epsilon", 1e-6),
            tie_word_embeddings(False),
            Derived("norm_head", "norm_head", uses_norm_head),
        ),
        constants={"position_embedding_type": "alibi"},
        weights=(
            Rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", VOCAB),
            Rule(f"{_MCORE_LAYER}.input_layernorm.weight", f"{_HF_LAYER}.input_layernorm.weight"),
            Rule(f"{_MCORE_LAYER}.self_attention.linear_qkv.weight",
                 f"{_HF_LAYER}.self_attn.W_pack.weight",
                 QKV_CONCAT),
            Rule(f"{_MCORE_LAYER}.self_attention.linear_proj.weight",
                 f"{_HF_LAYER}.self_attn.o_proj.weight"),
            Rule(f"{_MCORE_LAYER}.pre_mlp_layernorm.weight",
                 f"{_HF_LAYER}.post_attention_layernorm.weight"),
            Rule(f"{_MCORE_LAYER}.mlp.linear_fc1.weight",
                 (f"{_HF_LAYER}.mlp.gate_proj.weight", f"{_HF_LAYER}.mlp.up_proj.weight"), GATE_UP),
            Rule(f"{_MCORE_LAYER}.mlp.linear_fc2.weight", f"{_HF_LAYER}.mlp.down_proj.weight"),
            Rule("decoder.final_layernorm.weight", "model.norm.weight"),
            Rule("output_layer.weight", "lm_head.weight", VOCAB, when=untied(False)),
        ),
        requires={"hidden_act": LLAMA_REQUIRES["hidden_act"]},
    )
)
