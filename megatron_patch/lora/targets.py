"""Which linears of a built model can carry a LoRA adapter, and which the user's target names
select.

A site is one Megatron-Core linear (`linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2`, also
inside MoE experts and shared experts) together with the family's weight rule that maps it to
Hugging Face modules: `linear_qkv` <- q_proj, k_proj, v_proj (Llama), `linear_fc1` <- gate_proj,
up_proj, ... Each of those HF modules is a *part* of the site: the rows of the fused Megatron
output that belong to it are found by running the rule's own transform on row numbers, so an
adapter's B splits into per-projection PEFT adapters exactly as the weight does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from megatron_patch.models import family_for
from megatron_patch.models.weight_rules import Binding, Dims, bind

# Function-level imports: models.inference_linear and convert.hf_megatron import
# megatron.core; matching target names does not need it.

MEGATRON_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2",
                    # multi-latent attention (DeepSeek)
                    "linear_q_proj", "linear_q_down_proj", "linear_q_up_proj",
                    "linear_kv_down_proj", "linear_kv_up_proj")
ALL_LINEAR = "all-linear"
COLUMN, ROW = "column", "row"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """One adaptable linear of this rank's model."""

    name: str  # global Megatron module name, e.g. decoder.layers.3.self_attention.linear_qkv
    module: torch.nn.Module
    kind: str  # COLUMN (output rows split over TP) or ROW (input columns split over TP)
    parts: tuple[str, ...]  # HF module paths, e.g. model.layers.3.self_attn.q_proj
    rows: tuple[torch.Tensor, ...]  # per part: its rows of the whole (TP=1) fused output
    swiglu: bool  # a gated linear_fc1: TP splits its gate and up halves separately
    refusal: str | None = None  # why this linear cannot carry an adapter (then no parts)

    def short(self, part: int) -> str:
        return self.parts[part].rsplit(".", 1)[-1]


def _linear_classes() -> dict[type, str]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_patch.models.inference_linear import (
        InferenceColumnParallelLinear,
        InferenceRowParallelLinear,
    )

    return {ColumnParallelLinear: COLUMN, InferenceColumnParallelLinear: COLUMN,
            RowParallelLinear: ROW, InferenceRowParallelLinear: ROW}


def _global_names(model) -> list[tuple[str, torch.nn.Module]]:
    """(global name, module) of every candidate linear of this pipeline stage: layer numbers
    and expert indices as the family's weight rules count them (the whole model's)."""
    from megatron.core import parallel_state

    found = []
    for layer in model.decoder.layers:
        prefix = f"decoder.layers.{layer.layer_number - 1}."
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        local = getattr(experts, "local_experts", None)
        first_expert = (parallel_state.get_expert_model_parallel_rank() * len(local)
                        if local is not None else 0)
        for name, module in layer.named_modules():
            if name.rsplit(".", 1)[-1] not in MEGATRON_LINEARS:
                continue
            parts = name.split(".")
            if parts[:3] == ["mlp", "experts", "local_experts"]:
                parts[3] = str(first_expert + int(parts[3]))
            found.append((prefix + ".".join(parts), module))
    return found


def _part_rows(b: Binding, dims: Dims, out_rows: int) -> tuple[torch.Tensor, ...] | str:
    """The rows of the fused output each HF module of `b` holds: the rule's transform applied
    to row numbers (transforms only move whole rows); or why they cannot be told apart."""
    if dims.kv_replicas > 1 and b.megatron.endswith("linear_qkv.weight"):
        return (f"the model's KV head(s) are built as {dims.kv_replicas} copies each (multi-query "
                "attention, see the README), whose adapters would train apart and could not be "
                "exported as one HF adapter")
    try:
        rows = b.transform.to_hf(torch.arange(out_rows), dims)
    except (NotImplementedError, ValueError) as e:
        return f"its HF weights cannot be told apart row by row ({e})"
    if len(rows) != len(b.hf) or not torch.equal(torch.cat(rows).sort().values,
                                                  torch.arange(out_rows)):
        return f"its rows do not split into the HF modules {list(b.hf)} one to one"
    return tuple(rows)


