"""LoRA in the trainer: the flags, the model hook (base weights loaded, adapters added, before
DDP wraps the model) and what a checkpoint holds (the adapters, and lora.json naming the base).

Flags (peft's meanings): --lora-rank R turns LoRA on; --lora-alpha (default R: scale 1, as
peft's defaults r=8, lora_alpha=8), --lora-dropout, --lora-target-modules (comma-separated
Megatron or HF module names, default all-linear), --lora-use-rslora; --lora-load ADAPTER_DIR
starts from a PEFT adapter directory (its settings come from its adapter_config.json).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from megatron_patch import checkpoint
from megatron_patch.errors import FloatRange, positive_float
from megatron_patch.lora import checkpoint as lora_checkpoint
from megatron_patch.lora.layers import LoRAConfig

log = logging.getLogger("megatron_patch.train")

DROPOUT = FloatRange(0.0, 1.0, high_open=True)  # a probability of dropping, below 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA (adapters in Hugging Face PEFT format; base weights frozen)")
    g.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank instead of the full model")
    g.add_argument("--lora-alpha", type=positive_float, default=None,
                   help="scale = alpha / rank (default: the rank, scale 1)")
    g.add_argument("--lora-dropout", type=DROPOUT, default=0.0,
                   help="dropout on the adapters' input (peft's lora_dropout)")
    g.add_argument("--lora-target-modules", default="all-linear",
                   help="comma-separated: Megatron names (linear_qkv, linear_proj, linear_fc1, "
                        "linear_fc2: MoE experts' too), HF names (q_proj, k_proj, v_proj, "
                        "o_proj, gate_proj, up_proj, down_proj, ...), or all-linear")
    g.add_argument("--lora-use-rslora", action="store_true",
                   help="rank-stabilised scale alpha / sqrt(rank)")
    g.add_argument("--lora-load", metavar="ADAPTER_DIR", default=None,
                   help="start from this PEFT adapter (adapter_config.json + "
                        "adapter_model.safetensors) on the --load base; its settings are the "
                        "adapter's")


def config_from_args(args: argparse.Namespace) -> LoRAConfig | None:
    """The flags' LoRAConfig (checked: a rank <= 0 is refused), or None without --lora-rank."""
    if args.lora_rank is None:
        return None
    targets = tuple(t.strip() for t in args.lora_target_modules.split(",") if t.strip())
    return LoRAConfig(rank=args.lora_rank, alpha=float(
        args.lora_rank if args.lora_alpha is None else args.lora_alpha),
        dropout=args.lora_dropout, use_rslora=args.lora_use_rslora, target_modules=targets)


def validate(args: argparse.Namespace) -> None:
    """Refuse LoRA flag combinations before anything is built."""
    config_from_args(args)
    if args.lora_rank is None and args.lora_load is None:
        given = [f for f, v in (("--lora-alpha", args.lora_alpha),
                                ("--lora-dropout", args.lora_dropout or None),
                                ("--lora-use-rslora", args.lora_use_rslora or None)) if v]
        if given:
            raise ValueError(f"{', '.join(given)} without --lora-rank (or --lora-load): LoRA is "
                             "off")
    if (args.lora_rank or args.lora_load) and not args.load:
        raise ValueError("LoRA adapts a pretrained model: give --load (a converted checkpoint)")
    if (args.lora_rank or args.lora_load) and args.transformer_impl == "transformer_engine":
        raise ValueError("LoRA needs --transformer-impl local (Transformer Engine fuses the "
                         "norm into the linear, in front of where the adapter reads its input)")
    if args.lora_rank or args.lora_load or (
            args.load and lora_checkpoint.is_lora_checkpoint(args.load)):
        args.transformer_impl = "local"


@dataclass
class TrainingAdapters:
    """A LoRA run's settings and the base checkpoint its adapters belong to."""

    config: LoRAConfig
    base: str
    base_iteration: int | str
    resumed: bool  # --load is a LoRA checkpoint: its adapters (and state) load from it

    def adapts(self, load: str, iteration: int | str) -> bool:
        """Whether checkpoint `load` at `iteration` is the base: a frozen reference model that
        is the base is the trained model with its adapters off (`lora.disabled`), no copy."""
        return (os.path.abspath(load) == self.base
                and str(iteration) == str(self.base_iteration))

    def write_reference(self, root: str) -> None:
        lora_checkpoint.write_reference(root, self.config, self.base, self.base_iteration)


def setup(t: Any) -> TrainingAdapters | None:
    """The trainer's hook between building its model chunk (`t.module`) and wrapping it in DDP:
    load the base weights, freeze them and add the adapters. None when LoRA is off."""
    from megatron_patch import lora

    a = t.args
    resumed = bool(a.load) and lora_checkpoint.is_lora_checkpoint(a.load)
    flags = config_from_args(a)
    if flags is None and a.lora_load is None and not resumed:
        return None
    if resumed:
        config, base, base_iteration = lora_checkpoint.read_reference(a.load)
        if a.lora_load:
            raise ValueError(f"--lora-load: {a.load} is a LoRA checkpoint already (its adapters "
                             "load from it)")
        if flags is not None and flags != config:
            raise ValueError(f"--lora-* flags {flags} differ from the LoRA checkpoint {a.load}'s "
                             f"{config}; leave them out to resume")
    else:
        from megatron_patch.training.checkpointing import load_iteration

        base, base_iteration = a.load, load_iteration(a)
    if a.save and os.path.abspath(a.save) == os.path.abspath(base):
        raise ValueError(f"--save {a.save} is the base checkpoint the adapters belong to: save "
                         "the LoRA checkpoint elsewhere (it refers to the base by path)")
    checkpoint.load_model(base, t.module, base_iteration)
    if a.lora_load:
        config = lora.load_peft(t.module, t.hf_config, t.model_args, t.meta.padded_vocab_size,
                                a.lora_load)
        if flags is not None and flags.rank != config.rank:
            raise ValueError(f"--lora-rank {flags.rank}: the adapter {a.lora_load} has rank "
                             f"{config.rank} (leave the flag out: the adapter's settings apply)")
    else:
        config = config if resumed else flags
        lora.apply(t.module, t.hf_config, t.model_args, t.meta.padded_vocab_size, config,
                   seed=a.seed)
    trainable = sum(p.numel() for p in t.module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in t.module.parameters())
    if torch.distributed.get_rank() == 0:
        log.info("LoRA rank %d alpha %g on %s: %d trainable of %d parameters (this rank)",
                 config.rank, config.alpha, ",".join(config.target_modules), trainable, total)
    return TrainingAdapters(config, os.path.abspath(base), base_iteration, resumed)
