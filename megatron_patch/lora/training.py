"""LoRA in the trainer: the flags, the model hook (base weights loaded, adapters added, before
DDP wraps the model) and what a checkpoint holds (the adapters, and lora.json naming the base).

Flags (peft's meanings): --lora-rank R turns LoRA on; --lora-alpha (default R: scale 1, as
peft's defaults r=8, lora_alpha=8), --lora-dropout, --lora-target-modules (comma-separated
Megatron or HF module names, default all-linear), --lora-use-rslora; --lora-load ADAPTER_DIR
starts from a PEFT adapter directory; --lora-base-model-name-or-path names the HF base that
exported adapters record (peft's base_model_name_or_path).

An adapter's settings are its own, as peft loads them: with --lora-load, or when resuming a
LoRA checkpoint, a flag that says otherwise than the adapter (rank, alpha, rsLoRA, the
modules the targets select) is refused naming both values, and one that agrees is accepted.
--lora-dropout is a training setting rather than part of the adapter: it replaces a loaded
adapter's, but a resumed run keeps its checkpoint's (an exact resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any

import torch

from megatron_patch import checkpoint, lora
from megatron_patch.errors import FloatRange, positive_float, read_json
from megatron_patch.lora import checkpoint as lora_checkpoint
from megatron_patch.lora import peft
from megatron_patch.lora.layers import LoRAConfig
from megatron_patch.training.checkpointing import load_iteration

log = logging.getLogger("megatron_patch.train")

DROPOUT = FloatRange(0.0, 1.0, high_open=True)  # a probability of dropping, below 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA (adapters in Hugging Face PEFT format; base weights frozen)")
    g.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank instead of the full model")
    g.add_argument("--lora-alpha", type=positive_float, default=None,
                   help="scale = alpha / rank (default: the rank, scale 1)")
    g.add_argument("--lora-dropout", type=DROPOUT, default=None,
                   help="dropout on the adapters' input (peft's lora_dropout; default 0, or a "
                        "--lora-load adapter's)")
    g.add_argument("--lora-target-modules", default=None,
                   help="comma-separated: Megatron names (linear_qkv, linear_proj, linear_fc1, "
                        "linear_fc2: MoE experts' too), HF names (q_proj, k_proj, v_proj, "
                        "o_proj, gate_proj, up_proj, down_proj, ...), or all-linear (the "
                        "default)")
    g.add_argument("--lora-use-rslora", action="store_true",
                   help="rank-stabilised scale alpha / sqrt(rank)")
    g.add_argument("--lora-load", metavar="ADAPTER_DIR", default=None,
                   help="start from this PEFT adapter (adapter_config.json + "
                        "adapter_model.safetensors) on the --load base; its settings are the "
                        "adapter's")
    g.add_argument("--lora-base-model-name-or-path", metavar="NAME_OR_DIR", default=None,
                   help="the Hugging Face model (hub name or directory) the --load base was "
                        "converted from: exported adapters name it as base_model_name_or_path "
                        "(default: a --lora-load adapter's)")


# field of LoRAConfig -> its flag (argparse's dest is the flag's name)
_FLAGS = {"rank": "--lora-rank", "alpha": "--lora-alpha", "dropout": "--lora-dropout",
          "use_rslora": "--lora-use-rslora", "target_modules": "--lora-target-modules"}


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The LoRAConfig fields the command line sets explicitly (left out: not given)."""
    given = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in _FLAGS.items()}
    if given["target_modules"] is not None:
        given["target_modules"] = tuple(
            t.strip() for t in given["target_modules"].split(",") if t.strip())
    if given["alpha"] is not None:
        given["alpha"] = float(given["alpha"])
    # (by identity: 0 and 0.0 are given values, which `in (None, False)` would take for unset)
    return {field: value for field, value in given.items()
            if value is not None and value is not False}


def config_from_args(args: argparse.Namespace) -> LoRAConfig | None:
    """The flags' LoRAConfig (checked: a rank <= 0 is refused), or None without --lora-rank."""
    if args.lora_rank is None:
        return None
    given = given_settings(args)
    return LoRAConfig(**{"alpha": float(args.lora_rank), **given})


def clear_flags(args: argparse.Namespace) -> None:
    """Turn every LoRA flag off (a model trained whole beside a LoRA one, e.g. PPO's critic)."""
    for flag in (*_FLAGS.values(), "--lora-load", "--lora-base-model-name-or-path"):
        setattr(args, flag[2:].replace("-", "_"), None)
    args.lora_use_rslora = False


def validate(args: argparse.Namespace) -> None:
    """Refuse LoRA flag combinations before anything is built."""
    config_from_args(args)
    resuming = bool(args.load) and lora_checkpoint.is_lora_checkpoint(args.load)
    if args.lora_rank is None and args.lora_load is None and not resuming:
        given = [_FLAGS[f] for f in given_settings(args)]
        if args.lora_base_model_name_or_path is not None:
            given.append("--lora-base-model-name-or-path")
        if given:
            raise ValueError(f"{', '.join(given)} without --lora-rank (or --lora-load, or a "
                             "LoRA checkpoint as --load): LoRA is off")
    if (args.lora_rank or args.lora_load) and not args.load:
        raise ValueError("LoRA adapts a pretrained model: give --load (a converted checkpoint)")
    if (args.lora_rank or args.lora_load) and args.transformer_impl == "transformer_engine":
        raise ValueError("LoRA needs --transformer-impl local (Transformer Engine fuses the "
                         "norm into the linear, in front of where the adapter reads its input)")
    if args.lora_rank or args.lora_load or resuming:
        args.transformer_impl = "local"


