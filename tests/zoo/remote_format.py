"""Helpers for cases whose original checkpoints use remote-code names (no cases of its own)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

CASES: list = []


def save(tensors: dict[str, Any], config: dict[str, Any], hf_dir: str) -> None:
    """Write `tensors` as model.safetensors and `config` as config.json, as a remote-code model's
    save_pretrained would (each tensor stored once, contiguous)."""
    from safetensors.torch import save_file

    save_file({n: t.detach().contiguous().clone() for n, t in tensors.items()},
              os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def with_random_biases(build: Callable[[], Any], seed: int = 1) -> Callable[[], Any]:
    """transformers initialises linear biases to zero, which would hide a misplaced bias."""

    def wrapped():
        import torch

        model = build()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias") and "norm" not in name:
                    p.copy_(torch.rand(p.shape, generator=gen) * 0.4 - 0.2)
        return model

    return wrapped


def llama_layer(sd: dict[str, Any], i: int) -> dict[str, Any]:
    """The tensors of decoder layer i of a Llama-style state dict, keyed by their short names."""
    prefix = f"model.layers.{i}."
    return {n[len(prefix):]: t for n, t in sd.items() if n.startswith(prefix)}
