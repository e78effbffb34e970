"""Megatron-LM's pickles (legacy rank files, common.pt), read with torch.load(weights_only=True)
and an allow-list, scoped to the call, of the types Megatron-LM stores there: anything else is
refused, naming the file and the class, before anything is unpickled; `trust_pickle` lifts that
for a file the user trusts."""

from __future__ import annotations

import argparse
import contextlib
import enum
import importlib
import io
import os
from typing import Any

import torch


class PickleRefused(ValueError):
    """A pickle that names a type outside the allow-list."""


def _allowed() -> dict[str, Any]:
    """The globals Megatron-LM's files need beyond what weights_only allows by itself: `args`
    (argparse.Namespace), numpy's RNG state (an ndarray), Transformer Engine's extra states
    (io.BytesIO in older versions)."""
    import numpy as np

    allowed: dict[str, Any] = {"argparse.Namespace": argparse.Namespace,
                               "_io.BytesIO": io.BytesIO, "io.BytesIO": io.BytesIO,
                               "builtins.bytes": bytes, "builtins.bytearray": bytearray,
                               "numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        with contextlib.suppress(ImportError, AttributeError):
            allowed[f"{module}._reconstruct"] = importlib.import_module(module)._reconstruct
            allowed[f"{module}.scalar"] = importlib.import_module(module).scalar
    for dtype in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                  np.uint32, np.uint64, np.float16, np.float32, np.float64):
        cls = type(np.dtype(dtype))
        allowed[f"{cls.__module__}.{cls.__name__}"] = cls
    return allowed


def _megatron_enum(name: str) -> Any:
    """An enum class of megatron.core named `module.Class` (args hold some: AttnBackend,
    ModelType ...), or None. Building an enum member only looks its value up."""
    module, _, attr = name.rpartition(".")
    if not module.startswith("megatron.core."):
        return None
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, enum.Enum) else None


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def pickle_globals(path: str, trust_pickle: bool = False) -> list[Any]:
    """The objects the pickle in `path` names beyond weights_only's own set, each allowed;
    PickleRefused naming the file and every other class. Nothing is unpickled to find them."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    if trust_pickle:
        return [_resolve(n) for n in names]
    allowed = _allowed()
    found, refused = [], []
    for name in names:
        obj = allowed.get(name) or _megatron_enum(name)
        (found if obj is not None else refused).append(obj if obj is not None else name)
    if refused:
        raise PickleRefused(
            f"{path}: refusing to unpickle {', '.join(sorted(set(refused)))}: not a type "
            "Megatron-LM stores in its checkpoints, and unpickling can run code. If you trust "
            "this file, pass --trust-pickle")
    # An array's dtype is rebuilt as an instance of its class (numpy.dtypes.UInt32DType), which
    # weights_only checks although the pickle never names it.
    import numpy as np

    dtype_classes = [v for v in allowed.values() if isinstance(v, type) and issubclass(v, np.dtype)]
    return found + dtype_classes


def load_pickle(path: str, trust_pickle: bool = False, mmap: bool = False) -> Any:
    """torch.load of a Megatron-LM file: weights_only with the allow-list (`pickle_globals`),
    or a plain load with `trust_pickle`. `mmap`: tensors stay in the file until read."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    with torch.serialization.safe_globals(pickle_globals(path)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # weights_only refuses with UnpicklingError (and others)
            raise PickleRefused(f"{path}: not loadable as plain weights ({str(e)[:300]}); if "
                                "you trust this file, pass --trust-pickle") from e
