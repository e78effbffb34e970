"""DeepSeek-V2 / V2-Lite / V3: multi-latent attention (MLA) and DeepSeek-MoE on Megatron-Core.

MLA: queries straight from the hidden state (q_lora_rank null, V2-Lite) or through a low-rank
down projection + RMSNorm + up projection; keys and values from a shared latent (kv_lora_rank)
plus one decoupled RoPE key (qk_rope_head_dim) for all heads. The RoPE dims are interleaved
pairs in the checkpoints, which Megatron-Core's MLA expects. RoPE or YaRN (with its mscale on the
softmax scale), Megatron-Core's own frequencies.

MoE: the first `first_k_dense_replace` layers dense, then routed experts plus always-on shared
experts (n_shared_experts x moe_intermediate_size wide). V2: softmax over all experts, top-k as
they are (optionally within the best `topk_group` of `n_group` groups, a group scored by its best
expert), times routed_scaling_factor. V3: sigmoid scores, the choice made on scores +
e_score_correction_bias within groups scored by their two best experts, the chosen scores
renormalised, times routed_scaling_factor. V3's multi-token-prediction layer (extra layers after
num_hidden_layers in HF checkpoints) is kept byte for byte beside the converted checkpoint and
written back on export; it is not trained.
"""

from __future__ import annotations

import re
from typing import Any

from megatron_patch.models import rope
from megatron_patch.models.families.derived import Derived, either
from megatron_patch.models.families.llama import LLAMA_CONFIG, LLAMA_REQUIRES, LLAMA_WEIGHTS
from megatron_patch.models.registry import register
from megatron_patch.models.spec import ConfigField, FamilySpec
from megatron_patch.models.weight_rules import GATE_UP, Rule, on_layers

_ATTN = "model.layers.{layer}.self_attn"
_MLA = "decoder.layers.{layer}.self_attention"
_HF_MLP = "model.layers.{layer}.mlp"
_MOE = "decoder.layers.{layer}.mlp"


def _dense(cfg: dict[str, Any], layer: int) -> bool:
    return layer < (cfg.get("first_k_dense_replace") or 0)


def _moe_layer_freq(cfg: dict[str, Any]) -> tuple[int, ...] | None:
    pattern = tuple(int(not _dense(cfg, i)) for i in range(cfg["num_hidden_layers"]))
    return None if all(pattern) else pattern


# HF rope_parameters (yarn) key -> MLATransformerConfig field.
_YARN = {"factor": "rotary_scaling_factor",
         "original_max_position_embeddings": "original_max_position_embeddings",
         "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale",
         "mscale_all_dim": "mscale_all_dim"}
_YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}


