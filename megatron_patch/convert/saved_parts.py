"""How a Megatron-Core model's parameters map onto the pieces its checkpoint saves them in
(ShardedTensors: the whole parameter, or views of its parts where a factory splits it), so that
conversion can hand each piece its tensor, or take it, without building the model's weights."""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from megatron_patch import checkpoint
from megatron_patch.convert import engine
from megatron_patch.models.weight_rules import Binding, Concat


def parameters(model) -> dict[str, torch.Tensor]:
    """The model's weights by state-dict name (extra states are not weights)."""
    return {n: p for n, p in model.state_dict(keep_vars=True).items()
            if not n.endswith("_extra_state")}


def saved_state(model, params: dict[str, torch.Tensor]) -> tuple[
        dict[str, Any], dict[str, list[ShardedTensor]]]:
    """The model's checkpoint state with its factories applied, and the pieces each parameter
    is saved in (parts_by_parameter)."""
    state = checkpoint.model_state(model)
    apply_factories(state)
    return state, parts_by_parameter(params, state)


def parts_by_parameter(params: dict[str, torch.Tensor],
                        state: dict[str, Any]) -> dict[str, list[ShardedTensor]]:
    """For each parameter, the ShardedTensors that save it, in storage order: one holding the
    whole parameter or, where a factory has split it (SwiGLU's linear_fc1 into its gate and up
    halves), one view per part. Found by storage: a part's data is a view of its parameter."""
    owner = {p.untyped_storage().data_ptr(): name for name, p in params.items() if p.numel()}
    parts: dict[str, list[ShardedTensor]] = {name: [] for name in params}
    for sh in nested_values(state):
        if isinstance(sh, ShardedTensor) and sh.data is not None:
            name = owner.get(sh.data.untyped_storage().data_ptr())
            if name is not None:
                parts[name].append(sh)
    if unsaved := sorted(n for n, found in parts.items() if not found and params[n].numel()):
        raise engine.ConversionError(f"parameters missing from the model's checkpoint state (they "
                                     f"would be converted, then lost): {unsaved}")
    for found in parts.values():
        found.sort(key=lambda sh: sh.data.storage_offset())
    return parts


def concatenates(b: Binding) -> bool:
    """Whether `b` stacks its HF tensors along dim 0 into the Megatron tensor (Concat)."""
    return type(b.transform).to_megatron is Concat.to_megatron


def views_are_pieces(b: Binding, piece_shapes: list[tuple[int, ...]], param: torch.Tensor,
                      views: list[torch.Tensor]) -> bool:
    """Whether `b` concatenates its HF tensors (of `piece_shapes`) along dim 0 into a parameter
    that is saved in exactly those pieces (`views` of it: row blocks of the same sizes, in the
    same order), so that each piece can go between the two sides as it is, never concatenated
    (and cut apart again by Megatron-Core)."""
    if not concatenates(b):
        return False
    if len(views) != len(b.hf) or len(piece_shapes) != len(b.hf) or not param.is_contiguous():
        return False
    offset = param.storage_offset()
    for view, shape in zip(views, piece_shapes, strict=True):
        if (not view.is_contiguous() or view.storage_offset() != offset
                or tuple(view.shape) != tuple(shape) or view.shape[1:] != param.shape[1:]):
            return False
        offset += view.numel()
    return offset == param.storage_offset() + param.numel()


def region(whole: torch.Tensor, param: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """The part of `whole` (laid out like the contiguous `param`, possibly with trailing axes
    of its own, such as export's byte axis) that `view`, a view of `param`, covers."""
    tail, tail_strides = whole.shape[param.dim():], whole.stride()[param.dim():]
    per_element = math.prod(tail)
    return whole.as_strided(
        (*view.shape, *tail), (*(s * per_element for s in view.stride()), *tail_strides),
        whole.storage_offset() + (view.storage_offset() - param.storage_offset()) * per_element)


def is_whole(view: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether `view`, a view of `param` that saves it, covers the whole parameter."""
    return view.shape == param.shape and view.storage_offset() == param.storage_offset()


def fill_parts(pieces: list[ShardedTensor], param: torch.Tensor, tensor: torch.Tensor) -> None:
    """Give each ShardedTensor that saves `param` its part of the converted `tensor`."""
    dense = None
    for sh in pieces:
        view = sh.data
        if is_whole(view, param):
            sh.data = tensor
            continue
        # A part: its view's strides and offset are the parameter's, which must be dense too.
        if not param.is_contiguous():
            raise engine.ConversionError(f"a part of a non-contiguous parameter: {sh.key}")
        dense = tensor.contiguous() if dense is None else dense
        # A copy of its own: Megatron-Core's writer clones every view before writing, all of them
        # at once, while the whole tensors are still held.
        sh.data = region(dense, param, view).clone()
