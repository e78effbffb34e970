"""Checkpointing Megatron-Core's distributed optimizer when it runs on plain torch Adam.

Without apex or Transformer Engine (any CPU, and GPUs without them), megatron-core 0.16.1 builds
its DistributedOptimizer on `torch.optim.Adam(W)`, whose per-parameter `step` the
DistributedOptimizer keeps in the checkpoint's param groups. Three places in that path break a
resume, and all three are handled here, around megatron-core's public methods:

1. `sharded_state_dict(is_loading=True)` first calls `state_dict()`, which asserts that all
   parameters share one `step`: a new optimizer (torch allocates Adam state at the first step)
   has none, so building the load template fails. `ensure_adam_state` allocates the state
   exactly as torch's first step would (step 0, zero moments).
2. `load_state_dict` writes the saved `step` into every parameter's state and then copies the
   loaded tensors into that state key by key, `step` included, though the loaded parameter state
   has no `step` (a KeyError). `load` sets the steps aside while the tensors are copied.
3. It gives every parameter the same `step` tensor, and torch Adam increments each parameter's
   `step` in place: after a resume one update advanced the count once per parameter (wrong bias
   correction). `load` gives each parameter its own copy.
"""

from __future__ import annotations

from typing import Any

import torch


def _distributed_torch_adams(optimizer: Any) -> list[Any]:
    """The DistributedOptimizers in `optimizer` (chained or not) that run on torch Adam."""
    from megatron.core.optimizer import distrib_optimizer

    # megatron-core internal: a module flag (test_megatron_core_contract.py).
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for p in parts if isinstance(p, distrib_optimizer.DistributedOptimizer)
            and isinstance(p.optimizer, (torch.optim.Adam, torch.optim.AdamW))]


def ensure_adam_state(optimizer: Any) -> None:
    """Allocate torch Adam's state where no step has made it yet, as that step would: the
    update that follows is the same as without this."""
    for do in _distributed_torch_adams(optimizer):
        adam = do.optimizer
        for group in adam.param_groups:
            on_param = group.get("capturable") or group.get("fused")
            for p in group["params"]:
                if adam.state[p]:
                    continue
                adam.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32,
                                        device=p.device if on_param else "cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def load(optimizer: Any, state_dict: Any) -> None:
    """`optimizer.load_state_dict(state_dict)` for a state made by
    `optimizer.sharded_state_dict(..., is_loading=True)` and filled by dist_checkpointing."""
    dos = _distributed_torch_adams(optimizer)
    if not dos:
        optimizer.load_state_dict(state_dict)
        return
    # A ChainedOptimizer of several keeps one state per optimizer, by index.
    parts = [state_dict] if len(dos) == 1 else [state_dict[k] for k in sorted(state_dict)]
    if len(parts) != len(dos) or len(dos) != len(getattr(optimizer, "chained_optimizers",
                                                         [optimizer])):
        raise RuntimeError("optimizer state does not match the optimizer: "
                           f"{len(parts)} states for {len(dos)} distributed optimizers")
    param_states = []
    for part in parts:
        kind = part.pop("param_state_sharding_type", None)
        if kind != "fully_reshardable":
            raise ValueError(f"distributed optimizer state of sharding type {kind!r}: only "
                             "'fully_reshardable' (what training saves) is supported")
        param_states.append(part.pop("param_state"))
    # Param groups (lr, step), loss scaler; with the parameter state set aside.
    optimizer.load_state_dict(state_dict)
    with torch.no_grad():
        for do, param_state in zip(dos, param_states, strict=True):
            steps = {p: s.pop("step") for p, s in do.optimizer.state.items()}
            do.load_parameter_state_from_fully_reshardable(param_state)
            for p, step in steps.items():
                do.optimizer.state[p]["step"] = step.clone()


def saved_distributed(common_optimizer_state: Any) -> bool | None:
    """Whether a checkpoint's optimizer state (its common, non-sharded part) is a distributed
    optimizer's; None where the checkpoint has no optimizer state."""
    if not isinstance(common_optimizer_state, dict):
        return None
    # A ChainedOptimizer of several saves one state per optimizer, by index.
    parts = (list(common_optimizer_state.values())
             if all(isinstance(k, int) for k in common_optimizer_state)
             else [common_optimizer_state])
    return any(isinstance(p, dict) and "param_state_sharding_type" in p for p in parts)
