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
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict, defaultdict
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

from megatron_patch import checkpoint
from megatron_patch.convert.file_regions import FileRegions, RegionStream, address_of
from megatron_patch.errors import read_json

# torch.save pickles a tensor's storage by its legacy typed-storage class name.
_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip local file header (its fixed part)


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


class _Window(io.RawIOBase):
    """A read-only file over bytes [start, start + length) of a mapped file, so that zipfile
    sees one record as a whole archive (it reads only the directory at the end and headers)."""

    def __init__(self, data: mmap.mmap, start: int, length: int) -> None:
        self._data, self._start, self._length, self._pos = data, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        end = min(self._length, self._pos + len(buffer))
        n = max(0, end - self._pos)
        buffer[:n] = self._data[self._start + self._pos:self._start + end]
        self._pos += n
        return n


class _TensorRecord(pickle.Unpickler):
    """Reads the pickle torch.save writes for one tensor without building it: the storage it
    names and the view (offset, size, stride) into it. Any other pickle is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size),
                                                              tuple(stride))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"not a plain tensor record: {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        kind, dtype, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return dtype, key, numel


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


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
            start, stored_dtype, shape = self._tensor_bytes(data, info.offset, info.length)
        except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError, TypeError):
            return None
        numel = math.prod(sizes)
        if (stored_dtype != dtype or stored.properties.dtype != dtype or shape != sizes
                or start + numel * dtype.itemsize > len(data)):
            return None
        return torch.frombuffer(data, dtype=torch.uint8, count=numel * dtype.itemsize,
                                offset=start).view(*sizes, dtype.itemsize)

    @staticmethod
    def _tensor_bytes(data: mmap.mmap, offset: int,
                      length: int) -> tuple[int, torch.dtype, tuple[int, ...]]:
        """Absolute byte offset, dtype and shape of the tensor in the torch.save record at
        [offset, offset + length); ValueError unless it is one dense little-endian tensor."""
        archive = zipfile.ZipFile(_Window(data, offset, length))
        members = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in members if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError("not a torch.save record")
        prefix = pickles[0].removesuffix("data.pkl")

        def member_start(info: zipfile.ZipInfo) -> int:
            """Where a stored member's bytes begin. (Read directly, not with zipfile's read:
            records saved without CRC-32 would fail its check.)"""
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"compressed member {info.filename}")
            at = offset + info.header_offset
            signature, *_, name_length, extra_length = _LOCAL_HEADER.unpack(
                data[at:at + _LOCAL_HEADER.size])
            if signature != b"PK\x03\x04":
                raise ValueError("bad zip local header")
            return at + _LOCAL_HEADER.size + name_length + extra_length

        def member_bytes(info: zipfile.ZipInfo) -> bytes:
            start = member_start(info)
            return data[start:start + info.file_size]

        order = members.get(prefix + "byteorder")
        if (member_bytes(order).decode() if order is not None else "little") != sys.byteorder:
            raise ValueError("byte order differs")
        (dtype, key, storage_numel), storage_offset, shape, stride = _TensorRecord(
            io.BytesIO(member_bytes(members[pickles[0]]))).load()
        member = members[f"{prefix}data/{key}"]
        if (member.file_size != storage_numel * dtype.itemsize
                or stride != _contiguous_strides(shape)
                or storage_offset + math.prod(shape) > storage_numel):
            raise ValueError("not one dense tensor")
        return member_start(member) + storage_offset * dtype.itemsize, dtype, shape
