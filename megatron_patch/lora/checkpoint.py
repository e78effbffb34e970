"""LoRA training checkpoints: the adapter tensors only (Megatron-Core's sharded format, so they
reshard across TP/PP like the weights), and `lora.json` in the checkpoint root naming the
adapter's settings and the base checkpoint it adapts (path and iteration). Export turns one
into a PEFT adapter directory or, merged, into a full HF model."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Any

import torch

from megatron_patch import checkpoint, lora
from megatron_patch.convert import hf_io
from megatron_patch.errors import read_json
from megatron_patch.lora import peft
from megatron_patch.lora.layers import LoRAConfig, adapted
from megatron_patch.models import family_for, load_hf_config

# Function-level imports: convert.hf_megatron imports megatron.core; loading and saving
# adapters does not need it.

LORA_FILE = "lora.json"
log = logging.getLogger(__name__)
_ADAPTER_KEYS = (".lora_A", ".lora_B")


def is_lora_checkpoint(root: str) -> bool:
    return os.path.isfile(os.path.join(root, LORA_FILE))


@dataclasses.dataclass
class BaseReference:
    """The base checkpoint a LoRA checkpoint adapts: where it is, which iteration, what it is
    (architecture and fingerprint, `checkpoint.fingerprint`), and the Hugging Face name or
    directory of the same base (what exported adapters name as base_model_name_or_path)."""

    path: str
    iteration: int | str
    identity: dict[str, str]
    hf_name: str | None = None

    @classmethod
    def of(cls, path: str, iteration: int | str, hf_name: str | None = None
           ) -> BaseReference:
        path = os.path.abspath(path)
        return cls(path, iteration, checkpoint.fingerprint(path, iteration), hf_name)


def write_reference(root: str, config: LoRAConfig, base: BaseReference) -> None:
    """lora.json: the adapter settings and the base checkpoint."""
    import json

    record = {"lora": dataclasses.asdict(config),
              "base": {"path": base.path, "iteration": base.iteration, **base.identity,
                       "hf_name": base.hf_name}}
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, LORA_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(root, LORA_FILE))


def read_reference(root: str) -> tuple[LoRAConfig, BaseReference]:
    """(LoRAConfig, base) of a LoRA checkpoint; the base must still be there and still be the
    model recorded (its fingerprint; lora.json files written before fingerprints were recorded
    are accepted with a warning)."""
    path = os.path.join(root, LORA_FILE)
    record = read_json(path)
    try:
        settings = dict(record["lora"])
        settings["target_modules"] = tuple(settings["target_modules"])
        config = LoRAConfig(**settings)
        saved = dict(record["base"])
        base, base_iteration = saved["path"], saved["iteration"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a LoRA checkpoint description ({e!r})") from e
    if not os.path.isfile(os.path.join(base, checkpoint.META)):
        raise FileNotFoundError(f"{path} names the base checkpoint {base}, which is not there "
                                "(the adapter needs it: move it back, or edit base.path)")
    identity = checkpoint.check_fingerprint(saved, base, base_iteration,
                                            f"the base checkpoint named by {path},")
    return config, BaseReference(base, base_iteration, identity, saved.get("hf_name"))


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
                 iteration: int | str | None = None) -> tuple[LoRAConfig, BaseReference]:
    """Into a built model chunk (any layout): the LoRA checkpoint's base weights, then its
    adapters. Returns the adapters' settings and their base."""
    config, base = read_reference(ckpt_dir)
    checkpoint.load_model(base.path, model, base.iteration)
    args = family_for(hf_config).model_args(hf_config)
    lora.apply(model, hf_config, args, padded_vocab_size, config)
    load_adapter(ckpt_dir, model, iteration)
    return config, base


def load_merged(ckpt_dir: str, model, hf_config: dict[str, Any], padded_vocab_size: int,
                iteration: int | str | None = None) -> None:
    """`load_adapted`, then every adapter merged into its weight: the plain model that
    generation, verification and the Python API use."""
    load_adapted(ckpt_dir, model, hf_config, padded_vocab_size, iteration)
    lora.merge(model)


def build_adapted(ckpt_dir: str, iteration: int | str | None = None):
    """The single-process (TP=1) model of a LoRA checkpoint: its base loaded, adapted, and the
    adapter loaded. Returns (model, LoRAConfig, base, hf_config, meta)."""
    from megatron_patch.convert.hf_megatron import single_process_model

    meta = checkpoint.read_meta(ckpt_dir)
    hf_config = load_hf_config(os.path.join(ckpt_dir, checkpoint.HF_DIR))
    model = single_process_model(hf_config, meta.torch_dtype, meta.padded_vocab_size)
    config, base = load_adapted(ckpt_dir, model, hf_config, meta.padded_vocab_size, iteration)
    return model, config, base, hf_config, meta


def export(ckpt_dir: str, out_dir: str, *, iteration: int | str | None = None,
           merge: bool = False, max_shard_size: int | str = "5GB",
           base_model_name_or_path: str | None = None) -> list[str]:
    """A LoRA checkpoint -> a PEFT adapter directory (adapter_config.json and
    adapter_model.safetensors, one adapter per HF projection), or with `merge` the full HF
    model with every adapter added into its weight. Returns the files written.

    The adapter names as its base (peft's base_model_name_or_path, which
    `AutoPeftModelForCausalLM` opens) `base_model_name_or_path`, else the HF name recorded at
    training (--lora-base-model-name-or-path, or the --lora-load adapter's), else, with a
    warning, the Megatron base checkpoint's path (which transformers cannot open)."""
    from megatron_patch.convert.hf_megatron import megatron_to_hf

    hf_io.check_output_dir(out_dir)
    model, config, base, hf_config, meta = build_adapted(ckpt_dir, iteration)
    if not merge:
        targets = {m.lora_site.short(p) for m in adapted(model) for p in m.lora_parts}
        hf_name = base_model_name_or_path or base.hf_name
        if hf_name is None:
            hf_name = base.path
            log.warning("%s records no Hugging Face name of its base: the adapter names the "
                        "Megatron checkpoint %s, which AutoPeftModelForCausalLM cannot open "
                        "(give --lora-base-model-name-or-path)", ckpt_dir, base.path)
        peft.write_adapter(out_dir, peft.adapter_tensors(model),
                           peft.adapter_config(config, sorted(targets), hf_name))
        return [peft.CONFIG_FILE, peft.WEIGHTS_FILE]
    lora.merge(model)
    # The merged weights go out through the one conversion engine, from a checkpoint beside
    # the output (same file system) that is removed afterwards.
    parent = os.path.dirname(os.path.abspath(out_dir))
    with tempfile.TemporaryDirectory(prefix=".merged-", dir=parent) as merged:
        checkpoint.copy_metadata(ckpt_dir, merged)
        checkpoint.save(merged, "release", checkpoint.model_state(model))
        return megatron_to_hf(merged, out_dir, max_shard_size=max_shard_size)
