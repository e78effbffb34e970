"""Llama 1/2/3, CodeLlama and Mistral: pre-norm RMSNorm decoder, RoPE, GQA, SwiGLU, no biases."""

from __future__ import annotations

from megatron_patch.models.registry import register
from megatron_patch.models.spec import (
    ConfigField,
    FamilySpec,
    head_dim,
    tie_word_embeddings,
    untied,
)
from megatron_patch.models.weight_rules import GATE_UP, QKV, VOCAB, Rule

LLAMA_CONFIG = (
    ConfigField("num_hidden_layers", "num_layers"),
    ConfigField("hidden_size", "hidden_size"),
    ConfigField("intermediate_size", "ffn_hidden_size"),
    ConfigField("num_attention_heads", "num_attention_heads"),
    # Llama 1 and 2-7B/13B configs predate GQA and omit it: one KV head per query head.
    ConfigField("num_key_value_heads", "num_query_groups", lambda c: c["num_attention_heads"]),
    # Older configs have no head_dim: hidden_size / num_attention_heads.
    ConfigField("head_dim", "kv_channels", head_dim),
    ConfigField("vocab_size", "vocab_size"),
    ConfigField("max_position_embeddings", "max_sequence_length", 4096),
    ConfigField("rms_norm_eps", "layernorm_epsilon", 1e-6),
    # transformers defaults tie_word_embeddings to False for Llama when the key is absent.
    tie_word_embeddings(False),
    ConfigField("attention_dropout", "attention_dropout", 0.0),
)

LLAMA_WEIGHTS = (
    Rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", VOCAB),
    Rule("decoder.layers.{layer}.input_layernorm.weight",
         "model.layers.{layer}.input_layernorm.weight"),
    Rule("decoder.layers.{layer}.self_attention.linear_qkv.weight",
         ("model.layers.{layer}.self_attn.q_proj.weight",
          "model.layers.{layer}.self_attn.k_proj.weight",
          "model.layers.{layer}.self_attn.v_proj.weight"), QKV),
    Rule("decoder.layers.{layer}.self_attention.linear_proj.weight",
         "model.layers.{layer}.self_attn.o_proj.weight"),
    Rule("decoder.layers.{layer}.pre_mlp_layernorm.weight",
         "model.layers.{layer}.post_attention_layernorm.weight"),
    Rule("decoder.layers.{layer}.mlp.linear_fc1.weight",
         ("model.layers.{layer}.mlp.gate_proj.weight",
          "model.layers.{layer}.mlp.up_proj.weight"), GATE_UP),
    Rule("decoder.layers.{layer}.mlp.linear_fc2.weight",
         "model.layers.{layer}.mlp.down_proj.weight"),
    Rule("decoder.final_layernorm.weight", "model.norm.weight"),
    Rule("output_layer.weight", "lm_head.weight", VOCAB, when=untied(False)),
)

LLAMA_REQUIRES = {
    "hidden_act": lambda v: v == "silu",
    # Megatron-Core can add biases to q/k/v alone or to every linear; Llama's attention_bias also
    # covers o_proj, and mlp_bias the MLP: neither split is expressible, so both must be off.
    "attention_bias": lambda v: not v,
    "mlp_bias": lambda v: not v,
}

LLAMA = register(
    FamilySpec(
        name="llama",
        architectures=("LlamaForCausalLM",),
        config_fields=LLAMA_CONFIG,
        constants={},
        weights=LLAMA_WEIGHTS,
        hf_ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
        requires=LLAMA_REQUIRES,
    )
)

MISTRAL = register(
    FamilySpec(
        name="mistral",
        architectures=("MistralForCausalLM",),
        config_fields=LLAMA_CONFIG + (ConfigField("sliding_window", "sliding_window", None),),
        constants={},
        weights=LLAMA_WEIGHTS,
        requires=LLAMA_REQUIRES,
    )
)
