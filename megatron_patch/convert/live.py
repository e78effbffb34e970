"""HF weights into and out of a live, sharded Megatron-Core model, in memory.

The same weight mappings and engine as the file conversion (hf_megatron), applied to the model
this process holds at whatever TP/PP/VPP/EP layout it was built for. Which part of which tensor a
rank holds is read from Megatron-Core's own `sharded_state_dict` (as checkpoints are), so the
in-memory path splits tensors exactly as a checkpoint load would.

Memory: the mappings' transforms only move rows (fast_path.row_origins), so loading reads one HF
tensor at a time from its file (plain reads, no memory map) and each rank copies the rows its
parts take straight from it into its parameters; export gathers each HF tensor straight from the
ranks' parts. Either way one tensor is all that is held beyond the model. (A transform that is
not a row move would be run by the engine on whole tensors. Experts stacked in one HF tensor
(GPT-OSS): each rank reads it once and slices the experts it holds, so an EP rank converts only
its own; export stacks every expert's slice, gathered from the ranks that hold it.)
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_patch import checkpoint, cpu_mode
from megatron_patch.convert import engine, hf_io
from megatron_patch.convert.fast_path import row_origins
from megatron_patch.convert.hf_megatron import (
    check_hf_source,
    hf_expected_shapes,
    in_save_order,
    model_dims,
)
from megatron_patch.models import family_for
from megatron_patch.models.weight_rules import Binding, bind


@dataclass
class Shard:
    """The part of one unsharded (TP=PP=EP=1) Megatron tensor that one parameter view holds."""

    data: torch.Tensor  # a view of this rank's parameter
    region: tuple[slice, ...]  # where it sits in the unsharded tensor
    main: bool  # the one replica (over DP, and the tied output layer) that export reads


_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def _unsharded_name(key: str, prepend: tuple[int, ...], local_name: str) -> str:
    """The name the weight mappings use (the unsharded model's parameter name) for a
    ShardedTensor. Megatron-Core keys the layers and experts of a block by prepended axes
    ('decoder.layers.mlp.experts.experts.linear_fc1.weight' at offsets (layer, expert)); the
    local parameter name holds the same indices, local ones, in the same order. Where the
    layers differ (dense and MoE layers mixed), only the experts are stacked and the key spells
    the layer's global number: the name's leading indices are then the key's own (and the key
    may spell a norm by the fused name the local spec maps it to). A key with no index is the
    name itself (a tied output layer on the last stage is keyed as the embedding it copies)."""
    in_key = tuple(int(i) for i in _INDEX.findall(key))
    if not prepend and not in_key:
        return key
    indices = _INDEX.findall(local_name)
    if len(indices) != len(in_key) + len(prepend):
        raise engine.ConversionError(
            f"{local_name}: {len(indices)} indices in the name, {len(in_key)} in its checkpoint "
            f"key {key} and {len(prepend)} stacked axes")
    numbers = iter(in_key + prepend)
    return _INDEX.sub(lambda _: str(next(numbers)), local_name)


def model_shards(chunks: list[torch.nn.Module]) -> tuple[
        dict[str, list[Shard]], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """This rank's parts of each unsharded tensor, by mapping name, over its model chunks; and
    the unsharded shape and dtype of every tensor that any rank holds."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        apply_factories,
        is_main_replica,
    )

    shards: dict[str, list[Shard]] = {}
    schema: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for chunk in chunks:
        owner = {p.untyped_storage().data_ptr(): n
                 for n, p in chunk.state_dict(keep_vars=True).items()
                 if isinstance(p, torch.Tensor) and p.numel()}
        state = chunk.sharded_state_dict()
        # Factories (SwiGLU's fc1 saved as its gate and up halves) give views of the parameter.
        apply_factories(state)
        for sh in nested_values(state):
            if not isinstance(sh, ShardedTensor) or sh.data is None:
                continue
            local_name = owner.get(sh.data.untyped_storage().data_ptr())
            if local_name is None:
                raise engine.ConversionError(f"checkpoint tensor {sh.key} is not a view of any "
                                             "model tensor; it cannot be filled in place")
            p = sh.prepend_axis_num
            name = _unsharded_name(sh.key, tuple(sh.global_offset[:p]), local_name)
            region = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[p:], sh.local_shape,
                                                           strict=True))
            shards.setdefault(name, []).append(Shard(sh.data, region,
                                                     is_main_replica(sh.replica_id)))
            schema[name] = (tuple(sh.global_shape[p:]), sh.data.dtype)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        everyone: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, schema)
        schema = {n: s for part in everyone for n, s in part.items()}
    return shards, schema