def _mla(cfg: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    params = rope.rope_parameters(cfg)
    mla: dict[str, Any] = {
        "q_lora_rank": cfg.get("q_lora_rank"), "kv_lora_rank": cfg["kv_lora_rank"],
        "qk_head_dim": cfg["qk_nope_head_dim"], "qk_pos_emb_head_dim": cfg["qk_rope_head_dim"],
        "v_head_dim": cfg["v_head_dim"], "rotary_base": float(params["rope_theta"]),
        "rope_type": "rope",
    }
    if params["rope_type"] == "yarn":
        mla["rope_type"] = "yarn"
        for hf, megatron in _YARN.items():
            value = params.get(hf, _YARN_DEFAULTS.get(hf))
            if value is None and hf == "original_max_position_embeddings":
                value = cfg["max_position_embeddings"]
            mla[megatron] = float(value) if hf != "original_max_position_embeddings" else value
    return tuple(mla.items())


def _validate(cfg: dict[str, Any]) -> None:
    params = rope.rope_parameters(cfg)
    if params["rope_type"] not in ("default", "yarn"):
        raise ValueError(f"config.json rope_parameters.rope_type={params['rope_type']!r} is not "
                         "supported (default, yarn)")
    for key in ("attention_factor",):
        if params.get(key) is not None:
            raise ValueError(f"config.json rope_parameters.{key} is not supported")
    if params.get("truncate") is False:
        raise ValueError("config.json rope_parameters.truncate=False is not supported")
    if not cfg.get("rope_interleave", True):
        raise ValueError("config.json rope_interleave=False is not supported (Megatron-Core's "
                         "MLA rotates interleaved pairs, as DeepSeek checkpoints store them)")
    top = cfg.get("topk_group") or 1
    if _groups(cfg) and cfg["num_experts_per_tok"] // top != _GROUP_SCORE_TOPK[cfg_version(cfg)]:
        # Megatron-Core scores a group by the sum of its best num_experts_per_tok // topk_group
        # experts; V2 scores by the best one, V3 by the best two.
        raise ValueError(
            f"config.json num_experts_per_tok={cfg['num_experts_per_tok']} with "
            f"topk_group={top}: group-limited routing is supported where "
            f"num_experts_per_tok // topk_group == {_GROUP_SCORE_TOPK[cfg_version(cfg)]}")


_GROUP_SCORE_TOPK = {2: 1, 3: 2}


def _groups(cfg: dict[str, Any]) -> int | None:
    """n_group where routing is group-limited (V2: topk_method group_limited_greedy only)."""
    method = cfg.get("topk_method", "noaux_tc" if cfg_version(cfg) == 3 else "greedy")
    groups = cfg.get("n_group") or 1
    return groups if groups > 1 and method != "greedy" else None


def cfg_version(cfg: dict[str, Any]) -> int:
    return 3 if "DeepseekV3ForCausalLM" in (cfg.get("architectures") or []) else 2


DEEPSEEK_CONFIG = tuple(f for f in LLAMA_CONFIG if f.megatron != "kv_channels") + (
    Derived("qk_nope_head_dim", "kv_channels",
            lambda c: c["qk_nope_head_dim"] + c["qk_rope_head_dim"]),
    Derived("rope_parameters", "mla", _mla),
    ConfigField("n_routed_experts", "num_moe_experts", either("num_local_experts")),
    ConfigField("num_experts_per_tok", "moe_router_topk"),
    ConfigField("moe_intermediate_size", "moe_ffn_hidden_size"),
    Derived("n_shared_experts", "moe_shared_expert_intermediate_size",
            lambda c: (c.get("n_shared_experts") or 0) * c["moe_intermediate_size"] or None),
    Derived("first_k_dense_replace", "moe_layer_freq", _moe_layer_freq),
    ConfigField("routed_scaling_factor", "moe_router_topk_scaling_factor", 1.0),
    Derived("n_group", "moe_router_num_groups", _groups),
    Derived("topk_group", "moe_router_group_topk",
            lambda c: c["topk_group"] if _groups(c) else None),
    ConfigField("aux_loss_alpha", "moe_aux_loss_coeff", 0.0),
)

_MLA_RULES = (
    Rule(f"{_MLA}.linear_q_proj.weight", f"{_ATTN}.q_proj.weight",
         when=lambda c: c.get("q_lora_rank") is None),
    Rule(f"{_MLA}.linear_q_down_proj.weight", f"{_ATTN}.q_a_proj.weight",
         when=lambda c: c.get("q_lora_rank") is not None),
    Rule(f"{_MLA}.q_layernorm.weight", f"{_ATTN}.q_a_layernorm.weight",
         when=lambda c: c.get("q_lora_rank") is not None),
    Rule(f"{_MLA}.linear_q_up_proj.weight", f"{_ATTN}.q_b_proj.weight",
         when=lambda c: c.get("q_lora_rank") is not None),
    Rule(f"{_MLA}.linear_kv_down_proj.weight", f"{_ATTN}.kv_a_proj_with_mqa.weight"),
    Rule(f"{_MLA}.kv_layernorm.weight", f"{_ATTN}.kv_a_layernorm.weight"),
    Rule(f"{_MLA}.linear_kv_up_proj.weight", f"{_ATTN}.kv_b_proj.weight"),
    Rule(f"{_MLA}.linear_proj.weight", f"{_ATTN}.o_proj.weight"),
)


def _sparse(c: dict[str, Any], i: int) -> bool:
    return not _dense(c, i)


def _mtp_tensor(cfg: dict[str, Any], name: str) -> bool:
    """DeepSeek-V3's multi-token-prediction layers: stored as layers num_hidden_layers, ... of
    the HF checkpoint (transformers ignores them; Megatron-Core's MTP block is not built here),
    kept beside the converted checkpoint and restored on export."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return match is not None and int(match.group(1)) >= cfg["num_hidden_layers"]


_DENSE_MLP = tuple(r for r in LLAMA_WEIGHTS if ".mlp." in r.megatron)

DEEPSEEK_WEIGHTS = tuple(
    r for r in LLAMA_WEIGHTS if "self_attention" not in r.megatron and ".mlp." not in r.megatron
) + _MLA_RULES + on_layers(_DENSE_MLP, _dense) + on_layers((
    Rule(f"{_MOE}.router.weight", f"{_HF_MLP}.gate.weight"),
    Rule(f"{_MOE}.experts.local_experts.{{expert}}.linear_fc1.weight",
         (f"{_HF_MLP}.experts.{{expert}}.gate_proj.weight",
          f"{_HF_MLP}.experts.{{expert}}.up_proj.weight"), GATE_UP),
    Rule(f"{_MOE}.experts.local_experts.{{expert}}.linear_fc2.weight",
         f"{_HF_MLP}.experts.{{expert}}.down_proj.weight"),
    Rule(f"{_MOE}.shared_experts.linear_fc1.weight",
         (f"{_HF_MLP}.shared_experts.gate_proj.weight",
          f"{_HF_MLP}.shared_experts.up_proj.weight"), GATE_UP,
         when=lambda c: (c.get("n_shared_experts") or 0) > 0),
    Rule(f"{_MOE}.shared_experts.linear_fc2.weight",
         f"{_HF_MLP}.shared_experts.down_proj.weight",
         when=lambda c: (c.get("n_shared_experts") or 0) > 0),
), _sparse)

DEEPSEEK_REQUIRES = {
    "hidden_act": LLAMA_REQUIRES["hidden_act"],
    "attention_bias": LLAMA_REQUIRES["attention_bias"],
    # V2 configs: every layer after the dense ones is sparse.
    "moe_layer_freq": lambda v: v == 1,
}

DEEPSEEK_V2 = register(
    FamilySpec(
        name="deepseek_v2",
        architectures=("DeepseekV2ForCausalLM",),
        config_fields=DEEPSEEK_CONFIG,
        # Softmax over all experts, the top-k weights as they are (transformers' V2 ignores
        # norm_topk_prob), a group scored by its best expert.
        constants={"moe_router_pre_softmax": True},
        weights=DEEPSEEK_WEIGHTS,
        requires={**DEEPSEEK_REQUIRES,
                  "topk_method": lambda v: v in ("greedy", "group_limited_greedy"),
                  "scoring_func": lambda v: v == "softmax"},
        validate=_validate,
        hf_kept=_mtp_tensor,
    )
)

DEEPSEEK_V3 = register(
    FamilySpec(
        name="deepseek_v3",
        architectures=("DeepseekV3ForCausalLM",),
        config_fields=DEEPSEEK_CONFIG,
        constants={"moe_router_score_function": "sigmoid",
                   "moe_router_enable_expert_bias": True},
        weights=DEEPSEEK_WEIGHTS + on_layers((
            Rule(f"{_MOE}.router.expert_bias", f"{_HF_MLP}.gate.e_score_correction_bias"),
        ), _sparse),
        requires={**DEEPSEEK_REQUIRES,
                  "topk_method": lambda v: v == "noaux_tc",
                  "scoring_func": lambda v: v == "sigmoid",
                  # Megatron-Core renormalises the chosen sigmoid scores (top-k > 1).
                  "norm_topk_prob": lambda v: bool(v)},
        validate=_validate,
        hf_kept=_mtp_tensor,
    )
)
