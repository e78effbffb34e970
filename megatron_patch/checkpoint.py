"""Megatron-LM checkpoint directories holding Megatron-Core `torch_dist` checkpoints.

    CKPT/latest_checkpointed_iteration.txt     "release" or the last complete iteration
    CKPT/release/ or CKPT/iter_0000100/        dist_checkpointing output (loads at any TP/PP)
    CKPT/hf/                                   the HF config, tokenizer and code files
    CKPT/megatron_patch.json                   architecture, vocab padding, dtype

A save goes to a temporary directory that is renamed into place once every rank has finished,
and only then does the tracker file move: a save killed half-way leaves the previous checkpoint
loadable and pointed to. Such staging directories carry a marker file (STAGING_MARKER): one
without it is somebody else's and is never deleted.

A checkpoint's pickles are read only after `verify_pickles` (checkpoint_pickles.py) has read each
one with a restricted unpickler: PyTorch DCP and Megatron-Core unpickle `.metadata` and the
records of non-tensor objects (RNG states) with plain pickle, which runs whatever code a crafted
file names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from megatron_patch import cpu_mode
from megatron_patch.checkpoint_pickles import (  # noqa: F401 (the names callers import from here)
    UnsafePickleError,
    check_storage_files,
    read_dcp_metadata,
    refused_pickle,
    verify_pickles,
)
from megatron_patch.errors import read_json

# Function-level import: lora.checkpoint imports this module (a cycle).

TRACKER = "latest_checkpointed_iteration.txt"
META = "megatron_patch.json"
HF_DIR = "hf"
STAGING_MARKER = ".megatron-patch-staging"


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
    """The checkpoint's metadata, checked against the architecture its hf/config.json names
    (the two describe one model: a config of another model would build the wrong one)."""
    _require_root(root)
    path = os.path.join(root, META)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {root} is not a megatron-patch checkpoint")
    try:
        meta = CheckpointMeta(**read_json(path))
    except TypeError as e:
        raise ValueError(f"{path}: not a megatron-patch checkpoint description ({e})") from e
    config_path = os.path.join(root, HF_DIR, "config.json")
    if os.path.isfile(config_path):
        named = (read_json(config_path).get("architectures") or [None])[0]
        if named != meta.architecture:
            raise ValueError(f"{path} records architecture {meta.architecture}, but "
                             f"{config_path} names {named}: the two do not describe one model")
    return meta


def copy_metadata(src_root: str, dst_root: str) -> None:
    """Give a new checkpoint directory the HF files and metadata of the one it descends from."""
    os.makedirs(dst_root, exist_ok=True)
    shutil.copytree(os.path.join(src_root, HF_DIR), os.path.join(dst_root, HF_DIR),
                    dirs_exist_ok=True)
    shutil.copy2(os.path.join(src_root, META), os.path.join(dst_root, META))


def iteration_dir(root: str, iteration: int | str) -> str:
    if iteration == "release":
        return os.path.join(root, "release")
    try:
        number = int(iteration)
    except ValueError:
        raise ValueError(f"{root}: iteration must be a number or 'release', got "
                         f"{iteration!r}") from None
    return os.path.join(root, f"iter_{number:07d}")


def _require_root(root: str) -> None:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such checkpoint directory")


def latest_iteration(root: str) -> int | str:
    _require_root(root)
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
        raise ValueError(
            f"{path}: expected 'release' or an iteration number, got {text!r}") from None


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_staging(staging: str) -> None:
    """Refuse a staging path that holds something this project did not make."""
    if not os.path.lexists(staging):
        return
    if not os.path.isdir(staging) or os.path.islink(staging):
        raise FileExistsError(f"{staging} exists and is not a directory: move or delete it")
    if os.listdir(staging) and not os.path.isfile(os.path.join(staging, STAGING_MARKER)):
        raise FileExistsError(f"{staging} exists, holds files and was not made by megatron-patch "
                              f"(no {STAGING_MARKER} in it): move or delete it yourself")


def make_staging(staging: str) -> None:
    """Create `staging` empty but for the marker, replacing an earlier one of ours (left by an
    interrupted write); anything else in its place is refused."""
    _check_staging(staging)
    if os.path.isdir(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    open(os.path.join(staging, STAGING_MARKER), "w").close()


def publish_staging(staging: str, final: str) -> None:
    """Move a complete staging directory to `final` (absent or an empty directory) in one
    rename, without its marker."""
    os.remove(os.path.join(staging, STAGING_MARKER))
    os.replace(staging, final)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _not_overwriting_warning(record: logging.LogRecord) -> bool:
    return "Overwriting old incomplete" not in record.getMessage()


def save(root: str, iteration: int | str, sharded_state_dict: dict[str, Any], *,
         sharded_strategy: Any = None) -> str:
    """Save with dist_checkpointing (all ranks call this), then publish it as the latest.

    sharded_strategy: dist_checkpointing's (None: Megatron-Core's default, `torch_dist`).
    """
    from megatron.core import dist_checkpointing

    cpu_mode.enable_in_process_checkpoint_queue()
    final = iteration_dir(root, iteration)
    staging = final + ".partial"
    _check_staging(staging)  # on every rank: all refuse together, none waits at the barrier
    _barrier()
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        make_staging(staging)
    _barrier()
    # Megatron-Core warns of "old incomplete / corrupted" data in any non-empty directory it
    # saves to: here that is only the marker.
    saving_log = logging.getLogger("megatron.core.dist_checkpointing.serialization")
    saving_log.addFilter(_not_overwriting_warning)
    try:
        dist_checkpointing.save(sharded_state_dict, staging, sharded_strategy)
    finally:
        saving_log.removeFilter(_not_overwriting_warning)
    _barrier()
    if _rank() == 0:
        if os.path.exists(final):  # only where the caller allowed it (Trainer: --overwrite-...)
            shutil.rmtree(final)
        publish_staging(staging, final)
        _atomic_write(os.path.join(root, TRACKER), str(iteration) + "\n")
    _barrier()
    return final


def load(root: str, sharded_state_dict: dict[str, Any],
         iteration: int | str | None = None) -> dict[str, Any]:
    """Load the given (or latest) iteration into the layout `sharded_state_dict` describes."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    path = existing_iteration_dir(root, iteration)
    try:
        return dist_checkpointing.load(sharded_state_dict, path)
    except CheckpointException as e:
        # Each rank's failure comes wrapped with its traceback; the exception says what broke.
        failure = next(iter(e.failures.values()), None)
        cause = failure[0] if isinstance(failure, tuple) else failure
        raise ValueError(f"{path}: cannot load the checkpoint, a .distcp file is corrupt "
                         f"({type(cause).__name__}: {cause})") from e


