"""Mixture-of-experts families on Megatron-Core's MoE layer: Mixtral, Qwen2-MoE (Qwen1.5-MoE)
and Qwen3-MoE.

Both are Llama-style decoders whose every MLP is a set of SwiGLU experts behind a top-k router.
Mixtral renormalises the top-k softmax probabilities, which equals a softmax over the top-k
logits (Megatron-Core's default routing). Qwen2-MoE takes the top-k of the softmax over all
experts as they are (Megatron-Core's pre-softmax routing), unless norm_topk_prob renormalises
them, and adds a shared expert scaled by a sigmoid gate. Qwen3-MoE routes as Qwen2-MoE without
a shared expert, adds Qwen3's q/k norms, and may keep some layers dense (mlp_only_layers,
decoder_sparse_step): Megatron-Core's per-layer moe_layer_freq.

Checkpoints keep each expert under its own name (transformers 5 fuses them in memory only);
every expert of every layer is mapped, so a missing or extra expert is a conversion error.
"""

from __future__ import annotations

import dataclasses

from megatron_patch.models.families.derived import Derived, either
from megatron_patch.models.families.llama import LLAMA_CONFIG, LLAMA_REQUIRES, LLAMA_WEIGHTS
from megatron_patch.models.families.qwen import QK_NORM, QKV_BIAS
from megatron_patch.models.registry import register
from megatron_patch.models.spec import ConfigField, FamilySpec
from megatron_patch.models.weight_rules import GATE_UP, Rule, on_layers

# Attention, norms, embeddings and output layer as in Llama; the MLP rules are the MoE's own.
_NON_MLP = tuple(r for r in LLAMA_WEIGHTS if ".mlp." not in r.megatron)
_DENSE_MLP = tuple(r for r in LLAMA_WEIGHTS if ".mlp." in r.megatron)
_MOE = "decoder.layers.{layer}.mlp"
_EXPERT = _MOE + ".experts.local_experts.{expert}"


