"""Write tensor bytes that are mapped views of a file by reading the file, not the mapping.

Conversion mostly moves bytes unchanged: an input tensor that goes into the output as it is
sits in memory as a view of its mapped input file (safetensors maps its files; so does
distcp.MappedCheckpoint). Writing it from that memory makes the kernel fault every page of the
mapping into the process while it copies. Reading the same bytes from the file into one small
buffer, reused (so it stays in the CPU cache), and writing them from there maps nothing: on the
development VM a 1.8 GB copy took 0.48-0.93 s that way (five runs), 1.1-2.2 s from a mapping, and
0.70-1.02 s with the kernel's own copy_file_range.

`FileRegions` records which memory holds which bytes of which file; `write` sends a buffer to
a file descriptor through the file where the buffer lies in a recorded region, and directly
otherwise. Recorded memory must not be written to: the file, not the memory, is what is read.
A region may also be memory never written at all, standing for rows gathered from such views
(a fused q/k/v, a vocabulary padded with zero rows: `add_rows`, fast_path.row_origins), so
that nothing is computed in memory for transforms that only move rows. Two threads copy the
chunks of a large buffer (on the 2-core VM: 0.40-0.45 s for 1.8 GB against 0.48 with one).
"""

from __future__ import annotations

import bisect
import errno
import io
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

# The reused buffer: small enough to stay in the CPU cache between its read and its write.
_COPY_BUFFER_BYTES = 4 << 20
# Threads copying the chunks of one large buffer (each reads while another writes).
_COPY_THREADS = min(2, os.cpu_count() or 1)
# Linux writes at most this many bytes per call (MAX_RW_COUNT).
_MAX_RW = 0x7FFFF000


def address_of(buffer: Any) -> int:
    """The memory address of a buffer (bytes, memoryview, mmap...), read-only ones too."""
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data) if len(buffer) else 0


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes, uncopied (any dtype, bfloat16 included); a Placeholder's
    too, for `FileRegions.write`, which sends them from the files."""
    if isinstance(tensor, Placeholder):
        tensor = tensor.as_subclass(torch.Tensor)
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class PlaceholderReadError(RuntimeError):
    """Something tried to read a Placeholder's values, which exist only in the input files."""


# What a Placeholder allows: what a writer asks about its memory (nothing reads a value) ...
_PLACEHOLDER_METADATA = frozenset({
    "__get__", "__hash__", "__len__", "data_ptr", "dim", "element_size", "get_device",
    "is_complex", "is_contiguous", "is_floating_point", "is_pinned", "ndimension", "nelement",
    "numel", "size", "storage", "storage_offset", "stride", "untyped_storage", "_typed_storage",
})
# ... and views, which stay placeholders over the same memory (checked: a view that would copy
# is refused after the fact, before anything sees the copy).
_PLACEHOLDER_VIEWS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "squeeze", "unsqueeze", "flatten",
    "unflatten", "narrow", "select", "split", "chunk", "unbind", "detach", "contiguous", "to",
    "cpu", "__getitem__", "t", "transpose", "permute", "as_strided",
})


