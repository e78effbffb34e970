"""LoRA training checkpoints: the adapter tensors only (Megatron-Core's sharded format, so they
reshard across TP/PP like the weights), and `lora.json` in the checkpoint root naming the
adapter's settings and the base checkpoint it adapts (path and iteration). Export turns one
into a PEFT adapter directory or, merged, into a full HF model."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import torch

from megatron_patch import checkpoint
from megatron_patch.errors import read_json
from megatron_patch.lora.layers import LoRAConfig, adapted

LORA_FILE = "lora.json"
_ADAPTER_KEYS = (".lora_A", ".lora_B")


def is_lora_checkpoint(root: str) -> bool:
    return os.path.isfile(os.path.join(root, LORA_FILE))


def write_reference(root: str, config: LoRAConfig, base: str,
                    base_iteration: int | str) -> None:
    """lora.json: the adapter settings and the base checkpoint (absolute path, iteration)."""
    import json

    record = {"lora": dataclasses.asdict(config),
              "base": {"path": os.path.abspath(base), "iteration": base_iteration}}
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, LORA_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(root, LORA_FILE))


def read_reference(root: str) -> tuple[LoRAConfig, str, int | str]:
    """(LoRAConfig, base checkpoint path, base iteration) of a LoRA checkpoint; the base must
    still be there."""
    path = os.path.join(root, LORA_FILE)
    record = read_json(path)
    try:
        settings = dict(record["lora"])
        settings["target_modules"] = tuple(settings["target_modules"])
        config = LoRAConfig(**settings)
        base, base_iteration = record["base"]["path"], record["base"]["iteration"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a LoRA checkpoint description ({e!r})") from e
    if not os.path.isfile(os.path.join(base, checkpoint.META)):
        raise FileNotFoundError(f"{path} names the base checkpoint {base}, which is not there "
                                "(the adapter needs it: move it back, or edit base.path)")
    return config, base, base_iteration


def adapter_keys(keys: list[str]) -> list[str]:
    return [k for k in keys if k.endswith(_ADAPTER_KEYS)]


def adapter_state(model) -> dict[str, Any]:
    """The model chunk's sharded state restricted to its adapters."""
    return {k: v for k, v in model.sharded_state_dict().items() if k.endswith(_ADAPTER_KEYS)}


def base_state(model) -> dict[str, Any]:
    """The model chunk's sharded state without its adapters."""
    return {k: v for k, v in model.sharded_state_dict().items()
            if not k.endswith(_ADAPTER_KEYS)}


def load_adapter(root: str, model, iteration: int | str | None = None) -> None:
    """Load a LoRA checkpoint's adapter tensors into the adapted model chunk (any layout)."""
    state = adapter_state(model)
    targets = {k: v.data for k, v in state.items()}
    loaded = checkpoint.load(root, {"model": state}, iteration)["model"]
    with torch.no_grad():
        for key, target in targets.items():
            if loaded[key].shape != target.shape:
                raise ValueError(f"{root}: adapter {key} has shape {tuple(loaded[key].shape)}, "
                                 f"the model {tuple(target.shape)}")
            target.copy_(loaded[key])


def load_adapted(ckpt_dir: str, model, hf_config: dict[str, Any], padded_vocab_size: int,
                 iteration: int | str | None = None) -> LoRAConfig:
    """Into a built model chunk (any layout): the LoRA checkpoint's base weights, then its
    adapters. Returns the adapters' settings."""
    from megatron_patch import lora
    from megatron_patch.models import family_for

    config, base, base_iteration = read_reference(ckpt_dir)
    checkpoint.load_model(base, model, base_iteration)
    args = family_for(hf_config).model_args(hf_config)
    lora.apply(model, hf_config, args, padded_vocab_size, config)
    load_adapter(ckpt_dir, model, iteration)
    return config


def load_merged(ckpt_dir: str, model, hf_config: dict[str, Any], padded_vocab_size: int,
                iteration: int | str | None = None) -> None:
    """`load_adapted`, then every adapter merged into its weight: the plain model that
    generation, verification and the Python API use."""
    from megatron_patch import lora

    load_adapted(ckpt_dir, model, hf_config, padded_vocab_size, iteration)
    lora.merge(model)


def build_adapted(ckpt_dir: str, iteration: int | str | None = None):
    """The single-process (TP=1) model of a LoRA checkpoint: its base loaded, adapted, and the
    adapter loaded. Returns (model, LoRAConfig, base path, hf_config, meta)."""
    from megatron_patch.convert.hf_megatron import _single_process_model
    from megatron_patch.models import load_hf_config

    meta = checkpoint.read_meta(ckpt_dir)
    hf_config = load_hf_config(os.path.join(ckpt_dir, checkpoint.HF_DIR))
    model = _single_process_model(hf_config, meta.torch_dtype, meta.padded_vocab_size)
    config = load_adapted(ckpt_dir, model, hf_config, meta.padded_vocab_size, iteration)
    _, base, _ = read_reference(ckpt_dir)
    return model, config, base, hf_config, meta


def export(ckpt_dir: str, out_dir: str, *, iteration: int | str | None = None,
           merge: bool = False, max_shard_size: int | str = "5GB") -> list[str]:
    """A LoRA checkpoint -> a PEFT adapter directory (adapter_config.json and
    adapter_model.safetensors, one adapter per HF projection), or with `merge` the full HF
    model with every adapter added into its weight. Returns the files written."""
    from megatron_patch import lora
    from megatron_patch.convert import hf_io
    from megatron_patch.convert.hf_megatron import megatron_to_hf
    from megatron_patch.lora import peft

    hf_io.check_output_dir(out_dir)
    model, config, base, hf_config, meta = build_adapted(ckpt_dir, iteration)
    if not merge:
        targets = {m.lora_site.short(p) for m in adapted(model) for p in m.lora_parts}
        peft.write_adapter(out_dir, peft.adapter_tensors(model),
                           peft.adapter_config(config, sorted(targets), base))
        return [peft.CONFIG_FILE, peft.WEIGHTS_FILE]
    lora.merge(model)
    # The merged weights go out through the one conversion engine, from a checkpoint beside
    # the output (same file system) that is removed afterwards.
    parent = os.path.dirname(os.path.abspath(out_dir))
    with tempfile.TemporaryDirectory(prefix=".merged-", dir=parent) as merged:
        checkpoint.copy_metadata(ckpt_dir, merged)
        checkpoint.save(merged, "release", checkpoint.model_state(model))
        return megatron_to_hf(merged, out_dir, max_shard_size=max_shard_size)
