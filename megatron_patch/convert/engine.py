"""The one conversion engine: applies a family's weight mapping in either direction.

It accounts for every tensor. Before any tensor is read it checks, by name, that every source
tensor is consumed by exactly one binding and that every target tensor is produced; while
converting it checks each produced tensor's shape. Any mismatch is an error naming the tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from megatron_patch.models.weight_rules import Binding, Dims


class ConversionError(ValueError):
    """A conversion that would lose, invent or misshape a tensor."""


def _names(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def check_names(bindings: list[Binding], *, source: Iterable[str], target: Iterable[str],
                direction: str, ignore: tuple[str, ...] = ()) -> None:
    """Name-level accounting for `direction` 'hf->megatron' or 'megatron->hf'."""
    to_megatron = direction == "hf->megatron"
    # A stacked HF tensor is consumed once per expert, each binding taking its own slice.
    consumed_slices = [(n, b.expert) for b in bindings
                       for n in (b.hf if to_megatron else (b.megatron,))]
    consumed = [n for n, _ in consumed_slices]
    produced = [n for b in bindings for n in ((b.megatron,) if to_megatron else b.hf)]
    ignored = [re.compile(p) for p in ignore]
    source = {n for n in source if not any(p.fullmatch(n) for p in ignored)}
    target = set(target)

    problems = []
    counts: dict[str, list[int | None]] = {}
    for n, expert in consumed_slices:
        counts.setdefault(n, []).append(expert)
    duplicated = {n for n, experts in counts.items()
                  if len(experts) > 1 and (None in experts or len(set(experts)) < len(experts))}
    if duplicated:
        problems.append(f"source tensors used by more than one rule: {_names(duplicated)}")
    if missing := set(consumed) - source:
        problems.append(f"tensors the mapping needs are missing from the source: {_names(missing)}")
    if unused := source - set(consumed):
        problems.append(f"source tensors no rule consumes (they would be lost): {_names(unused)}")
    if unset := target - set(produced):
        problems.append(f"target tensors no rule produces (they would stay unset): "
                        f"{_names(unset)}")
    if unknown := set(produced) - target:
        problems.append(f"the mapping produces tensors the target does not have: "
                        f"{_names(unknown)}")
    if problems:
        raise ConversionError(f"{direction} conversion refused:\n  - " + "\n  - ".join(problems))


def check_shapes(shapes: Mapping[str, tuple[int, ...]],
                 expected: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Compare every named shape against the expected one, reporting all mismatches at once."""
    wrong = [f"{n}: {tuple(shapes[n])} (expected {tuple(expected[n])})"
             for n in sorted(set(shapes) & set(expected))
             if tuple(shapes[n]) != tuple(expected[n])]
    if wrong:
        raise ConversionError(f"{where}: tensors with the wrong shape:\n  - "
                              + "\n  - ".join(wrong))


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...] | None) -> None:
    if expected is not None and tuple(tensor.shape) != tuple(expected):
        raise ConversionError(
            f"tensor {name}: shape {tuple(tensor.shape)} does not match the expected "
            f"{tuple(expected)}"
        )


# gather(binding, fn, inputs): the list fn(inputs) would give, not computed, or None.
Gather = Callable[[Binding, Callable[[list[torch.Tensor]], list[torch.Tensor]],
                   list[torch.Tensor]], list[torch.Tensor] | None]


def _apply(b: Binding, fn: Callable[[list[torch.Tensor]], list[torch.Tensor]],
           inputs: list[torch.Tensor], gather: Gather | None) -> list[torch.Tensor]:
    result = gather(b, fn, inputs) if gather is not None else None
    return fn(inputs) if result is None else result


def hf_to_megatron(bindings: list[Binding], dims: Dims, read: Callable[[str], torch.Tensor],
                   expected_shapes: Mapping[str, tuple[int, ...]],
                   gather: Gather | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megatron name, tensor), reading HF tensors on demand through `read`. The stacked
    HF tensors of consecutive per-expert bindings are read once and held while their experts
    are sliced from them."""
    stacked: dict[str, torch.Tensor] = {}
    for b in bindings:
        if b.expert is not None and set(stacked) != set(b.hf):
            stacked.clear()  # before the next one is read
            stacked.update({n: read(n) for n in b.hf})
        try:
            if b.expert is None:
                inputs = [read(n) for n in b.hf]
            else:
                inputs = [_expert_slice(n, stacked[n], b) for n in b.hf]
            (tensor,) = _apply(b, lambda ts, b=b: [b.transform.to_megatron(ts, dims)], inputs,
                               gather if b.expert is None else None)
        except (RuntimeError, ValueError) as e:
            raise ConversionError(f"tensor {b.megatron} from {list(b.hf)}: {e}") from e
        _check_shape(b.megatron, tensor, expected_shapes.get(b.megatron))
        yield b.megatron, tensor
        # Hold nothing while the next tensor is read: the consumer may have let this one go.
        del tensor


def _expert_slice(name: str, tensor: torch.Tensor, b: Binding) -> torch.Tensor:
    if tensor.dim() == 0 or tensor.shape[0] != b.num_experts:
        raise ConversionError(f"tensor {name}: shape {tuple(tensor.shape)} does not stack "
                              f"{b.num_experts} experts along dim 0")
    return tensor[b.expert]


class ExpertStacks:
    """Export of StackedExperts bindings: collects each expert's slice of a stacked HF tensor
    and gives the whole tensor once every expert's slice is in."""

    def __init__(self) -> None:
        self.pending: dict[str, list[torch.Tensor | None]] = {}

    def add(self, b: Binding, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        slices = self.pending.setdefault(name, [None] * b.num_experts)
        if slices[b.expert] is not None:
            raise ConversionError(f"tensor {name}: expert {b.expert} given twice")
        slices[b.expert] = tensor
        if any(s is None for s in slices):
            return None
        del self.pending[name]
        return torch.stack(slices)  # type: ignore[arg-type]

    def check_complete(self) -> None:
        if self.pending:
            missing = {n: [i for i, s in enumerate(v) if s is None]
                       for n, v in self.pending.items()}
            raise ConversionError(f"stacked expert tensors left incomplete: {missing}")


def megatron_to_hf(bindings: list[Binding], dims: Dims, read: Callable[[str], torch.Tensor],
                   expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
                   gather: Gather | None = None, stacks: ExpertStacks | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor), reading Megatron tensors on demand through `read`. A stacked HF
    tensor (StackedExperts) is yielded once its last expert's binding is done: pass one
    `stacks` to several calls that share such tensors (it is checked complete when a call
    makes its own)."""
    expected_shapes = expected_shapes or {}
    own_stacks = stacks is None
    stacks = stacks or ExpertStacks()
    for b in bindings:
        try:
            parts = _apply(b, lambda ts, b=b: b.transform.to_hf(ts[0], dims), [read(b.megatron)],
                           gather if b.expert is None else None)
        except (RuntimeError, ValueError) as e:
            raise ConversionError(f"tensor {b.megatron} to {list(b.hf)}: {e}") from e
        if len(parts) != len(b.hf):
            raise ConversionError(
                f"tensor {b.megatron}: transform gave {len(parts)} tensors for {list(b.hf)}"
            )
        for name, tensor in zip(b.hf, parts, strict=True):
            if b.expert is not None and (tensor := stacks.add(b, name, tensor)) is None:
                continue
            _check_shape(name, tensor, expected_shapes.get(name))
            yield name, tensor
    if own_stacks:
        stacks.check_complete()
