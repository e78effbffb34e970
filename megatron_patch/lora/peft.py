"""Hugging Face PEFT adapter directories: `adapter_config.json` and `adapter_model.safetensors`
with keys `base_model.model.<HF module>.lora_A.weight` ([r, in]) and `.lora_B.weight`
([out, r]), as peft's `save_pretrained` writes them (no adapter name in the keys). Written and
read with this project's own safetensors/JSON code: the runtime does not need peft.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from megatron_patch.convert import hf_io
from megatron_patch.errors import read_json
from megatron_patch.lora.layers import LoRAConfig, adapted, local_columns, local_rows

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """PEFT's tensors of every adapter of an unsharded (TP=1) model chunk: one A and one B
    per adapted HF projection, B holding exactly that projection's rows of the fused B."""
    tensors = {}
    for module in adapted(model):
        site = module.lora_site
        if module.lora_tp > 1:
            raise ValueError("PEFT tensors are taken from an unsharded (TP=1) model")
        for i, part in enumerate(module.lora_parts):
            key = f"base_model.model.{site.parts[part]}"
            tensors[f"{key}.lora_A.weight"] = module.lora_A[i].detach().contiguous()
            tensors[f"{key}.lora_B.weight"] = module.lora_B[site.rows[part]].detach().contiguous()
    return tensors


def adapter_config(config: LoRAConfig, target_modules: list[str], base: str) -> dict[str, Any]:
    """adapter_config.json as peft writes it for a plain LoRA."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora, "target_modules": sorted(set(target_modules)),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
        "revision": None,
    }


def write_adapter(out_dir: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]
                  ) -> None:
    """The adapter directory, built in OUT.partial and moved into place (hf_io.staged)."""
    with hf_io.staged(out_dir) as staging:
        hf_io.write_safetensors(os.path.join(staging, WEIGHTS_FILE), tensors, {"format": "pt"})
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")


# adapter_config.json settings this LoRA cannot express, and the value meaning "unused".
_UNSUPPORTED = {"fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
                "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                "lora_bias": False, "use_qalora": False, "bias": "none",
                "layer_replication": None, "trainable_token_indices": None,
                "target_parameters": None}


def read_adapter(path: str) -> tuple[LoRAConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A PEFT LoRA adapter directory: its LoRAConfig (targets: the HF module names it adapts)
    and (A, B) per adapted HF module path. Refuses what this LoRA cannot express."""
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for needed in (config_path, weights_path):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f"{needed} not found: a PEFT adapter directory has "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    settings = read_json(config_path)
    if not isinstance(settings, dict) or settings.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type {settings.get('peft_type')!r} "
                         "(only LORA adapters import)")
    for key, unused in _UNSUPPORTED.items():
        value = settings.get(key, unused)
        if value != unused and not (unused is None and value in ([], {})):
            raise ValueError(f"{config_path}: {key}={value!r} is not supported (plain LoRA "
                             f"adapters only: {key} must be {unused!r})")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_path).items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{weights_path}: tensor {key} is not a LoRA A/B weight "
                             "(base_model.model.<module>.lora_A.weight / .lora_B.weight)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not pairs:
        raise ValueError(f"{weights_path}: no LoRA tensors")
    if halves := sorted(m for m, ab in pairs.items() if len(ab) != 2):
        raise ValueError(f"{weights_path}: modules {halves[:5]} have lora_A or lora_B only")
    ranks = {ab["A"].shape[0] for ab in pairs.values()} | {ab["B"].shape[-1]
                                                           for ab in pairs.values()}
    rank = settings.get("r")
    if ranks != {rank}:
        raise ValueError(f"{weights_path}: tensor ranks {sorted(ranks)} differ from "
                         f"{CONFIG_FILE}'s r={rank}")
    config = LoRAConfig(rank=int(rank), alpha=float(settings.get("lora_alpha", 8)),
                        dropout=float(settings.get("lora_dropout") or 0.0),
                        use_rslora=bool(settings.get("use_rslora", False)),
                        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in pairs})))
    return config, {m: (ab["A"], ab["B"]) for m, ab in pairs.items()}


def load_adapter_tensors(model, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                         source: str, hf_modules: set[str]) -> None:
    """Set the adapters of a model chunk (at any TP) from PEFT's per-projection tensors.
    `hf_modules`: every adaptable HF module path of the whole model (a tensor for any other
    module belongs to another model); modules of other pipeline stages are skipped."""
    if foreign := sorted(set(tensors) - hf_modules):
        raise ValueError(f"{source}: adapts {foreign[:4]}, which this model does not have "
                         "(an adapter for another base model?)")
    with torch.no_grad():
        for module in adapted(model):
            site = module.lora_site
            rank = module.lora_A.shape[1]
            whole_b = module.lora_B.new_zeros(sum(len(r) for r in site.rows), rank)
            for i, part in enumerate(module.lora_parts):
                name = site.parts[part]
                if name not in tensors:
                    raise ValueError(f"{source}: no adapter for {name}, which its target "
                                     "modules select")
                a, b = tensors[name]
                in_whole = module.lora_A.shape[2] * (module.lora_tp if site.kind == "row" else 1)
                want = {"lora_A": (rank, in_whole), "lora_B": (len(site.rows[part]), rank)}
                for what, tensor in (("lora_A", a), ("lora_B", b)):
                    if tuple(tensor.shape) != want[what]:
                        raise ValueError(f"{source}: {name}.{what} has shape "
                                         f"{tuple(tensor.shape)}, this model needs "
                                         f"{want[what]} (an adapter for another base model?)")
                module.lora_A[i].copy_(a[:, local_columns(site)])
                whole_b[site.rows[part]] = b.to(whole_b.dtype)
            module.lora_B.copy_(whole_b[local_rows(site)])