def existing_iteration_dir(root: str, iteration: int | str | None = None) -> str:
    """The directory of the given (or latest) iteration, which must exist; its pickles are
    verified (verify_pickles) before anything reads them."""
    asked = iteration is not None
    if iteration is None:
        iteration = latest_iteration(root)
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        if not asked:
            raise FileNotFoundError(f"{path} not found (named by {os.path.join(root, TRACKER)})")
        held = sorted(name for name in os.listdir(root)
                      if name == "release" or (name.startswith("iter_") and name[5:].isdigit()))
        raise FileNotFoundError(f"{path} not found: iteration {iteration} was asked for, and "
                                f"{root} holds {', '.join(held) or 'no iteration'}")
    check_storage_files(path)
    verify_pickles(path)
    return path


def fingerprint(root: str, iteration: int | str) -> dict[str, str]:
    """What identifies the model saved in checkpoint `root` at `iteration`, for a reference
    to it kept elsewhere (a LoRA checkpoint's base, a DPO/RL run's reference): its architecture
    and the sha256 of its megatron_patch.json and of the iteration's DCP `.metadata`. That file
    records a unique id per save, so a copy of the checkpoint keeps the fingerprint and another
    save (even of the same architecture) changes it; reading it costs no weight I/O."""
    import hashlib

    digest = hashlib.sha256()
    for path in (os.path.join(root, META), os.path.join(iteration_dir(root, iteration),
                                                        ".metadata")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: {root} (iteration {iteration}) is not "
                                    "a complete megatron-patch checkpoint")
        with open(path, "rb") as f:
            digest.update(f.read())
    return {"architecture": read_meta(root).architecture, "fingerprint": digest.hexdigest()[:16]}


