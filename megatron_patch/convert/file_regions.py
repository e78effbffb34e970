"""Write tensor bytes that are mapped views of a file by reading the file, not the mapping.

Conversion mostly moves bytes unchanged: an input tensor that goes into the output as it is
sits in memory as a view of its mapped input file (safetensors maps its files; so does
distcp.MappedCheckpoint). Writing it from that memory makes the kernel fault every page of the
mapping into the process while it copies. Reading the same bytes from the file into one small
buffer, reused (so it stays in the CPU cache), and writing them from there maps nothing: on the
development VM a 1.8 GB copy took 0.48-0.93 s so (five runs), 1.1-2.2 s from a mapping, and
0.70-1.02 s with the kernel's own copy_file_range.

`FileRegions` records which memory holds which bytes of which file; `write` sends a buffer to
a file descriptor through the file where the buffer lies in a recorded region, and directly
otherwise. Recorded memory must not be written to: the file, not the memory, is what is read.
"""

from __future__ import annotations

import bisect
import errno
import io
import os
from typing import Any

import numpy as np
import torch

# Below this, one os.write from memory is cheaper than reading the file first.
_MIN_COPY_BYTES = 1 << 16
# The reused buffer: small enough to stay in the CPU cache between its read and its write.
_COPY_BUFFER_BYTES = 4 << 20
# Linux writes at most this many bytes per call (MAX_RW_COUNT).
_MAX_RW = 0x7FFFF000


def address_of(buffer: Any) -> int:
    """The memory address of a buffer (bytes, memoryview, mmap...), read-only ones too."""
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data) if len(buffer) else 0


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes, uncopied (any dtype, bfloat16 included)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class FileRegions:
    """Memory ranges that hold, unchanged, a range of a file's bytes."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[tuple[int, int, int, int]] = []  # (start, end, fd, file offset)
        self._fds: dict[str, int] = {}
        self._keep_alive: list[Any] = []
        self._buffer: memoryview | None = None
        self.copied_bytes = 0
        self.written_bytes = 0

    def add(self, address: int, nbytes: int, path: str, file_offset: int,
            owner: Any = None) -> None:
        """Memory [address, address + nbytes) holds bytes [file_offset, ...) of `path`;
        `owner` (the tensor or mapping) is kept alive so that the memory stays mapped."""
        if nbytes <= 0:
            return
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        i = bisect.bisect(self._starts, address)
        self._starts.insert(i, address)
        self._regions.insert(i, (address, address + nbytes, fd, file_offset))
        if owner is not None:
            self._keep_alive.append(owner)

    def add_tensor(self, tensor: torch.Tensor, path: str, file_offset: int) -> None:
        self.add(tensor.data_ptr(), tensor.numel() * tensor.element_size(), path, file_offset,
                 tensor)

    def find(self, address: int, nbytes: int) -> tuple[int, int] | None:
        """(file descriptor, file offset) of memory [address, address + nbytes), or None."""
        i = bisect.bisect(self._starts, address) - 1
        if i < 0:
            return None
        start, end, fd, file_offset = self._regions[i]
        if address + nbytes > end:
            return None
        return fd, file_offset + (address - start)

    def write(self, fd: int, buffer: Any) -> int:
        """Append all of `buffer` to `fd` at its current position; returns its length."""
        view = memoryview(buffer).cast("B")
        n = len(view)
        source = self.find(address_of(view), n) if n >= _MIN_COPY_BYTES else None
        if source is None:
            _write_all(fd, view)
            self.written_bytes += n
            return n
        src_fd, offset = source
        if self._buffer is None:
            self._buffer = memoryview(bytearray(_COPY_BUFFER_BYTES))
        done = 0
        while done < n:
            got = os.preadv(src_fd, [self._buffer[:min(n - done, len(self._buffer))]],
                            offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"unexpected end of a mapped input file at byte "
                              f"{offset + done} (was it changed while being converted?)")
            _write_all(fd, self._buffer[:got])
            done += got
        self.copied_bytes += n
        return n

    def close(self) -> None:
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