def settle(t: Any, config: LoRAConfig, source: str, *, dropout_applies: bool) -> LoRAConfig:
    """The adapter settings `config` of `source` (a PEFT adapter, a LoRA checkpoint) held
    against the command line's: a flag that says otherwise is refused naming both values
    (target modules compare by the linears they select in this model); --lora-dropout, where
    `dropout_applies`, replaces the adapter's. Call it before the model is adapted."""
    def selects(targets: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
        return lora.select(lora.sites(t.module, t.hf_config, t.model_args,
                                      t.meta.padded_vocab_size), list(targets))

    given = given_settings(t.args)
    if dropout_applies:
        config = dataclasses.replace(config, dropout=given.pop("dropout", config.dropout))
    differ = []
    for field, value in given.items():
        held = getattr(config, field)
        same = (selects(value) == selects(held) if field == "target_modules" else value == held)
        if not same:
            show = (lambda v: ",".join(v)) if field == "target_modules" else str
            differ.append(f"{_FLAGS[field]} {show(value)}: the adapter has {show(held)}")
    if differ:
        raise ValueError(f"{'; '.join(differ)} ({source}); an adapter keeps its settings: "
                         "leave the flag out or give the adapter's value")
    return config


@dataclasses.dataclass
class TrainingAdapters:
    """A LoRA run's settings and the base checkpoint its adapters belong to."""

    config: LoRAConfig
    base: lora_checkpoint.BaseReference
    resumed: bool  # --load is a LoRA checkpoint: its adapters (and state) load from it

    def adapts(self, load: str, iteration: int | str) -> bool:
        """Whether checkpoint `load` at `iteration` is the base: a frozen reference model that
        is the base is the trained model with its adapters off (`lora.disabled`), no copy."""
        return (os.path.abspath(load) == self.base.path
                and str(iteration) == str(self.base.iteration))

    def write_reference(self, root: str) -> None:
        lora_checkpoint.write_reference(root, self.config, self.base)


def _base(t: Any, resumed: bool) -> tuple[LoRAConfig | None, lora_checkpoint.BaseReference]:
    """(the LoRA checkpoint's adapter settings, or None when not resuming; the base)."""
    a = t.args
    if not resumed:
        hf_name = a.lora_base_model_name_or_path
        if hf_name is None and a.lora_load is not None:
            hf_name = read_json(os.path.join(a.lora_load, peft.CONFIG_FILE)).get(
                "base_model_name_or_path")
        return None, lora_checkpoint.BaseReference.of(a.load, load_iteration(a), hf_name)
    if a.lora_load:
        raise ValueError(f"--lora-load: {a.load} is a LoRA checkpoint already (its adapters "
                         "load from it)")
    config, base = lora_checkpoint.read_reference(a.load)
    if a.lora_base_model_name_or_path is not None:  # a name only: it may change
        base.hf_name = a.lora_base_model_name_or_path
    return config, base


def setup(t: Any) -> TrainingAdapters | None:
    """The trainer's hook between building its model chunk (`t.module`) and wrapping it in DDP:
    load the base weights, freeze them and add the adapters. None when LoRA is off."""
    a = t.args
    resumed = bool(a.load) and lora_checkpoint.is_lora_checkpoint(a.load)
    if a.lora_rank is None and a.lora_load is None and not resumed:
        return None
    saved, base = _base(t, resumed)
    if a.save and os.path.abspath(a.save) == base.path:
        raise ValueError(f"--save {a.save} is the base checkpoint the adapters belong to: save "
                         "the LoRA checkpoint elsewhere (it refers to the base by path)")
    checkpoint.load_model(base.path, t.module, base.iteration)
    if a.lora_load:
        config = lora.load_peft(
            t.module, t.hf_config, t.model_args, t.meta.padded_vocab_size, a.lora_load,
            lambda held: settle(t, held, f"--lora-load {a.lora_load}", dropout_applies=True))
    else:
        config = (settle(t, saved, f"the LoRA checkpoint {a.load}", dropout_applies=False)
                  if resumed else config_from_args(a))
        lora.apply(t.module, t.hf_config, t.model_args, t.meta.padded_vocab_size, config,
                   seed=a.seed)
    trainable = sum(p.numel() for p in t.module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in t.module.parameters())
    if torch.distributed.get_rank() == 0:
        log.info("LoRA rank %d alpha %g dropout %g on %s: %d trainable of %d parameters (this "
                 "rank)", config.rank, config.alpha, config.dropout,
                 ",".join(config.target_modules), trainable, total)
    return TrainingAdapters(config, base, resumed)