def check_fingerprint(recorded: dict[str, Any], root: str, iteration: int | str,
                      what: str) -> dict[str, str]:
    """Refuse checkpoint `root` at `iteration` when it is no longer the model `recorded` (a
    record holding `fingerprint` and `architecture`) names: another model was put at its path.
    Returns the checkpoint's fingerprint. A record written before fingerprints existed is
    accepted with a warning (nothing to compare with)."""
    found = fingerprint(root, iteration)
    if "fingerprint" not in recorded:
        logging.getLogger(__name__).warning(
            "%s %s (iteration %s) is accepted unchecked: it was recorded without a "
            "fingerprint (before megatron-patch recorded them); from now on %s %s is recorded",
            what, root, iteration, found["architecture"], found["fingerprint"])
        return found
    if (recorded["fingerprint"], recorded.get("architecture")) != (
            found["fingerprint"], found["architecture"]):
        raise ValueError(
            f"{what} {root} (iteration {iteration}) is not the model that was recorded: "
            f"recorded {recorded.get('architecture')} fingerprint {recorded['fingerprint']}, "
            f"found {found['architecture']} fingerprint {found['fingerprint']} (the sha256 of "
            f"{META} and .metadata): another checkpoint was put at that path. Put the "
            "original back, or start a new run from this one")
    return found


def model_state(model) -> dict[str, Any]:
    """Megatron-LM's top-level layout: the model's sharded state under 'model'."""
    return {"model": model.sharded_state_dict(), "checkpoint_version": 3.0}


def _sharded_tensors(tree: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, ShardedTensor) for every ShardedTensor in nested dicts and lists."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(tree, ShardedTensor):
        yield path, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _sharded_tensors(value, (*path, key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _sharded_tensors(value, (*path, i))


def load_model(root: str, model, iteration: int | str | None = None, *,
               exclude: tuple[str, ...] = ()) -> None:
    """Load weights straight into one model chunk's own tensors, at whatever TP/PP it was built
    for.

    Left to itself, Megatron-Core merges tensors it saves in parts (SwiGLU's linear_fc1 as its
    gate and up halves: the merge concatenates them into a new tensor), and load_state_dict then
    copies every tensor into the model. Here the factories that split such tensors are applied
    first, so that each part is a view of the model's parameter and dist_checkpointing reads into
    the model directly; a tensor is copied only where the loader did not fill the target itself.
    Extra states (ShardedObjects) are not applied: only weights are.

    exclude: prefixes of state names left as they are, not read (a reward model's new score head
    where `root` holds a language model).
    """
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from megatron_patch.lora.checkpoint import LORA_FILE

    if os.path.isfile(os.path.join(root, LORA_FILE)):
        raise ValueError(f"{root} is a LoRA checkpoint (adapters only, see its {LORA_FILE}): "
                         f"`megatron-patch convert megatron-to-hf {root} OUT --merge-lora` "
                         "writes the full model; training resumes it with --load")
    sharded = {k: v for k, v in model.sharded_state_dict().items() if not k.startswith(exclude)}
    apply_factories(sharded)
    # Recorded before loading: the loader replaces the ShardedTensors with what it read.
    targets = [(path, sh.data) for path, sh in _sharded_tensors(sharded)]
    check_targets_cover(model, [t for _, t in targets], root, exclude)
    loaded = load(root, {"model": sharded}, iteration)["model"]
    with torch.no_grad():
        for path, target in targets:
            value: Any = loaded
            for key in path:
                value = value[key]
            if value.shape != target.shape:
                raise RuntimeError(f"checkpoint {root} does not fit the model: "
                                   f"{'/'.join(map(str, path))} has shape {tuple(value.shape)}, "
                                   f"the model {tuple(target.shape)}")
            if value.data_ptr() != target.data_ptr():
                target.copy_(value)


def check_targets_cover(model, targets: list[torch.Tensor], root: str,
                        exclude: tuple[str, ...] = ()) -> None:
    """Every tensor of the model's state (but those named with an `exclude` prefix) must be
    loaded into: the memory of each is covered by the targets (views of the model's parameters,
    each contiguous) taken together. `root`: the source named in the error."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for t in targets if t.is_contiguous())

    def covered(start: int, end: int) -> bool:
        for first, last in spans:  # sorted by start: a span starting later leaves a gap
            if first > start:
                break
            start = max(start, last)
        return start >= end

    missing = [name for name, t in model.state_dict(keep_vars=True).items()
               if isinstance(t, torch.Tensor) and not name.endswith("_extra_state") and t.numel()
               and not name.startswith(exclude)
               and not covered(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())]
    if missing:
        raise RuntimeError(f"checkpoint {root} cannot be loaded into the model in place: the "
                           f"model's sharded state does not cover {missing}")