class Placeholder(torch.Tensor):
    """A tensor whose memory was never written: its bytes exist only in input files, recorded
    in a FileRegions (`add_rows`), and only the writers that go through FileRegions (the
    safetensors writer, torch.save into a RegionStream) put them anywhere. Anything else that
    would read its values (any torch op on them, `.tolist()`, arithmetic, comparison,
    printing) raises PlaceholderReadError naming it: it would see uninitialised memory.
    Metadata and views (of the same memory, still placeholders) are allowed; so is pickling,
    as the plain tensor it stands for (torch.save writes its storage through the stream).

    `name`: the tensor's name in the conversion, for the error."""

    name: str = "a conversion placeholder"

    @staticmethod
    def of(tensor: torch.Tensor, name: str) -> Placeholder:
        placeholder = tensor.as_subclass(Placeholder)
        placeholder.name = name
        return placeholder

    def __reduce_ex__(self, protocol: int) -> Any:
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        what = getattr(func, "__name__", str(func))
        source = _first_placeholder((*args, *(kwargs or {}).values()))
        is_view = what in _PLACEHOLDER_VIEWS and bool(args) and isinstance(args[0], Placeholder)
        if what not in _PLACEHOLDER_METADATA and not is_view:
            raise PlaceholderReadError(cls._refusal(source, what))
        result = super().__torch_function__(func, types, args, kwargs or {})
        if is_view:
            storage = source.as_subclass(torch.Tensor).untyped_storage().data_ptr()
            outputs = result if isinstance(result, (tuple, list)) else (result,)
            for out in outputs:
                if out.untyped_storage().data_ptr() != storage:
                    raise PlaceholderReadError(cls._refusal(source, f"{what} (a copy)"))
                out.name = source.name
        return result

    @staticmethod
    def _refusal(source: Placeholder | None, what: str) -> str:
        name = source.name if source is not None else Placeholder.name
        return (f"{name} is a conversion placeholder (memory never written; its bytes "
                f"are runs of the input files, written out by file_regions.FileRegions): "
                f"{what} would read its values")


# A run of a region's bytes: (file descriptor, or ZEROS for zero bytes; file offset; length).
Piece = tuple[int, int, int]
ZEROS = -1


