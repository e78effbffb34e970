"""What a model family is: a config mapping, layer options and a weight mapping, all as data."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from megatron_patch.models import rope
from megatron_patch.models.weight_rules import Rule

_MISSING = object()


@dataclass(frozen=True)
class ConfigField:
    """One HF config.json key <-> one model argument.

    `default` is used when the HF key is absent: a value, or a function of the HF config.
    `to_megatron` / `to_hf` convert a value whose units differ between the two sides (Qwen v1's
    intermediate_size is twice the MLP width); a default is already in Megatron's units.
    """

    hf: str
    megatron: str
    default: Any = _MISSING
    to_megatron: Callable[[Any], Any] | None = None
    to_hf: Callable[[Any], Any] | None = None

    def read(self, hf_config: dict[str, Any]) -> Any:
        if self.hf in hf_config and hf_config[self.hf] is not None:
            value = hf_config[self.hf]
            return value if self.to_megatron is None else self.to_megatron(value)
        if self.default is _MISSING:
            raise KeyError(f"config.json has no {self.hf!r}, which {self.megatron} needs")
        return self.default(hf_config) if callable(self.default) else self.default


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to build the Megatron model of a family member."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_sequence_length: int
    layernorm_epsilon: float
    normalization: str = "RMSNorm"
    activation: str = "silu"  # a key of models/activations.py ACTIVATIONS
    gated_linear_unit: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    share_embeddings_and_output_weights: bool = False
    position_embedding_type: str = "rope"
    rotary_percent: float = 1.0
    # HF semantics: each token sees itself and the `sliding_window - 1` tokens before it.
    sliding_window: int | None = None
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # Rotary on interleaved pairs (x0, x1), (x2, x3)... instead of halves (GLM).
    rotary_interleaved: bool = False
    # Pieces Megatron-Core lacks, added by megatron_patch (models/layers.py, models/embedding.py,
    # wired in by models/build.py).
    # position_embedding_type may also be "learned_absolute", "alibi" or "none".
    position_offset: int = 0  # learned positions start at this row (OPT: 2)
    embedding_norm: bool = False  # a norm right after the word embeddings (BLOOM)
    parallel_attention: bool = False  # x + attn(norm(x)) + mlp(norm'(x)) (Falcon)
    parallel_attention_norms: int = 1  # 1: attention and MLP share the input norm; 2: one each
    norm_head: bool = False  # output-layer rows L2-normalised in every forward (Baichuan2)
    # A reward model: the output layer is a scalar score head (models/score_head.py).
    score_head: bool = False
    # Gemma (models/gemma.py): norms computing x_hat * (1 + weight); embeddings times
    # sqrt(hidden_size); norms after attention and MLP too; cap * tanh(x / cap) on attention
    # scores and final logits; a softmax scale other than 1/sqrt(kv_channels).
    zero_centered_norms: bool = False
    embedding_scale: bool = False
    post_norms: bool = False
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    softmax_scale: float | None = None
    # Which layers use sliding_window (1) and which full attention (0), Megatron-Core's
    # window_attn_skip_freq list; None: every layer (when sliding_window is set).
    window_pattern: tuple[int, ...] | None = None
    # RoPE base of the sliding-window layers where it differs from the global one (Gemma 3).
    local_rope_theta: float | None = None
    # GPT-OSS: a learned per-head logit in every attention softmax's denominator (attention
    # sinks, Megatron-Core's softmax_type="learnable"); the GLU's inputs clamped (gate above,
    # linear half both sides) and an offset added to its linear half.
    attention_sinks: bool = False
    activation_clamp: float | None = None
    glu_linear_offset: float = 0.0
    # Mixture of experts (Megatron-Core's MoE layer); None: a dense MLP.
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    # Which layers are MoE (1) and which dense (0), Megatron-Core's moe_layer_freq list; None:
    # every layer (when num_moe_experts is set). Dense layers are ffn_hidden_size wide.
    moe_layer_freq: tuple[int, ...] | None = None
    # Softmax over all experts, then top-k (Qwen2-MoE without norm_topk_prob); else top-k
    # logits, then softmax over those (Mixtral).
    moe_router_pre_softmax: bool = False
    # Router scores: "softmax" or "sigmoid" (DeepSeek-V3), plus a per-expert bias added for the
    # choice only (e_score_correction_bias), group-limited choice (n_group / topk_group) and a
    # factor on the chosen weights (routed_scaling_factor).
    moe_router_score_function: str = "softmax"
    moe_router_enable_expert_bias: bool = False
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None
    moe_router_topk_scaling_factor: float | None = None
    # Load-balancing loss weight for training; it adds gradients only, never changes logits.
    moe_aux_loss_coeff: float = 0.0
    # Multi-latent attention (DeepSeek-V2/V3): Megatron-Core's MLATransformerConfig settings
    # (q_lora_rank, kv_lora_rank, qk_head_dim, qk_pos_emb_head_dim, v_head_dim, rope_type,
    # rotary_base, YaRN's scaling_factor / mscale ...) as (name, value) pairs; None: no MLA.
    mla: tuple[tuple[str, Any], ...] | None = None
    # Each of the num_query_groups KV heads (HF's count) is built this many times in Megatron,
    # so that tensor parallelism can split the groups (see kv_replicas below).
    kv_replicas: int = 1

    @property
    def megatron_query_groups(self) -> int:
        """The query groups of the Megatron model: the HF KV heads times their copies."""
        return self.num_query_groups * self.kv_replicas


@dataclass(frozen=True)
class FamilySpec:
    """A model family: HF architecture names, config mapping, layer options, weight mapping."""

    name: str
    architectures: tuple[str, ...]
    config_fields: tuple[ConfigField, ...]
    constants: dict[str, Any]
    weights: tuple[Rule, ...]
    # HF tensors that carry no weights (e.g. cached rotary buffers in old checkpoints).
    hf_ignore: tuple[str, ...] = ()
    # Values a config must have for this spec to be exact; anything else is refused.
    requires: dict[str, Callable[[Any], bool]] = field(default_factory=dict)
    # Where several specs share an HF architecture (Baichuan: RoPE or ALiBi), the config
    # decides: exactly one registered spec must apply to it.
    applies: Callable[[dict[str, Any]], bool] | None = None
    # The rotary parameters (rope_theta, rope_type, scaling) of a config, for families whose
    # config.json names them differently from Llama's.
    rope_parameters: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # HF tensors that no Megatron-Core parameter holds but that must not be lost (DeepSeek-V3's
    # multi-token-prediction layer): kept byte for byte beside the converted checkpoint
    # (hf/UNCONVERTED) and written back on export. A predicate of (HF config, tensor name).
    hf_kept: Callable[[dict[str, Any], str], bool] | None = None
    # Checks `requires` cannot state (several keys, absent keys): raises ValueError naming them.
    validate: Callable[[dict[str, Any]], None] | None = None
    # The rope types this family's model reproduces (rope.check_supported).
    rope_types: tuple[str, ...] = rope.SUPPORTED_TYPES

    def kept_names(self, hf_config: dict[str, Any], names: Iterable[str]) -> list[str]:
        """The HF tensors among `names` that conversion keeps byte for byte (`hf_kept`)."""
        if self.hf_kept is None:
            return []
        return [n for n in names if self.hf_kept(hf_config, n)]

    def model_args(self, hf_config: dict[str, Any]) -> ModelArgs:
        if self.validate is not None:
            self.validate(hf_config)
        for key, ok in self.requires.items():
            if key in hf_config and not ok(hf_config[key]):
                raise ValueError(
                    f"{self.name}: config.json {key}={hf_config[key]!r} is not supported"
                )
        values = {f.megatron: f.read(hf_config) for f in self.config_fields}
        args = ModelArgs(**self.constants, **values)
        # (Multi-latent attention rotates by Megatron-Core's own RoPE / YaRN: checked by its
        # family.)
        if args.position_embedding_type == "rope" and args.mla is None:
            params = (self.rope_parameters or rope.rope_parameters)(hf_config)
            rope.check_supported(params, hf_config, self.name, self.rope_types)
        return replace(args, kv_replicas=kv_replicas(args.num_attention_heads,
                                                     args.num_query_groups))

    def hf_config_updates(self, args: ModelArgs) -> dict[str, Any]:
        """The reverse direction: HF config.json entries for a model built from Megatron args."""
        return {f.hf: getattr(args, f.megatron) if f.to_hf is None else f.to_hf(
            getattr(args, f.megatron)) for f in self.config_fields}


# Megatron-Core splits whole query groups over tensor parallel ranks; one KV head is copied into
# up to this many groups so that TP up to 8 can split a multi-query model.
KV_REPLICATION_TARGET = 8


def kv_replicas(num_attention_heads: int, num_query_groups: int) -> int:
    """How many copies of each KV head the Megatron model holds.

    Multi-query attention (one KV head) gets gcd(heads, 8) copies, each serving a contiguous
    share of the query heads: the model computes exactly the same function, and TP can split
    the groups (48 heads: 8 groups; 6 heads: 2; Falcon-7B's 71 heads: 1, so no TP > 1).
    Training keeps the copies identical (training/kv_replicas.py) and export checks they are.
    Grouped-query models keep their groups: copies would cost KV cache and compute at every
    layout, while they already split up to TP = groups.
    """
    if num_query_groups != 1:
        return 1
    return math.gcd(num_attention_heads, KV_REPLICATION_TARGET)


def tie_word_embeddings(default: bool) -> ConfigField:
    """HF tie_word_embeddings <-> share_embeddings_and_output_weights; `default` is the family's
    transformers default for a config.json without the key."""
    return ConfigField("tie_word_embeddings", "share_embeddings_and_output_weights", default)


def untied(default: bool) -> Callable[[dict[str, Any]], bool]:
    """`Rule.when` for the output layer's own tensor: the config is untied, read exactly as
    `tie_word_embeddings(default)` reads it (so the mapping and the model never disagree)."""
    tie = tie_word_embeddings(default)
    return lambda hf_config: not tie.read(hf_config)


def head_dim(hf_config: dict[str, Any]) -> int:
    return hf_config["hidden_size"] // hf_config["num_attention_heads"]


def pad_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Megatron-LM's padding: the smallest multiple of `divisible_by` not below `vocab_size`."""
    return int(math.ceil(vocab_size / divisible_by) * divisible_by)
