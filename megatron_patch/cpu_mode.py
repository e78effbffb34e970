"""Run Megatron-Core on a CPU-only torch (gloo backend).

Megatron-Core is written for CUDA. On a machine without it a handful of call sites fail; each patch
below makes one of them fall back to the CPU, with the reason and the megatron-core version it was
written against. Nothing is changed when CUDA is present, unless MEGATRON_PATCH_CPU=1 asks for it
(to debug a parallel layout on the CPU of a GPU box). The patches are applied once; calling
`enable()` again does nothing.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._device

TARGET_MEGATRON_CORE = "0.16"
ENV_VAR = "MEGATRON_PATCH_CPU"

_CONSTRUCTORS = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange",
    "zeros_like", "ones_like", "empty_like", "full_like",
)
_enabled = False


def wanted() -> bool:
    """CPU mode is wanted when asked for by the environment, or when there is no CUDA device."""
    flag = os.environ.get(ENV_VAR, "").strip().lower()
    if flag in ("1", "true", "yes"):
        return True
    if flag in ("0", "false", "no"):
        return False
    return not torch.cuda.is_available()


def is_enabled() -> bool:
    return _enabled


def device() -> torch.device:
    """The device models and batches should live on."""
    if _enabled or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


def _cpu_device_kwarg(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapper.__megatron_patch_cpu__ = True
    return wrapper


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _tensor_type_as_cuda(original: Callable) -> Callable:
    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if not args and not kwargs:
            return _CUDA_TYPE_NAMES.get(name, name)
        return name

    return type_


def _tensor_cuda_is_cpu(self, *args, **kwargs):
    return self.to("cpu")


def _noop(*args, **kwargs) -> None:
    return None


def enable() -> None:
    """Apply the CPU patches (idempotent)."""
    global _enabled
    if _enabled:
        return
    # On CPU there is nothing for apex / Transformer Engine to accelerate.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")

    # Allocation sites use torch.cuda.current_device() as the device (rotary inv_freq,
    # param_and_grad_buffer, tensor_parallel.mappings buffers, p2p shape tensors).
    torch.cuda.current_device = lambda: torch.device("cpu")
    # .cuda() moves: shared-embedding setup under PP (language_module), grad scaler state.
    torch.Tensor.cuda = _tensor_cuda_is_cpu
    # Hard-coded device="cuda" constructors: default causal mask (transformer/utils.py),
    # token counters (pipeline_parallel/schedules.py), found-inf / scale buffers (optimizer),
    # grad-norm buffers (optimizer/clip_grads.py).
    # torch's `with torch.device(...)` recognises constructors by identity, from a set it builds
    # once: build it from the unwrapped functions first, or that context (used by transformers'
    # from_pretrained) would stop placing tensors.
    torch.utils._device._device_constructors()
    for name in _CONSTRUCTORS:
        fn = getattr(torch, name)
        if not getattr(fn, "__megatron_patch_cpu__", False):
            setattr(torch, name, _cpu_device_kwarg(fn))
    # p2p_communication and dist_checkpointing call torch.cuda.synchronize() unconditionally.
    torch.cuda.synchronize = _noop
    # megatron.core.optimizer checks param.type() == 'torch.cuda.FloatTensor' (clip_grads,
    # Float16OptimizerWithFloat16Params, DistributedOptimizer); report CPU tensors under the CUDA
    # names so the same checks accept them.
    torch.Tensor.type = _tensor_type_as_cuda(torch.Tensor.type)
    # The RNG tracker (model_parallel_cuda_manual_seed, dropout forks) keeps CUDA generator states;
    # on CPU the default CPU generator plays that role.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # (Not torch.manual_seed: it calls torch.cuda.manual_seed_all, which stays a lazy no-op.)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))

    from megatron.core import package_info
    from megatron.core.tensor_parallel import random as mcore_random

    if not package_info.__version__.startswith(TARGET_MEGATRON_CORE + "."):
        warnings.warn(f"megatron_patch.cpu_mode targets megatron-core {TARGET_MEGATRON_CORE}.x, "
                      f"found {package_info.__version__}: CPU runs may hit unpatched CUDA calls",
                      stacklevel=2)

    # megatron-core internal: private functions replaced (test_megatron_core_contract.py).
    mcore_random._get_cuda_rng_state = (
        lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = (
        lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    )
    # The tracker's fork() warns when the CPU generator moves inside a "GPU" RNG context: with
    # the CPU generator standing in for the GPU's, it always does (each dropout, each init).
    logging.getLogger(mcore_random.__name__).addFilter(_NotRngContextWarning())
    _enabled = True


class _NotRngContextWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def enable_in_process_checkpoint_queue() -> None:
    """Synchronous dist_checkpointing saves collect write results in-process.

    megatron-core 0.16 creates that results queue through a spawned multiprocessing Manager, which
    costs seconds per process and hangs in scripts without a __main__ guard. A synchronous save
    only ever puts into it from the saving process itself, so a plain queue is equivalent.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # megatron-core internal: a private module global (test_megatron_core_contract.py).
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def maybe_enable() -> bool:
    if wanted():
        enable()
    return _enabled