def _expert_rules(router: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """Router and routed experts; the HF names have {layer} and {expert} placeholders."""
    return (
        Rule(f"{_MOE}.router.weight", router),
        Rule(f"{_EXPERT}.linear_fc1.weight", (gate, up), GATE_UP),
        Rule(f"{_EXPERT}.linear_fc2.weight", down),
    )


# --- Mixtral -------------------------------------------------------------------------------

_MIXTRAL_MOE = "model.layers.{layer}.block_sparse_moe"

MIXTRAL = register(
    FamilySpec(
        name="mixtral",
        architectures=("MixtralForCausalLM",),
        config_fields=LLAMA_CONFIG + (
            # Mixtral 8x7B v0.1 first shipped sliding_window=4096, later null: both are exact.
            ConfigField("sliding_window", "sliding_window", None),
            ConfigField("num_local_experts", "num_moe_experts"),
            ConfigField("num_experts_per_tok", "moe_router_topk"),
            # Every Mixtral MLP is an expert of this size.
            ConfigField("intermediate_size", "moe_ffn_hidden_size"),
            # transformers' default; only training reads it.
            ConfigField("router_aux_loss_coef", "moe_aux_loss_coeff", 0.001),
        ),
        # Top-k logits, then a softmax over them (== softmax, top-k, renormalise).
        constants={"moe_router_pre_softmax": False},
        weights=_NON_MLP + _expert_rules(
            f"{_MIXTRAL_MOE}.gate.weight",
            f"{_MIXTRAL_MOE}.experts.{{expert}}.w1.weight",
            f"{_MIXTRAL_MOE}.experts.{{expert}}.w3.weight",
            f"{_MIXTRAL_MOE}.experts.{{expert}}.w2.weight",
        ),
        # router_jitter_noise (training-time input noise) is not reproduced: eval is unaffected.
        requires={"hidden_act": LLAMA_REQUIRES["hidden_act"]},
    )
)


# --- Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B) -----------------------------------------

_QWEN_MOE = "model.layers.{layer}.mlp"
_SHARED = "model.layers.{layer}.mlp.shared_expert"

QWEN2_MOE_CONFIG = LLAMA_CONFIG + (
    ConfigField("num_experts", "num_moe_experts"),
    ConfigField("num_experts_per_tok", "moe_router_topk"),
    ConfigField("moe_intermediate_size", "moe_ffn_hidden_size"),
    ConfigField("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"),
    ConfigField("router_aux_loss_coef", "moe_aux_loss_coeff", 0.001),
    # Released configs predate the key; transformers defaults it to True.
    ConfigField("qkv_bias", "add_qkv_bias", True),
)

QWEN2_MOE_WEIGHTS = _NON_MLP + (
    dataclasses.replace(QKV_BIAS, when=lambda c: c.get("qkv_bias", True)),
) + _expert_rules(
    f"{_QWEN_MOE}.gate.weight",
    f"{_QWEN_MOE}.experts.{{expert}}.gate_proj.weight",
    f"{_QWEN_MOE}.experts.{{expert}}.up_proj.weight",
    f"{_QWEN_MOE}.experts.{{expert}}.down_proj.weight",
) + (
    Rule(f"{_MOE}.shared_experts.linear_fc1.weight",
         (f"{_SHARED}.gate_proj.weight", f"{_SHARED}.up_proj.weight"), GATE_UP),
    Rule(f"{_MOE}.shared_experts.linear_fc2.weight", f"{_SHARED}.down_proj.weight"),
    # sigmoid(x . w) scales the shared expert's output: Megatron-Core's shared expert gate.
    Rule(f"{_MOE}.shared_experts.gate_weight", f"{_QWEN_MOE}.shared_expert_gate.weight"),
)

QWEN2_MOE_REQUIRES = {
    "hidden_act": LLAMA_REQUIRES["hidden_act"],
    "use_sliding_window": lambda v: not v,
    # Every layer sparse: dense layers in between (decoder_sparse_step > 1, mlp_only_layers)
    # would need a per-layer MLP choice, which the layer spec does not make.
    "decoder_sparse_step": lambda v: v == 1,
    "mlp_only_layers": lambda v: not v,
    "num_experts": lambda v: v > 0,
    "shared_expert_intermediate_size": lambda v: v > 0,
}


def _qwen2_moe(name: str, norm_topk_prob: bool) -> FamilySpec:
    return FamilySpec(
        name=name,
        architectures=("Qwen2MoeForCausalLM",),
        config_fields=QWEN2_MOE_CONFIG,
        # Without norm_topk_prob: softmax over all experts, top-k taken as they are. With it,
        # renormalised: the same as a softmax over the top-k logits.
        constants={"moe_shared_expert_gate": True, "moe_router_pre_softmax": not norm_topk_prob},
        weights=QWEN2_MOE_WEIGHTS,
        requires=QWEN2_MOE_REQUIRES,
        applies=lambda c: bool(c.get("norm_topk_prob", False)) == norm_topk_prob,
    )


QWEN2_MOE = register(_qwen2_moe("qwen2_moe", norm_topk_prob=False))
QWEN2_MOE_NORM_TOPK = register(_qwen2_moe("qwen2_moe_norm_topk", norm_topk_prob=True))


# --- Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B) --------------------------------------------


def qwen3_moe_sparse(cfg: dict, layer: int) -> bool:
    """transformers' Qwen3MoeDecoderLayer choice: experts unless the layer is in mlp_only_layers
    or off the decoder_sparse_step grid (then a dense MLP of intermediate_size)."""
    return (layer not in (cfg.get("mlp_only_layers") or [])
            and (layer + 1) % cfg.get("decoder_sparse_step", 1) == 0)


def _qwen3_moe_layer_freq(cfg: dict) -> tuple[int, ...] | None:
    pattern = tuple(int(qwen3_moe_sparse(cfg, i)) for i in range(cfg["num_hidden_layers"]))
    return None if all(pattern) else pattern


QWEN3_MOE = register(
    FamilySpec(
        name="qwen3_moe",
        architectures=("Qwen3MoeForCausalLM",),
        config_fields=LLAMA_CONFIG + (
            # Released configs say num_experts; transformers 5 writes its alias num_local_experts.
            ConfigField("num_experts", "num_moe_experts", either("num_local_experts")),
            ConfigField("num_experts_per_tok", "moe_router_topk"),
            ConfigField("moe_intermediate_size", "moe_ffn_hidden_size"),
            ConfigField("router_aux_loss_coef", "moe_aux_loss_coeff", 0.001),
            # Softmax over all experts, top-k as they are (transformers' default False); with
            # norm_topk_prob renormalised, i.e. a softmax over the top-k logits.
            ConfigField("norm_topk_prob", "moe_router_pre_softmax", True,
                        to_megatron=lambda v: not v, to_hf=lambda v: not v),
            Derived("mlp_only_layers", "moe_layer_freq", _qwen3_moe_layer_freq),
        ),
        constants={"qk_layernorm": True},
        weights=_NON_MLP + QK_NORM
        + on_layers(_DENSE_MLP, lambda c, i: not qwen3_moe_sparse(c, i))
        + on_layers(_expert_rules(
            f"{_QWEN_MOE}.gate.weight",
            f"{_QWEN_MOE}.experts.{{expert}}.gate_proj.weight",
            f"{_QWEN_MOE}.experts.{{expert}}.up_proj.weight",
            f"{_QWEN_MOE}.experts.{{expert}}.down_proj.weight",
        ), qwen3_moe_sparse),
        requires={"hidden_act": LLAMA_REQUIRES["hidden_act"],
                  "attention_bias": LLAMA_REQUIRES["attention_bias"],
                  "use_sliding_window": lambda v: not v,
                  "num_experts": lambda v: v > 0,
                  "num_local_experts": lambda v: v > 0,
                  "decoder_sparse_step": lambda v: v >= 1},
    )
)
