"""Megatron-Core's `torch_dist` checkpoint format, the fast way, for single-process conversion.

`UnsyncedSave` writes it without fsync; `MappedCheckpoint` reads it without copying.

Reading: Megatron-Core's loader (PyTorch DCP underneath) reads every stored chunk into a temporary
tensor and copies it into the model: two passes over fresh memory for every byte. Export only
reads, so where a tensor the model asks for is stored whole, as one chunk, this maps the
checkpoint file and returns a tensor over the chunk's bytes in place. Anything else (a chunk
split differently, because the checkpoint was saved at another TP/PP; storage transforms; an
unknown storage record) gets None, and the caller loads through Megatron-Core as usual.

The layout read here is PyTorch DCP's, as Megatron-Core writes it: `.metadata` (DCP's public
Metadata: chunk offsets and sizes per key, and for each chunk the file, byte offset and length
of its record) and `__R_T.distcp` files, each the concatenation of one `torch.save` zip per
record. A record's tensor bytes are the zip member `<archive>/data/<key>`, stored uncompressed;
the small pickle beside it says dtype, shape and strides, and is checked against the metadata.

Records follow each other at whatever byte offset the previous one ended, so about half of the
tensors start at an address their dtype is not aligned to. Typed tensors over such memory are
not safe for every kernel, so chunks come back as bytes: a uint8 tensor with one more, last,
axis of the element size. Export's transforms only rearrange whole elements along the leading
axes (split, narrow, reshape, concatenate), which is the same on these byte tensors; the result
is viewed as its dtype only when it is written out byte for byte.
"""

from __future__ import annotations

import io
import math
import mmap
import os
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from megatron_patch import checkpoint, tensor_records
from megatron_patch.convert.file_regions import FileRegions, RegionStream, address_of
from megatron_patch.errors import read_json


class UnsyncedSave(SaveShardedStrategy):
    """Megatron-Core's own `torch_dist` format (the same backend name and version, the same
    translation of its sharded tensors to PyTorch DCP, the same planner), written by DCP's
    FileSystemWriter without fsync and without CRC-32 checksums in the records.

    Megatron-Core's writer fsyncs every file, which on this kind of disk alone costs as much
    as writing it: right for a training run's checkpoints, not needed for a conversion, whose
    input is still there if the machine dies (a crashed process still leaves no
    complete-looking checkpoint: checkpoint.save renames the directory into place last).
    Checksumming the records (torch.save's zip format) was most of the time a conversion spent
    writing, at about 0.5 GB/s on one core; torch.load reads records without it
    (torch.serialization.set_crc32_options), only unzip tools would complain.

    `regions`: tensors that are mapped views of input files, or rows gathered from them
    (file_regions), are written into the records by reading those files."""

    # One writer thread: on the 2-core development VM (page cache dropped, input read once
    # before each run), 1.84 GB took 2.0-2.1 s with one thread, 2.8-3.0 s with two, 2.4-2.5 s
    # with four. Other machines are unmeasured.
    def __init__(self, thread_count: int = 1, regions: FileRegions | None = None) -> None:
        super().__init__("torch_dist", 1)
        self.thread_count = thread_count
        self.regions = regions or FileRegions()

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: dict[str, Any], checkpoint_dir: Any) -> None:
        by_key: dict[str, list[Any]] = defaultdict(list)
        for sh in nested_values(sharded_state_dict):
            by_key[sh.unique_key if isinstance(sh, ShardedObject) else sh.key].append(sh)
        writer = FileSystemWriter(str(checkpoint_dir), sync_files=False, single_file_per_rank=True,
                                  thread_count=self.thread_count)
        writer.fs = _RegionFileSystem(self.regions)
        previous = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch.distributed.checkpoint.save(mcore_to_pyt_state_dict(dict(by_key), False),
                                              storage_writer=writer,
                                              planner=MCoreSavePlanner(flatten_state_dict=False))
        finally:
            torch.serialization.set_crc32_options(previous)


class _RegionFileSystem(FileSystem):
    """DCP's local file system, writing through FileRegions (torch.save hands each storage's
    bytes to the stream in one write, so a mapped input tensor is found whole)."""

    def __init__(self, regions: FileRegions) -> None:
        self.regions = regions

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with RegionStream(os.fspath(path), self.regions) as stream:
            yield stream


class MappedCheckpoint:
    """The chunks of one checkpoint directory (`release/` or `iter_N/`), mapped read-only."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.backend = read_json(os.path.join(path, "metadata.json")).get("sharded_backend")
        self.metadata = checkpoint.read_dcp_metadata(path)  # not DCP's: it unpickles anything
        checkpoint.check_storage_files(path, self.metadata)
        self._maps: dict[str, mmap.mmap] = {}
        # Chunks handed out are views of these mappings: a writer can copy them from the files.
        self.regions = FileRegions()

    def _map(self, relative_path: str) -> mmap.mmap:
        if relative_path not in self._maps:
            full = os.path.join(self.path, relative_path)
            with open(full, "rb") as f:
                # Copy-on-write: torch.frombuffer wants a writable buffer; nothing writes.
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[relative_path] = data
            self.regions.add(address_of(data), len(data), full, 0, owner=data)
        return self._maps[relative_path]

    def chunk_bytes(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...],
                    dtype: torch.dtype) -> torch.Tensor | None:
        """The stored chunk of `key` at global `offsets` with exactly `sizes` and `dtype`, as
        bytes over the mapped file (uint8, shape sizes + (dtype's element size,)); None where
        it is not stored exactly so (the caller falls back)."""
        if self.backend != "torch_dist":
            return None
        stored = self.metadata.state_dict_metadata.get(key)
        if not isinstance(stored, TensorStorageMetadata) or not any(
                tuple(c.offsets) == offsets and tuple(c.sizes) == sizes for c in stored.chunks):
            return None
        info = self.metadata.storage_data.get(MetadataIndex(key, torch.Size(offsets)))
        if info is None or info.transform_descriptors:
            return None
        data = self._map(info.relative_path)
        try:
            start, stored_dtype, shape = tensor_records.dense_tensor_bytes(data, info.offset,
                                                                          info.length)
        except tensor_records.RECORD_ERRORS:
            return None
        numel = math.prod(sizes)
        if (stored_dtype != dtype or stored.properties.dtype != dtype or shape != sizes
                or start + numel * dtype.itemsize > len(data)):
            return None
        return torch.frombuffer(data, dtype=torch.uint8, count=numel * dtype.itemsize,
                                offset=start).view(*sizes, dtype.itemsize)