class FileRegions:
    """Memory ranges whose bytes are known to be runs of files' bytes (or zeros).

    A region is either memory that holds the file bytes (a mapped view, `add`), or memory
    never written that stands for rows gathered from such views (`add_rows`): its bytes exist
    only in the files, so it must only ever be written out through `write`."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[tuple[int, int, tuple[Piece, ...]]] = []  # (start, end, pieces)
        self._fds: dict[str, int] = {}
        self._keep_alive: list[Any] = []
        self._local = threading.local()  # each copying thread's buffer
        self._zeros: memoryview | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.copy_threads = _COPY_THREADS
        self.copied_bytes = 0  # through the files, for tests and benchmarks

    def _add(self, address: int, nbytes: int, pieces: tuple[Piece, ...], owner: Any) -> None:
        i = bisect.bisect(self._starts, address)
        self._starts.insert(i, address)
        self._regions.insert(i, (address, address + nbytes, pieces))
        if owner is not None:
            self._keep_alive.append(owner)

    def add(self, address: int, nbytes: int, path: str, file_offset: int,
            owner: Any = None) -> None:
        """Memory [address, address + nbytes) holds bytes [file_offset, ...) of `path`;
        `owner` (the tensor or mapping) is kept alive so that the memory stays mapped."""
        if nbytes <= 0:
            return
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._add(address, nbytes, ((fd, file_offset, nbytes),), owner)

    def add_tensor(self, tensor: torch.Tensor, path: str, file_offset: int) -> None:
        self.add(tensor.data_ptr(), tensor.numel() * tensor.element_size(), path, file_offset,
                 tensor)

    def add_rows(self, target: torch.Tensor,
                 blocks: list[tuple[torch.Tensor | None, int, int]]) -> bool:
        """Record the uninitialised, contiguous `target` as, block after block, `count` rows
        of `source` from row `first` (source None: zero rows). False, recording nothing,
        unless every source block is itself known here."""
        row_bytes = math.prod(target.shape[1:]) * target.element_size()
        pieces: list[Piece] = []
        for source, first, count in blocks:
            found = ([(ZEROS, 0, count * row_bytes)] if source is None
                     else self._rows_of(source, first, count, row_bytes))
            if found is None:
                return False
            for piece in found:  # runs that continue each other are one run
                fd, offset, length = pieces[-1] if pieces else (None, 0, 0)
                if piece[0] == fd and (fd == ZEROS or offset + length == piece[1]):
                    pieces[-1] = (fd, offset, length + piece[2])
                else:
                    pieces.append(piece)
        if sum(length for *_, length in pieces) != target.numel() * target.element_size():
            return False
        if pieces:
            self._add(target.data_ptr(), target.numel() * target.element_size(), tuple(pieces),
                      target)
        return True

    def _rows_of(self, source: torch.Tensor, first: int, count: int,
                 row_bytes: int) -> list[Piece] | None:
        if not source.is_contiguous() or source.element_size() * math.prod(
                source.shape[1:]) != row_bytes:
            return None
        return self.find(source.data_ptr() + first * row_bytes, count * row_bytes)

    def find(self, address: int, nbytes: int) -> list[Piece] | None:
        """The pieces that make up memory [address, address + nbytes), or None."""
        i = bisect.bisect(self._starts, address) - 1
        if i < 0 or nbytes <= 0:
            return None
        start, end, pieces = self._regions[i]
        if address + nbytes > end:
            return None
        skip, found = address - start, []
        for fd, offset, length in pieces:
            if skip >= length:
                skip -= length
                continue
            take = min(length - skip, nbytes)
            found.append((fd, offset + skip if fd != ZEROS else 0, take))
            nbytes -= take
            skip = 0
            if not nbytes:
                break
        return found

    def write(self, fd: int, buffer: Any) -> int:
        """Append all of `buffer` to `fd` at its current position; returns its length."""
        view = memoryview(buffer).cast("B")
        n = len(view)
        # Always looked up, however small: rows recorded by add_rows exist only in the files.
        pieces = self.find(address_of(view), n)
        if pieces is None:
            _write_all(fd, view)
            return n
        position = os.lseek(fd, 0, os.SEEK_CUR)
        chunks, at = [], position
        for src_fd, offset, length in pieces:
            chunks += [(src_fd, offset + i, fd, at + i, min(_COPY_BUFFER_BYTES, length - i))
                       for i in range(0, length, _COPY_BUFFER_BYTES)]
            at += length
        if len(chunks) == 1 or self.copy_threads == 1:
            for chunk in chunks:
                self._copy_chunk(*chunk)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.copy_threads,
                                                thread_name_prefix="file_regions")
            list(self._pool.map(lambda chunk: self._copy_chunk(*chunk), chunks))
        os.lseek(fd, position + n, os.SEEK_SET)
        self.copied_bytes += n
        return n

    def _copy_chunk(self, src_fd: int, offset: int, fd: int, position: int, n: int) -> None:
        if src_fd == ZEROS:
            if self._zeros is None:
                self._zeros = memoryview(bytes(_COPY_BUFFER_BYTES))
            buffer = self._zeros
        else:
            buffer = getattr(self._local, "buffer", None)
            if buffer is None:
                buffer = self._local.buffer = memoryview(bytearray(_COPY_BUFFER_BYTES))
            got = 0
            while got < n:
                read = os.preadv(src_fd, [buffer[got:n]], offset + got)
                if read == 0:
                    raise OSError(errno.EIO, f"unexpected end of a mapped input file at byte "
                                  f"{offset + got} (was it changed while being converted?)")
                got += read
        done = 0
        while done < n:
            done += os.pwrite(fd, buffer[done:n], position + done)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._starts.clear()
        self._regions.clear()
        self._keep_alive.clear()

    def __enter__(self) -> FileRegions:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _first_placeholder(values: tuple) -> Placeholder | None:
    """The first Placeholder among an op's arguments, or in a list of them (torch.cat's)."""
    for value in values:
        if isinstance(value, Placeholder):
            return value
        if isinstance(value, (list, tuple)):
            found = _first_placeholder(tuple(value))
            if found is not None:
                return found
    return None


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:done + _MAX_RW])


class RegionStream(io.RawIOBase):
    """A write-only file whose writes go through `FileRegions.write`."""

    def __init__(self, path: str, regions: FileRegions) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                           | getattr(os, "O_CLOEXEC", 0), 0o644)
        self._regions = regions

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        return self._regions.write(self._fd, b)

    def tell(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        return os.lseek(self._fd, pos, whence)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