def _read_file_tensor(reader: hf_io.HFCheckpointReader, name: str,
                      offsets: dict[str, dict[str, tuple[int, int]]]) -> torch.Tensor:
    """One tensor, read from its safetensors file into memory of its own: nothing stays mapped,
    so memory is this tensor's size whatever the file's. (.bin files: through `reader`.)
    `offsets`: each file's safetensors_offsets, filled as files are first read."""
    file = reader.file_of(name)
    if not file.endswith(".safetensors"):
        return reader.read(name)
    path = os.path.join(reader.path, file)
    if file not in offsets:
        offsets[file] = hf_io.safetensors_offsets(path)
    start, end = offsets[file][name]
    data = torch.empty(end - start, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(start)
        if f.readinto(data.numpy()) != end - start:
            raise OSError(f"{path}: tensor {name} is truncated")
    return data.view(reader.dtype(name)).reshape(reader.shape(name))


def _fill_rows(b: Binding, shards: list[Shard], origins: list[tuple[int | None, int, int]],
               read: Callable[[str], torch.Tensor]) -> None:
    """Fill the parts of `b`'s Megatron tensor, whose rows come from `origins` (row_origins of
    its transform), straight from its HF tensors, read one at a time: the Megatron tensor itself
    is never made."""
    for j, hf_name in enumerate([*b.hf, None]):  # None: the zero rows
        tensor = read(hf_name) if hf_name is not None else None
        for shard in shards:
            r0, r1 = shard.region[0].start, shard.region[0].stop
            position = 0
            for source, first, count in origins:
                low, high = max(position, r0), min(position + count, r1)
                if low < high and source == (j if hf_name is not None else None):
                    target = shard.data[low - r0:high - r0]
                    if tensor is None:
                        target.zero_()
                    else:
                        rows = slice(first + low - position, first + high - position)
                        target.copy_(tensor[(rows, *shard.region[1:])])
                position += count
        del tensor  # before the next one is read


def refuse_kept_tensors(family, hf_config: dict[str, Any], names: list[str], hf_dir: str
                        ) -> None:
    """A live model has no place for tensors that conversion keeps byte for byte beside the
    checkpoint (DeepSeek-V3's multi-token-prediction layer): refuse rather than drop them."""
    kept = family.kept_names(hf_config, names)
    if kept:
        raise ValueError(
            f"{hf_dir}: {len(kept)} tensors ({', '.join(kept[:3])}, ...) belong to a layer the "
            "Megatron-Core model does not build (multi-token prediction); a live model cannot "
            "hold them. Convert with `megatron-patch convert hf-to-megatron`, which keeps them "
            "beside the checkpoint and restores them on export")


def load_hf_weights(chunks: list[torch.nn.Module], hf_config: dict[str, Any], hf_dir: str,
                    padded_vocab_size: int) -> None:
    """Fill this rank's model chunks with the HF weights in `hf_dir`, file by file. Collective:
    every rank calls it (to agree which tensors exist)."""
    family = family_for(hf_config)
    args = family.model_args(hf_config)
    dims = model_dims(args, padded_vocab_size)
    bindings = bind(family.weights, hf_config, args.num_layers, args.num_moe_experts)
    reader = hf_io.HFCheckpointReader(hf_dir)
    try:
        refuse_kept_tensors(family, hf_config, reader.names(), hf_dir)
        check_hf_source(reader, hf_config, bindings, family.hf_ignore)
        shards, schema = model_shards(chunks)
        engine.check_names(bindings, source=reader.names(), target=schema,
                           direction="hf->megatron", ignore=family.hf_ignore)
        # Nothing of the model may be left as initialised: its parts must cover every weight.
        targets = [shard.data for parts in shards.values() for shard in parts]
        for chunk in chunks:
            checkpoint.check_targets_cover(chunk, targets, hf_dir)
        files = {f: i for i, f in enumerate(reader.files)}
        mine = sorted((b for b in bindings if b.megatron in shards),
                      key=lambda b: max(files[reader.file_of(n)] for n in b.hf))
        expected = {n: shape for n, (shape, _) in schema.items()}

        offsets: dict[str, dict[str, tuple[int, int]]] = {}
        # The last tensor read: a stacked experts tensor serves this rank's experts one by one.
        last: dict[str, torch.Tensor] = {}

        def read(name: str) -> torch.Tensor:
            if name not in last:
                last.clear()  # before the next one is read
                last[name] = _read_file_tensor(reader, name, offsets)
            return last[name]

        with torch.no_grad():
            for b in mine:
                shapes = [reader.shape(n) for n in b.hf]
                origins = row_origins(lambda ts, b=b: [b.transform.to_megatron(ts, dims)],
                                      shapes) if (len({s[1:] for s in shapes}) == 1
                                                  and b.expert is None) else None
                rows = None if origins is None else sum(count for *_, count in origins[0])
                if origins is not None and (rows, *shapes[0][1:]) == expected[b.megatron]:
                    _fill_rows(b, shards[b.megatron], origins[0], read)
                    continue
                # Anything else (or a wrong shape, which the engine reports): made whole.
                for name, tensor in engine.hf_to_megatron([b], dims, read, expected):
                    for shard in shards[name]:
                        shard.data.copy_(tensor[shard.region])
                    del tensor  # before the next one is read
    finally:
        reader.close()


def _gather_rows(shards: list[Shard], blocks: list[tuple[int | None, int, int]],
                 shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor made of `blocks` of rows (row_origins: (0 or None, first row, count)) of an
    unsharded tensor of `shape`, from the ranks' parts of it: each rank puts the rows its main
    replicas hold in place and zeros elsewhere, and the bytes are summed over all ranks (adding
    zero bytes to an integer is exact, where adding 0.0 would turn -0.0 into 0.0)."""
    rows = sum(count for _, _, count in blocks)
    # On the model's device: where the collective runs (NCCL needs GPU tensors).
    device = "cpu" if cpu_mode.is_enabled() else torch.cuda.current_device()
    out = torch.zeros((rows, *shape[1:]), dtype=dtype, device=device)
    for shard in shards:
        if not shard.main:
            continue
        r0, r1 = shard.region[0].start, shard.region[0].stop
        position = 0
        for source, first, count in blocks:
            low, high = max(first, r0), min(first + count, r1)
            if source is not None and low < high:
                out[(slice(position + low - first, position + high - first),
                     *shard.region[1:])] = shard.data[low - r0:high - r0]
            position += count
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(out.view(torch.uint8))
    return out


def export_hf_weights(chunks: list[torch.nn.Module], hf_config: dict[str, Any],
                      padded_vocab_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every HF tensor, in save_pretrained's order, each gathered over all
    ranks when it is yielded (on the model's device). Collective: every rank iterates it to the
    end, and every rank receives every tensor."""
    family = family_for(hf_config)
    args = family.model_args(hf_config)
    dims = model_dims(args, padded_vocab_size)
    shards, schema = model_shards(chunks)
    bindings = bind(family.weights, hf_config, args.num_layers, args.num_moe_experts)
    expected_hf = hf_expected_shapes(hf_config)
    target = expected_hf if expected_hf is not None else [n for b in bindings for n in b.hf]
    engine.check_names(bindings, source=schema, target=target, direction="megatron->hf")
    origins_cache: dict[tuple[int, tuple[int, ...]], Any] = {}
    stacks = engine.ExpertStacks()
    for b in in_save_order(bindings, None if expected_hf is None else list(expected_hf)):
        shape, dtype = schema[b.megatron]
        key = (id(b.transform), shape)
        if key not in origins_cache:
            origins_cache[key] = row_origins(
                lambda ts, b=b: b.transform.to_hf(ts[0], dims), [shape])
        # (An expert's slice of a stacked HF tensor is stacked whole with the others.)
        origins = origins_cache[key] if b.expert is None else None
        parts = shards.get(b.megatron, [])
        if origins is None:  # not a row move (KV copies are checked equal): the whole tensor
            whole = _gather_rows(parts, [(0, 0, shape[0])], shape, dtype)
            yield from engine.megatron_to_hf([b], dims, lambda _, whole=whole: whole,
                                             expected_hf, stacks=stacks)
            del whole
            continue
        for hf_name, blocks in zip(b.hf, origins, strict=True):
            tensor = _gather_rows(parts, blocks, shape, dtype)
            engine.check_shapes({hf_name: tuple(tensor.shape)}, expected_hf or {}, b.megatron)
            yield hf_name, tensor
            del tensor  # the consumer may have let it go: hold nothing while making the next
    stacks.check_complete()

