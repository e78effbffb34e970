"""Reading a checkpoint's pickles safely: PyTorch DCP and Megatron-Core unpickle `.metadata` and
the records of non-tensor objects (RNG states) with plain pickle, which runs whatever code a
crafted file names. `verify_pickles` reads each one first, `.metadata` with a restricted
unpickler (the DCP metadata classes and the torch types their fields hold) and the others with
torch's `weights_only` loader, and refuses anything else."""

from __future__ import annotations

import enum
import importlib
import io
import mmap
import os
import pickle
import re
from dataclasses import is_dataclass
from typing import Any

import torch

# What a torch_dist checkpoint's .metadata may name: PyTorch DCP's metadata records (the
# dataclasses and enums of these modules: Megatron-Core's save also stores its save plans) and
# the torch types their fields hold. Anything else (os.system, builtins.eval, ...) is refused.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"), ("torch", "Size"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
}


class UnsafePickleError(ValueError):
    """A checkpoint file names a class or function outside what its format holds."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES:
            value = getattr(importlib.import_module(module), name, None)
            if isinstance(value, type) and value.__module__ == module and (
                    is_dataclass(value) or issubclass(value, enum.Enum)):
                return value
        elif (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickleError(f"{self.path}: refusing to unpickle {module}.{name}: a "
                                "torch_dist .metadata holds only PyTorch DCP metadata (a crafted "
                                "file can run code when read)")


def read_dcp_metadata(iteration_path: str) -> Any:
    """PyTorch DCP's Metadata of a torch_dist checkpoint directory, read safely."""
    path = os.path.join(iteration_path, ".metadata")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {iteration_path} is not a torch_dist "
                                "checkpoint")
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, path).load()
        except (EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path}: truncated or corrupt ({type(e).__name__}: {e})") from e
    _check_storage_names(metadata, path)
    return metadata


def _check_storage_names(metadata: Any, path: str) -> None:
    """Every data file a .metadata names must be a bare file name in its own directory: a
    crafted `relative_path` (`../../x`, `/etc/x`) would have the loaders read any file the
    process can, into the model's weights."""
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        name = getattr(info, "relative_path", None)
        if (not isinstance(name, str) or not name or os.path.basename(name) != name
                or name in (".", "..") or os.path.isabs(name)):
            raise ValueError(f"{path}: the record of {getattr(index, 'fqn', index)} names the "
                             f"data file {name!r}: only a file name in the checkpoint's own "
                             "directory is allowed")


def check_storage_files(iteration_path: str, metadata: Any = None) -> None:
    """Refuse a torch_dist checkpoint directory whose common.pt or .distcp files are missing,
    or whose .distcp files are shorter than its .metadata says (a truncated copy), naming the
    file."""
    common = os.path.join(iteration_path, "common.pt")
    if not os.path.isfile(common):
        # Megatron-Core writes it with every torch_dist checkpoint (the non-sharded state);
        # loading without it failed deep inside dist_checkpointing.
        raise FileNotFoundError(f"{common}: missing: the checkpoint is incomplete")
    if metadata is None:
        metadata = read_dcp_metadata(iteration_path)
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for name, size in sorted(needed.items()):
        full = os.path.join(iteration_path, name)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{full}: missing (named by {iteration_path}/.metadata)")
        held = os.path.getsize(full)
        if held < size:
            raise ValueError(f"{full}: truncated: {held} bytes, the checkpoint's .metadata "
                             f"needs {size}")
    _check_tensor_records(iteration_path, metadata)


def _check_tensor_records(iteration_path: str, metadata: Any) -> None:
    """Refuse a .metadata whose dtype or chunk shape for a tensor disagrees with the record it
    points to: loading would convert the stored values to the wrong dtype (or fail deep in
    DCP), silently. Only each record's small pickle is read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_patch.tensor_records import RECORD_ERRORS, read_record

    maps: dict[str, mmap.mmap] = {}
    try:
        for index, info in (metadata.storage_data or {}).items():
            stored = metadata.state_dict_metadata.get(index.fqn)
            if not isinstance(stored, TensorStorageMetadata) or info.transform_descriptors:
                continue
            sizes = next((tuple(c.sizes) for c in stored.chunks
                          if tuple(c.offsets) == tuple(index.offset)), None)
            full = os.path.join(iteration_path, info.relative_path)
            if info.relative_path not in maps:
                with open(full, "rb") as f:
                    maps[info.relative_path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                record = read_record(maps[info.relative_path], info.offset, info.length)
            except RECORD_ERRORS as e:
                raise ValueError(f"{full}: the record of {index.fqn} is not a tensor record "
                                 f"({type(e).__name__}: {e})") from None
            if record.dtype != stored.properties.dtype or record.shape != sizes:
                raise ValueError(
                    f"{iteration_path}/.metadata: tensor {index.fqn} is recorded as "
                    f"{stored.properties.dtype} {list(sizes or ())}, but {full} holds "
                    f"{record.dtype} {list(record.shape)}: the checkpoint is inconsistent")
    finally:
        for data in maps.values():
            data.close()


def _numpy_globals() -> list[Any]:
    """What torch.load's weights-only unpickler needs for NumPy's RNG state (an array)."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # NumPy 1
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), multiarray._reconstruct]


def refused_pickle(path: str, what: str, error: pickle.UnpicklingError) -> UnsafePickleError:
    """The error for a file that torch.load(weights_only=True) refused, naming what it names."""
    named = re.search(r"GLOBAL ([\w.]+)", str(error))
    return UnsafePickleError(f"{path}: refusing {what}: it names "
                             f"{named.group(1) if named else 'something'} that torch.load's "
                             "weights-only unpickler does not allow (a crafted file can run code "
                             "when read)")


def _weights_only_load(data: Any, path: str, what: str) -> None:
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise refused_pickle(path, what, e) from None


def verify_pickles(iteration_path: str) -> None:
    """Read every pickle of a torch_dist checkpoint directory the way nothing can run code:
    `.metadata` (DCP's, which DCP itself reads with plain pickle), `common.pt`, and each record
    of a non-tensor object in the data files (DCP reads those with torch.load(weights_only=
    False)). Refuses the directory, naming the file and what it names, otherwise. (Tensor
    records are read by DCP with weights_only=True already.)"""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_dcp_metadata(iteration_path)
    common = os.path.join(iteration_path, "common.pt")
    if os.path.isfile(common):
        _weights_only_load(common, common, "the common state")
    byte_keys = {key for key, item in metadata.state_dict_metadata.items()
                 if isinstance(item, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in byte_keys:
            continue
        path = os.path.join(iteration_path, info.relative_path)
        with open(path, "rb") as f:
            f.seek(info.offset)
            record = f.read(info.length)
        _weights_only_load(io.BytesIO(record), path, f"the record of {index.fqn}")
