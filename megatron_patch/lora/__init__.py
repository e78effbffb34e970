"""LoRA on Megatron-Core with adapters in Hugging Face PEFT's format.

    from megatron_patch import lora

    config = lora.LoRAConfig(rank=8, alpha=16, target_modules=("q_proj", "v_proj"))
    lora.apply(model, hf_config, model_args, padded_vocab_size, config)  # after building,
    ...                                                                  # before DDP
    lora.peft.save_adapter(model, out_dir, config, base="...")          # at TP=1

`targets` finds the adaptable linears and what target names select, `layers` holds the
adapter math and its tensor-parallel sharding, `peft` reads and writes PEFT adapter
directories, `checkpoint` stores training adapters beside a reference to their base.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron_patch.lora import peft
from megatron_patch.lora.layers import LoRAConfig, adapted, adopt, disabled, merge
from megatron_patch.lora.targets import hf_modules, select, sites

__all__ = ["LoRAConfig", "adapted", "apply", "disabled", "merge", "select", "sites"]


def apply(model, hf_config: dict[str, Any], args, padded_vocab_size: int, config: LoRAConfig,
          *, seed: int = 0) -> list[str]:
    """Freeze every parameter of the model chunk and give the linears `config` targets their
    adapters (the only trainable parameters then). Returns the HF module paths adapted on this
    rank. Call it after the model is built and its base weights loaded, before DDP wraps it."""
    all_sites = sites(model, hf_config, args, padded_vocab_size)
    chosen = select(all_sites, list(config.target_modules))
    if not chosen:
        raise ValueError(f"--lora-target-modules {','.join(config.target_modules)} selects no "
                         "linear of this model")
    for param in model.parameters():
        param.requires_grad_(False)
    names: list[str] = []
    for site in all_sites:
        if site.name in chosen:
            adopt(site, chosen[site.name], config, seed)
            names += [site.parts[p] for p in chosen[site.name]]
    return names


def load_peft(model, hf_config: dict[str, Any], args, padded_vocab_size: int,
              adapter_dir: str,
              settle: Callable[[LoRAConfig], LoRAConfig] | None = None) -> LoRAConfig:
    """Adapt a model chunk (base weights loaded, any TP/PP) as the PEFT adapter directory
    says and load its tensors. `settle` (the trainer's flags held against the adapter's
    settings) may check or adjust the settings read before the model is adapted. Returns the
    LoRAConfig applied."""
    config, tensors = peft.read_adapter(adapter_dir)
    if settle is not None:
        config = settle(config)
    apply(model, hf_config, args, padded_vocab_size, config)
    peft.load_adapter_tensors(model, tensors, adapter_dir, hf_modules(hf_config, args))
    return config
