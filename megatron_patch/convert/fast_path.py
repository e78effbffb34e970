"""The conversion fast path: transforms that only move rows are not computed, their outputs are
recorded as runs of the input files and written file to file (file_regions).

`row_origins` finds, by running a transform on row numbers, where each output row comes from.
`gather_from_files` is the engine `gather` that uses it: its outputs are placeholders
(file_regions.Placeholder), tensors whose memory is never written (their bytes live only in the
input files), which file_regions.FileRegions knows how to write and which refuse to be read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_patch.convert import engine
from megatron_patch.convert.file_regions import FileRegions, Placeholder
from megatron_patch.models.weight_rules import Binding


def row_origins(fn: Callable[[list[torch.Tensor]], Any],
                shapes: list[tuple[int, ...]]) -> list[list[tuple[int | None, int, int]]] | None:
    """Where each row (along dim 0) of each of fn's outputs comes from, where fn only moves
    whole rows of its inputs (of `shapes`) and adds zero rows, as every transform here does
    (they keep the trailing dimensions as they find them): for each output, blocks of
    (input index, or None for zero rows; first row; number of rows). Found by running fn on
    row numbers, twice, numbered from two different starts; None where it fails, gives back
    anything but row numbers, or the two runs disagree (fn computed with the numbers)."""
    if not shapes or any(len(shape) == 0 for shape in shapes):
        return None
    total = sum(shape[0] for shape in shapes)
    probes = [_row_probe(fn, shapes, first) for first in (1, total + 1)]
    return probes[0] if probes[0] is not None and probes[0] == probes[1] else None


def _row_probe(fn: Callable[[list[torch.Tensor]], Any], shapes: list[tuple[int, ...]],
               first_id: int) -> list[list[tuple[int | None, int, int]]] | None:
    starts, ids, base = [], [], first_id  # id 0 marks a zero row
    for shape in shapes:
        starts.append(base)
        ids.append(torch.arange(base, base + shape[0]).reshape(shape[0], *[1] * (len(shape) - 1)))
        base += shape[0]
    try:
        outputs = fn(ids)
    except (RuntimeError, ValueError, IndexError):
        return None
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    bounds = torch.tensor(starts)
    origins = []
    for out in outputs:
        if (not isinstance(out, torch.Tensor) or out.dtype != torch.int64 or out.dim() == 0
                or any(n != 1 for n in out.shape[1:])):
            return None
        rows = out.reshape(-1)
        if bool(((rows != 0) & ((rows < first_id) | (rows >= base))).any()):
            return None
        source = torch.bucketize(rows, bounds, right=True) - 1  # -1 for zero rows
        prev_rows, prev_source = torch.roll(rows, 1), torch.roll(source, 1)
        continues = torch.where(rows == 0, prev_rows == 0,
                                (rows == prev_rows + 1) & (source == prev_source))
        if len(rows):
            continues[0] = False
        breaks = continues.logical_not().nonzero().flatten().tolist() + [len(rows)]
        blocks: list[tuple[int | None, int, int]] = []
        for begin, end in zip(breaks[:-1], breaks[1:], strict=True):
            j = int(source[begin])
            blocks.append((None, 0, end - begin) if j < 0
                          else (j, int(rows[begin]) - starts[j], end - begin))
        origins.append(blocks)
    return origins


def gather_from_files(regions: FileRegions, dtype: torch.dtype, direction: str,
                       only: set[str] | None = None) -> engine.Gather:
    """An engine `gather`: where a binding's transform only moves rows (row_origins)
    of inputs that `regions` knows as runs of files, its outputs are left uninitialised and
    recorded in `regions` as those runs, so that writing them copies file to file and nothing
    is computed: they are Placeholders, named for the tensors they stand for in `direction`
    ('hf->megatron' or 'megatron->hf'). For inputs and outputs of `dtype` only (nothing
    converts the values), and, with `only`, for those Megatron tensors (the ones saved as they
    are, never cut into parts from memory)."""

    def gather(b: Binding, fn, inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        if (only is not None and b.megatron not in only) or any(
                t.dtype != dtype or not t.is_contiguous() for t in inputs) or len(
                {tuple(t.shape[1:]) for t in inputs}) != 1:
            return None
        origins = row_origins(fn, [tuple(t.shape) for t in inputs])
        if origins is None:
            return None
        names = [b.megatron] if direction == "hf->megatron" else list(b.hf)
        if len(names) != len(origins):  # computed, for the engine to name the mismatch
            return None
        outputs = []
        for name, blocks in zip(names, origins, strict=True):
            rows = sum(count for *_, count in blocks)
            target = torch.empty((rows, *inputs[0].shape[1:]), dtype=dtype)
            if not regions.add_rows(target, [(None if j is None else inputs[j], first, count)
                                             for j, first, count in blocks]):
                return None
            outputs.append(Placeholder.of(target, f"tensor {name}"))
        return outputs

    return gather
