"""The records of a `torch_dist` checkpoint's data files, read without building tensors.

Each `__R_T.distcp` file is the concatenation of one `torch.save` zip per record. A record's
tensor bytes are the zip member `<archive>/data/<key>`, stored uncompressed; the small pickle
beside it (`data.pkl`) says dtype, shape and strides. Reading that pickle alone tells what a
record holds: the checkpoint's `.metadata` is checked against it, and export maps the bytes in
place (convert/distcp.py)."""

from __future__ import annotations

import io
import math
import mmap
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

# torch.save pickles a tensor's storage by its legacy typed-storage class name.
_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip local file header's fixed part


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


@dataclass(frozen=True)
class Record:
    """One tensor record: its dtype and shape, and where its storage's bytes are."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # in elements
    storage_numel: int
    storage_start: int  # absolute byte offset of the storage in the mapped file
    storage_bytes: int
    byte_order: str


# What reading a record that is not a plain torch.save tensor raises.
RECORD_ERRORS = (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError, TypeError,
                 EOFError, struct.error)


def read_record(data: mmap.mmap, offset: int, length: int) -> Record:
    """The tensor record at [offset, offset + length) of `data`; one of RECORD_ERRORS unless
    it is a torch.save of one tensor with an uncompressed storage."""
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
    byte_order = member_bytes(order).decode() if order is not None else "little"
    (dtype, key, storage_numel), storage_offset, shape, stride = _TensorRecord(
        io.BytesIO(member_bytes(members[pickles[0]]))).load()
    member = members[f"{prefix}data/{key}"]
    return Record(dtype, shape, stride, storage_offset, storage_numel, member_start(member),
                  member.file_size, byte_order)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def dense_tensor_bytes(data: mmap.mmap, offset: int,
                       length: int) -> tuple[int, torch.dtype, tuple[int, ...]]:
    """Absolute byte offset, dtype and shape of the tensor in the torch.save record at
    [offset, offset + length); ValueError unless it is one dense little-endian tensor."""
    record = read_record(data, offset, length)
    if record.byte_order != sys.byteorder:
        raise ValueError("byte order differs")
    if (record.storage_bytes != record.storage_numel * record.dtype.itemsize
            or record.stride != _contiguous_strides(record.shape)
            or record.storage_offset + math.prod(record.shape) > record.storage_numel):
        raise ValueError("not one dense tensor")
    return (record.storage_start + record.storage_offset * record.dtype.itemsize, record.dtype,
            record.shape)
