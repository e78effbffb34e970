"""Finding a Megatron-LM checkpoint's iteration directory, its layout (legacy rank files or
torch_dist) and the `args` it was saved with."""

from __future__ import annotations

import argparse
import os
import re

from megatron_patch import checkpoint
from megatron_patch.convert.megatron_lm.pickles import load_pickle

LEGACY_FILE = "model_optim_rng.pt"
COMMON_FILE = "common.pt"
RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?")


def _iteration_name(iteration: int | str) -> str:
    return os.path.basename(checkpoint.iteration_dir("", iteration))


def _layout(path: str) -> str | None:
    if os.path.isfile(os.path.join(path, COMMON_FILE)) and os.path.isfile(
            os.path.join(path, "metadata.json")):
        return "torch_dist"
    if os.path.isdir(path) and any(RANK_DIR.fullmatch(n) for n in os.listdir(path)):
        return "legacy"
    return None


def locate(path: str, iteration: int | str | None = None) -> tuple[str, str]:
    """(iteration directory, "legacy" or "torch_dist") of a Megatron-LM checkpoint root (its
    tracker file names the iteration unless `iteration` is given) or iteration directory."""
    if os.path.isfile(os.path.join(path, checkpoint.META)):
        raise ValueError(f"{path} is a megatron-patch checkpoint, not a Megatron-LM one")
    if iteration is None and (layout := _layout(path)) is not None:
        return path, layout
    if iteration is None:
        iteration = checkpoint.latest_iteration(path)
    elif iteration != "release":
        iteration = int(iteration)
    iter_dir = os.path.join(path, _iteration_name(iteration))
    if not os.path.isdir(iter_dir):
        raise FileNotFoundError(f"{iter_dir} not found")
    layout = _layout(iter_dir)
    if layout is None:
        raise FileNotFoundError(f"{iter_dir}: neither mp_rank_* directories (legacy) nor "
                                f"{COMMON_FILE} and metadata.json (torch_dist)")
    return iter_dir, layout


def is_megatron_lm_checkpoint(path: str) -> bool:
    """Whether `path` is a Megatron-LM checkpoint root or iteration directory."""
    try:
        locate(path)
    except (ValueError, FileNotFoundError):
        return False
    return True


def _rank_dirs(iter_dir: str) -> dict[str, tuple[int, ...]]:
    return {n: tuple(int(g) for g in m.groups() if g is not None)
            for n in os.listdir(iter_dir) if (m := RANK_DIR.fullmatch(n))}


def read_args(iter_dir: str, layout: str, trust_pickle: bool = False) -> tuple[
        argparse.Namespace, str]:
    """The `args` Namespace Megatron-LM saved, and the file it came from."""
    if layout == "torch_dist":
        path = os.path.join(iter_dir, COMMON_FILE)
    else:
        # Rank 0's file: mp_rank_00, mp_rank_00_000 or mp_rank_00_000_000, whichever exists.
        first = sorted(n for n, ranks in _rank_dirs(iter_dir).items() if not any(ranks))
        if not first:
            raise FileNotFoundError(f"{iter_dir}: no rank 0 directory (mp_rank_00...)")
        path = os.path.join(iter_dir, first[0], LEGACY_FILE)
    state = load_pickle(path, trust_pickle, mmap=layout == "legacy")
    args = state.get("args") if isinstance(state, dict) else None
    if not isinstance(args, argparse.Namespace):
        raise ValueError(f"{path}: no Megatron-LM `args` in it (saved with --no-save-args?)")
    return args, path


def iteration_of(iter_dir: str) -> int | str:
    name = os.path.basename(os.path.normpath(iter_dir))
    if name == "release":
        return name
    if not re.fullmatch(r"iter_\d{7,}", name):
        raise ValueError(f"{iter_dir}: a Megatron-LM iteration directory is named release or "
                         "iter_NNNNNNN")
    return int(name[5:])
