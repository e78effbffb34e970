"""Megatron-LM checkpoint directories holding Megatron-Core `torch_dist` checkpoints.

    CKPT/latest_checkpointed_iteration.txt     "release" or the last complete iteration
    CKPT/release/ or CKPT/iter_0000100/        dist_checkpointing output (loads at any TP/PP)
    CKPT/hf/                                   the HF config, tokenizer and code files
    CKPT/megatron_patch.json                   architecture, vocab padding, dtype

A save goes to a temporary directory that is renamed into place once every rank has finished,
and only then does the tracker file move: a save killed half-way leaves the previous checkpoint
loadable and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import torch

TRACKER = "latest_checkpointed_iteration.txt"
META = "megatron_patch.json"
HF_DIR = "hf"


@dataclass
class CheckpointMeta:
    architecture: str
    vocab_size: int
    padded_vocab_size: int
    dtype: str
    format_version: int = 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def write_meta(root: str, meta: CheckpointMeta) -> None:
    _atomic_write(os.path.join(root, META), json.dumps(asdict(meta), indent=2) + "\n")


def read_meta(root: str) -> CheckpointMeta:
    path = os.path.join(root, META)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {root} is not a megatron-patch checkpoint")
    with open(path) as f:
        return CheckpointMeta(**json.load(f))


def copy_metadata(src_root: str, dst_root: str) -> None:
    """Give a new checkpoint directory the HF files and metadata of the one it descends from."""
    os.makedirs(dst_root, exist_ok=True)
    shutil.copytree(os.path.join(src_root, HF_DIR), os.path.join(dst_root, HF_DIR),
                    dirs_exist_ok=True)
    shutil.copy2(os.path.join(src_root, META), os.path.join(dst_root, META))


def iteration_dir(root: str, iteration: int | str) -> str:
    name = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    return os.path.join(root, name)


def latest_iteration(root: str) -> int | str:
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: no complete checkpoint in {root}")
    with open(path) as f:
        text = f.read().strip()
    if text == "release":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected 'release' or an iteration number, got {text!r}")


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save(root: str, iteration: int | str, sharded_state_dict: dict[str, Any]) -> str:
    """Save with dist_checkpointing (all ranks call this), then publish it as the latest."""
    from megatron.core import dist_checkpointing

    from megatron_patch import cpu_mode

    cpu_mode.enable_in_process_checkpoint_queue()
    final = iteration_dir(root, iteration)
    staging = final + ".partial"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    _barrier()
    dist_checkpointing.save(sharded_state_dict, staging)
    _barrier()
    if _rank() == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        _atomic_write(os.path.join(root, TRACKER), str(iteration) + "\n")
    _barrier()
    return final


def load(root: str, sharded_state_dict: dict[str, Any],
         iteration: int | str | None = None) -> dict[str, Any]:
    """Load the given (or latest) iteration into the layout `sharded_state_dict` describes."""
    from megatron.core import dist_checkpointing

    if iteration is None:
        iteration = latest_iteration(root)
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} not found (named by {os.path.join(root, TRACKER)})")
    return dist_checkpointing.load(sharded_state_dict, path)


def model_state(model) -> dict[str, Any]:
    """Megatron-LM's top-level layout: the model's sharded state under 'model'."""
    return {"model": model.sharded_state_dict(), "checkpoint_version": 3.0}


def load_model(root: str, model, iteration: int | str | None = None) -> None:
    """Load weights into one model chunk, at whatever TP/PP it was built for."""
    loaded = load(root, {"model": model.sharded_state_dict()}, iteration)
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {root} does not fit the model: missing {missing}, "
                           f"unexpected {unexpected}")
