"""ChatGLM2 / ChatGLM3 / GLM-4 remote code (`ChatGLMModel`) and GLM-4 in transformers
(`GlmForCausalLM`): the same network under two namings.

Pre-norm RMSNorm decoder, multi-query attention (2 KV groups in the released models) with q/k/v
biases, rotary embedding on the first half of each head's dimensions in interleaved pairs
(x0, x1), (x2, x3)... (Megatron: rotary_percent 0.5 + rotary_interleaved, which compute the same
function as GLM's cos/sin cache), SwiGLU with [gate; up] fused (Megatron's own linear_fc1
layout), untied output layer.

ChatGLM config keys with no effect on the function, by the public modeling code:
`original_rope` (stored, never read), `apply_query_key_layer_scaling` (scores are divided by
the layer number and multiplied back before an fp32 softmax), `attention_softmax_in_fp32`,
`bias_dropout_fusion`, `classifier_dropout`. `rope_ratio` scales the RoPE base (10000 *
rope_ratio), as ChatGLM3-6B-32k and GLM-4-9B's remote code do; ChatGLM2-6B-32k's older code
divided positions by it instead, which this spec does not express.
"""

from __future__ import annotations

from typing import Any

from megatron_patch.models.families.llama import LLAMA_CONFIG, LLAMA_REQUIRES, LLAMA_WEIGHTS
from megatron_patch.models.families.qwen import QKV_BIAS
from megatron_patch.models.registry import register
from megatron_patch.models.spec import ConfigField, FamilySpec, head_dim
from megatron_patch.models.weight_rules import GATE_UP, QKV_CONCAT, VOCAB, Rule

_HF_LAYER = "transformer.encoder.layers.{layer}"


def _chatglm_rope(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"rope_theta": 10000.0 * float(cfg.get("rope_ratio") or 1), "rope_type": "default"}


def _chatglm_validate(cfg: dict[str, Any]) -> None:
    # Without multi-query attention query_key_value is laid out per head as [q_h; k_h; v_h],
    # which no released ChatGLM2/3/GLM-4 checkpoint uses; the key defaults to false when absent.
    if cfg.get("multi_query_attention") is not True:
        raise ValueError("chatglm: config.json multi_query_attention="
                         f"{cfg.get('multi_query_attention')!r} is not supported (only true)")


def _has_qkv_bias(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("add_qkv_bias", False))


CHATGLM = register(
    FamilySpec(
        name="chatglm",
        architectures=("ChatGLMModel",),
        config_fields=(
            ConfigField("num_layers", "num_layers"),
            ConfigField("hidden_size", "hidden_size"),
            ConfigField("ffn_hidden_size", "ffn_hidden_size"),
            ConfigField("num_attention_heads", "num_attention_heads"),
            ConfigField("multi_query_group_num", "num_query_groups"),
            ConfigField("kv_channels", "kv_channels", head_dim),
            # The embedding and output rows: ChatGLM's own padded size is the real vocabulary.
            ConfigField("padded_vocab_size", "vocab_size"),
            ConfigField("seq_length", "max_sequence_length", 2048),
            ConfigField("layernorm_epsilon", "layernorm_epsilon", 1e-5),
            ConfigField("add_qkv_bias", "add_qkv_bias", False),
            ConfigField("hidden_dropout", "hidden_dropout", 0.0),
            ConfigField("attention_dropout", "attention_dropout", 0.0),
        ),
        constants={"rotary_percent": 0.5, "rotary_interleaved": True,
                   "share_embeddings_and_output_weights": False},
        weights=(
            Rule("embedding.word_embeddings.weight",
                 "transformer.embedding.word_embeddings.weight", VOCAB),
            Rule("decoder.layers.{layer}.input_layernorm.weight",
                 f"{_HF_LAYER}.input_layernorm.weight"),
            Rule("decoder.layers.{layer}.self_attention.linear_qkv.weight",
                 f"{_HF_LAYER}.self_attention.query_key_value.weight", QKV_CONCAT),
            Rule("decoder.layers.{layer}.self_attention.linear_qkv.bias",
                 f"{_HF_LAYER}.self_attention.query_key_value.bias", QKV_CONCAT,
                 when=_has_qkv_bias),
            Rule("decoder.layers.{layer}.self_attention.linear_proj.weight",
                 f"{_HF_LAYER}.self_attention.dense.weight"),
            Rule("decoder.layers.{layer}.pre_mlp_layernorm.weight",
                 f"{_HF_LAYER}.post_attention_layernorm.weight"),
            # dense_h_to_4h is already [gate; up]: swiglu(x) = silu(x[:f]) * x[f:].
            Rule("decoder.layers.{layer}.mlp.linear_fc1.weight",
                 f"{_HF_LAYER}.mlp.dense_h_to_4h.weight"),
            Rule("decoder.layers.{layer}.mlp.linear_fc2.weight",
                 f"{_HF_LAYER}.mlp.dense_4h_to_h.weight"),
            Rule("decoder.final_layernorm.weight", "transformer.encoder.final_layernorm.weight"),
            Rule("output_layer.weight", "transformer.output_layer.weight", VOCAB),
        ),
        # Old checkpoints store the rotary frequencies, which the model recomputes anyway.
        hf_ignore=(r"transformer\.rotary_pos_emb\.inv_freq",),
        requires={
            "rmsnorm": lambda v: v is True,
            "post_layer_norm": lambda v: v is True,
            "apply_residual_connection_post_layernorm": lambda v: not v,
            "add_bias_linear": lambda v: not v,
            "fp32_residual_connection": lambda v: not v,
            "quantization_bit": lambda v: not v,
            "pre_seq_len": lambda v: v is None,  # P-tuning v2 prefix encoder
        },
        rope_parameters=_chatglm_rope,
        validate=_chatglm_validate,
    )
)


def _glm_partial_rotary(cfg: dict[str, Any]) -> float:
    # transformers 5 keeps it in rope_parameters; GlmConfig's default is 0.5.
    return float((cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 0.5))


GLM4 = register(
    FamilySpec(
        name="glm4",
        architectures=("GlmForCausalLM",),
        config_fields=LLAMA_CONFIG + (
            ConfigField("partial_rotary_factor", "rotary_percent", _glm_partial_rotary),
            ConfigField("attention_bias", "add_qkv_bias", True),
        ),
        constants={"rotary_interleaved": True},
        weights=tuple(
            Rule(r.megatron, "model.layers.{layer}.mlp.gate_up_proj.weight")
            if r.transform is GATE_UP else r for r in LLAMA_WEIGHTS
        ) + (Rule(QKV_BIAS.megatron, QKV_BIAS.hf, QKV_BIAS.transform,
                  when=lambda c: c.get("attention_bias", True)),),
        requires={"hidden_act": LLAMA_REQUIRES["hidden_act"]},
    )
)