def sites(model, hf_config: dict[str, Any], args, padded_vocab_size: int) -> list[Site]:
    """Every adaptable linear of this rank's model chunk, with its HF parts."""
    from megatron_patch.convert.hf_megatron import model_dims

    bindings = {b.megatron: b for b in bind(family_for(hf_config).weights, hf_config,
                                            args.num_layers, args.num_moe_experts)}
    dims = model_dims(args, padded_vocab_size)
    classes = _linear_classes()
    found = []
    for name, module in _global_names(model):
        binding = bindings.get(name + ".weight")
        kind = classes.get(type(module))
        if binding is None or any(not h.endswith(".weight") for h in binding.hf):
            found.append(Site(name, module, "", (), (), False, "it has no Hugging Face "
                              "counterpart that peft could adapt"))
            continue
        parts = tuple(h.removesuffix(".weight") for h in binding.hf)
        if kind is None:
            found.append(Site(name, module, "", parts, (), False, f"its forward "
                              f"({type(module).__name__}) does more than the linear (a fused or "
                              "following norm), so an adapter beside it would not be peft's"))
            continue
        out_rows = module.weight.shape[0] * (1 if kind == ROW else _tp_size(module))
        swiglu = name.endswith("linear_fc1") and module.config.gated_linear_unit
        rows = _part_rows(binding, dims, out_rows)
        if isinstance(rows, str):
            found.append(Site(name, module, "", parts, (), swiglu, rows))
        else:
            found.append(Site(name, module, kind, parts, rows, swiglu))
    return found


def _tp_size(module: torch.nn.Module) -> int:
    from megatron.core.utils import get_pg_size

    return get_pg_size(module.tp_group)


def known_names(all_sites: list[Site]) -> list[str]:
    present = {s.name.rsplit(".", 1)[-1] for s in all_sites}
    hf = sorted({s.short(i) for s in all_sites for i in range(len(s.parts))})
    return [ALL_LINEAR, *(n for n in MEGATRON_LINEARS if n in present), *hf]


def select(all_sites: list[Site], targets: list[str]) -> dict[str, tuple[int, ...]]:
    """site name -> the indices of its parts the target names select (sites with none are
    left out). Megatron names select every part of a fused linear (linear_qkv = q, k and v:
    one adapter each, as peft's q_proj, k_proj, v_proj); HF names select one part; all-linear
    selects every part of every site that can carry an adapter (peft: all linears but the
    output layer; the others are logged). Naming a linear that cannot is refused."""
    known = known_names(all_sites)
    if unknown := [t for t in targets if t not in known]:
        raise ValueError(f"--lora-target-modules: unknown module name(s) {unknown}; this model "
                         f"has {', '.join(known)}")
    chosen: dict[str, tuple[int, ...]] = {}
    skipped = []
    for s in all_sites:
        last = s.name.rsplit(".", 1)[-1]
        named = last in targets or any(s.short(i) in targets for i in range(len(s.parts)))
        if s.refusal is not None:
            if named:
                raise ValueError(f"--lora-target-modules: {s.name} cannot carry an adapter: "
                                 f"{s.refusal}; leave it out of the targets")
            if ALL_LINEAR in targets:
                skipped.append(f"{s.name} ({s.refusal})")
            continue
        if ALL_LINEAR in targets or last in targets:
            chosen[s.name] = tuple(range(len(s.parts)))
        elif picked := tuple(i for i in range(len(s.parts)) if s.short(i) in targets):
            chosen[s.name] = picked
    if skipped:
        log.warning("all-linear leaves out %d linear(s) that cannot carry an adapter, e.g. %s",
                    len(skipped), skipped[0])
    return chosen


def hf_modules(hf_config: dict[str, Any], args) -> set[str]:
    """The HF module paths of every adaptable linear of the whole model (all stages)."""
    return {h.removesuffix(".weight")
            for b in bind(family_for(hf_config).weights, hf_config, args.num_layers,
                          args.num_moe_experts)
            if b.megatron.removesuffix(".weight").rsplit(".", 1)[-1] in MEGATRON_LINEARS
            for h in b.hf}
