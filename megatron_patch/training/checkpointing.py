"""A training run's checkpoints: what is saved (model, optimizer, schedule, RNG, data position),
the checks before saving into a directory, and the exact resume of a saved run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import re
import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from megatron_patch import checkpoint
from megatron_patch.convert.hf_io import copy_non_weight_files
from megatron_patch.lora import checkpoint as lora_checkpoint
from megatron_patch.models import family_for, load_hf_config
from megatron_patch.training import optim_state

if TYPE_CHECKING:
    from megatron_patch.training.loop import Trainer

log = logging.getLogger("megatron_patch.train")
_ITERATION_DIR = re.compile(r"iter_(\d+)")
# Lets a distributed-optimizer checkpoint load at another TP/PP/DP.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

# The learning-rate schedule's saved values, and the flags that set them.
_SCHEDULE_FLAGS = {
    "max_lr": "--lr", "min_lr": "--min-lr", "lr_decay_style": "--lr-decay-style",
    "lr_warmup_steps": "--lr-warmup-iters/--lr-warmup-tokens",
    "lr_decay_steps": "--train-iters/--train-tokens/--lr-decay-iters",
    "start_wd": "--weight-decay", "end_wd": "--weight-decay",
    "wd_incr_steps": "--train-iters/--train-tokens",
}


def architecture_conflicts(args: argparse.Namespace, m: Any) -> list[str]:
    """The architecture flags given that contradict the model args `m` of a loaded checkpoint
    (Megatron-LM's names; flags not given are taken from the checkpoint)."""
    valued = [("--num-layers", args.num_layers, m.num_layers),
              ("--hidden-size", args.hidden_size, m.hidden_size),
              ("--ffn-hidden-size", args.ffn_hidden_size, m.ffn_hidden_size),
              ("--num-attention-heads", args.num_attention_heads, m.num_attention_heads),
              ("--num-query-groups", args.num_query_groups, m.num_query_groups),
              ("--max-position-embeddings", args.max_position_embeddings,
               m.max_sequence_length),
              ("--normalization", args.normalization, m.normalization),
              ("--position-embedding-type (or --use-alibi-mask / "
               "--use-rotary-position-embeddings / --no-position-embedding)",
               args.position_embedding_type, m.position_embedding_type)]
    switches = [("--swiglu", args.swiglu, m.gated_linear_unit and m.activation == "silu"),
                ("--group-query-attention", args.group_query_attention,
                 m.num_query_groups != m.num_attention_heads),
                ("--untie-embeddings-and-output-weights", args.untie_embeddings_and_output_weights,
                 not m.share_embeddings_and_output_weights),
                ("--disable-bias-linear", args.disable_bias_linear, not m.add_bias_linear)]
    return ([f"{flag} {given} (the checkpoint has {saved})"
             for flag, given, saved in valued if given is not None and given != saved]
            + [f"{flag} (the checkpoint's architecture does not have it)"
               for flag, given, saved in switches if given and not saved])


def _rng_state(t: Trainer):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {"random": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    return ShardedObject(
        "rng_state", state, (t.pp, t.tp, t.dp),
        (parallel_state.get_pipeline_model_parallel_rank(),
         parallel_state.get_tensor_model_parallel_rank(), t.dp_rank),
        replica_id=0,
    )


def _set_rng_state(rng: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(rng["random"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])


def sharded_state(t: Trainer, loading: bool, optimizer: bool = True,
                  rng: bool = True) -> dict[str, Any]:
    """The sharded part of a checkpoint: model, optimizer and this rank's RNG state."""
    # A LoRA run saves and resumes its adapters only; the base stays where lora.json says.
    model_sd = (t.model.module.sharded_state_dict() if t.lora is None
                else lora_checkpoint.adapter_state(t.model.module))
    state: dict[str, Any] = {"model": model_sd}
    if optimizer:
        optim_state.ensure_adam_state(t.optimizer)
        state["optimizer"] = t.optimizer.sharded_state_dict(
            model_sd, is_loading=loading, metadata=_OPTIM_METADATA)
    if rng:
        state["rng_state"] = _rng_state(t)
    return state


def save(t: Trainer) -> None:
    """Save iteration `t.iteration` into --save (atomically: `checkpoint.save`)."""
    a = t.args
    state = sharded_state(t, loading=False)
    state.update(
        checkpoint_version=3.0, iteration=t.iteration, consumed_samples=t.consumed_samples,
        consumed_valid_samples=t.consumed_valid_samples,
        opt_param_scheduler=t.scheduler.state_dict(),
        parallel_layout=[t.tp, t.pp, t.dp], expert_parallel=t.ep, seq_length=a.seq_length,
        train_mode=a.train_mode, train_mode_state=t.mode.state_dict(),
    )
    if torch.distributed.get_rank() == 0:
        _write_model_files(t, a.save)
        if t.lora is not None:
            t.lora.write_reference(a.save)
    checkpoint.save(a.save, t.iteration, state)
    if torch.distributed.get_rank() == 0:
        print(f"saved checkpoint at iteration {t.iteration} to {a.save}", flush=True)


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def model_differences(t: Trainer, root: str) -> list[str]:
    """How the model of the checkpoint directory `root` (its megatron_patch.json and hf/)
    differs from the run's: architecture, padded vocabulary, model args (empty: the same)."""
    saved = checkpoint.read_meta(root)
    saved_hf = load_hf_config(os.path.join(root, checkpoint.HF_DIR))
    theirs = {"architecture": saved.architecture, "padded_vocab_size": saved.padded_vocab_size,
              **dataclasses.asdict(family_for(saved_hf).model_args(saved_hf))}
    ours = {"architecture": t.meta.architecture, "padded_vocab_size": t.meta.padded_vocab_size,
            **dataclasses.asdict(t.model_args)}
    return [f"{k} {theirs[k]!r} there, {ours[k]!r} here" for k in ours if theirs.get(k) != ours[k]]


def check_save_dir(t: Trainer) -> None:
    """Refuse a --save directory that holds another model's checkpoints (saving would mix the
    two; its megatron_patch.json and hf/ would describe this model's iterations), or iterations
    after the one this run starts from (saving would overwrite them and move the tracker back)
    unless --overwrite-checkpoints."""
    a = t.args
    _check_writable(a.save)
    if os.path.isfile(os.path.join(a.save, checkpoint.META)):
        if differ := model_differences(t, a.save):
            raise ValueError(f"--save {a.save} holds checkpoints of another model "
                             f"({os.path.join(a.save, checkpoint.META)}, "
                             f"{os.path.join(a.save, checkpoint.HF_DIR, 'config.json')}): "
                             f"{'; '.join(differ[:6])}; choose another --save directory")
    if a.overwrite_checkpoints:
        return
    saved_iterations = [int(m.group(1)) for m in map(_ITERATION_DIR.fullmatch,
                                                      _listdir(a.save)) if m]
    if newer := sorted(i for i in saved_iterations if i > t.iteration):
        raise ValueError(f"--save {a.save} holds iterations {newer} after the one this run "
                         f"starts from ({t.iteration}): saving would overwrite them and point "
                         f"{checkpoint.TRACKER} back. Resume them with --load {a.save}, choose "
                         "another --save, or pass --overwrite-checkpoints")


def _check_writable(save: str) -> None:
    """Refuse a --save that is a file, or a directory (or the nearest existing one above it)
    where no file can be created (read-only, no permission): found only at the first save,
    after the iterations ran. A probe file, removed at once, says it as the kernel does."""
    if os.path.exists(save) and not os.path.isdir(save):
        raise ValueError(f"--save {save} is a file, not a directory")
    existing = os.path.abspath(save)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--save {save}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".megatron_patch_write_test")
    except OSError as e:
        raise OSError(e.errno, f"--save cannot be written: no file can be created in "
                               f"{existing} ({e.strerror})", save) from None
    os.close(fd)
    os.remove(probe)


def _write_model_files(t: Trainer, root: str) -> None:
    """Give the save directory what export needs: HF config/tokenizer files and meta (where it
    has them, check_save_dir found them to describe this model)."""
    if os.path.isfile(os.path.join(root, checkpoint.META)):
        return
    hf_dir = os.path.join(root, checkpoint.HF_DIR)
    copy_non_weight_files(t.hf_source, hf_dir)
    # A model made from flags, or one the training mode describes differently from --load's
    # (a reward model started from a language model).
    if not t.args.load or t.hf_config != load_hf_config(t.hf_source):
        with open(os.path.join(hf_dir, "config.json"), "w") as f:
            json.dump(t.hf_config, f, indent=2)
    checkpoint.write_meta(root, t.meta)


def _check_resumable(t: Trainer, common: dict[str, Any]) -> None:
    """Refuse a resume whose saved state cannot continue under this command line."""
    a = t.args
    saved_mode = common.get("train_mode")
    if saved_mode not in (None, a.train_mode):
        raise ValueError(f"--train-mode {a.train_mode}: {a.load} is a --train-mode {saved_mode} "
                         "run, which a resumed run continues (to start a new run from its "
                         "weights, pass --finetune)")
    saved_seq = common.get("seq_length")
    if saved_seq is not None and saved_seq != a.seq_length:
        raise ValueError(f"--seq-length {a.seq_length}: {a.load} was trained at --seq-length "
                         f"{saved_seq}, which a resumed run keeps (to change it, start a new "
                         "run from its weights with --finetune)")
    if a.no_load_optim:
        return
    saved_ep = common.get("expert_parallel", 1)
    if saved_ep != t.ep:
        # Megatron-Core keeps expert and dense optimizer state apart only when EP > 1, so the
        # optimizer state does not reshard across EP (the weights do).
        raise ValueError(f"{a.load} was saved at --expert-model-parallel-size {saved_ep}; its "
                         f"optimizer state cannot resume at {t.ep}: resume at {saved_ep}, or "
                         "pass --no-load-optim or --finetune")
    saved_do = optim_state.saved_distributed(common.get("optimizer"))
    if saved_do not in (None, a.use_distributed_optimizer):
        # The two keep differently shaped state (Megatron-Core converts neither way).
        saved = "with" if saved_do else "without"
        raise ValueError(f"{a.load} was saved {saved} --use-distributed-optimizer: resume "
                         f"{saved} it, or pass --no-load-optim or --finetune (its optimizer "
                         "state cannot load into the other optimizer)")
    _check_schedule(a, t.scheduler.state_dict(), common["opt_param_scheduler"])


def _check_schedule(a: argparse.Namespace, given: dict[str, Any], saved: dict[str, Any]) -> None:
    """Megatron-LM's rule: a resumed learning-rate schedule must equal the command line's unless
    --override-opt-param-scheduler (the command line's) or --use-checkpoint-opt-param-scheduler
    (the checkpoint's) says which to follow."""
    if a.override_opt_param_scheduler or a.use_checkpoint_opt_param_scheduler:
        return
    differ = [f"{key} {saved[key]!r} saved, {given[key]!r} given ({flag})"
              for key, flag in _SCHEDULE_FLAGS.items() if key in saved and saved[key] != given[key]]
    if differ:
        raise ValueError(f"{a.load}: the learning-rate schedule it was saved with differs from "
                         f"the command line: {'; '.join(differ)}. Pass "
                         "--override-opt-param-scheduler to follow the command line, or "
                         "--use-checkpoint-opt-param-scheduler to keep the checkpoint's")


def load_iteration(a: argparse.Namespace) -> int | str:
    """The iteration of --load to start from: --ckpt-step, else the tracker's."""
    return a.ckpt_step if a.ckpt_step is not None else checkpoint.latest_iteration(a.load)


def load(t: Trainer) -> None:
    """Load --load: the weights only for a converted model ("release") or with --finetune;
    otherwise resume the saved run exactly (optimizer, schedule, data position, RNG)."""
    from megatron.core import dist_checkpointing

    a = t.args
    iteration = load_iteration(a)
    common = dist_checkpointing.load_common_state_dict(
        checkpoint.existing_iteration_dir(a.load, iteration))  # pickles verified first
    if t.lora is not None and not t.lora.resumed:
        return  # --load is the base, loaded before the adapters were added
    if a.finetune or iteration == "release" or "iteration" not in common:
        if t.lora is not None:
            lora_checkpoint.load_adapter(a.load, t.model.module, iteration)
        else:
            checkpoint.load_model(a.load, t.model.module, iteration,
                                  exclude=t.mode.unloaded_weights())
        if torch.distributed.get_rank() == 0:  # one line for the run, not one per rank
            log.info("loaded weights from %s (%s): fresh run", a.load, iteration)
        return
    _check_resumable(t, common)
    same_layout = list(common.get("parallel_layout", [])) == [t.tp, t.pp, t.dp]
    load_rng = same_layout and not a.no_load_rng
    state = checkpoint.load(a.load, sharded_state(t, True, not a.no_load_optim, load_rng),
                            iteration)
    loaded = t.model.module.load_state_dict(state["model"], strict=t.lora is None)
    if t.lora is not None and (missing := lora_checkpoint.adapter_keys(loaded.missing_keys)):
        raise ValueError(f"{a.load}: no saved adapter for {missing[:4]}")
    if not a.no_load_optim:
        optim_state.load(t.optimizer, state["optimizer"])
        t.scheduler.load_state_dict(state["opt_param_scheduler"])
    if load_rng:
        _set_rng_state(state["rng_state"])
    t.iteration = int(state["iteration"])
    t.consumed_samples = int(state["consumed_samples"])
    t.consumed_valid_samples = int(state.get("consumed_valid_samples", 0))
    t.mode.load_state_dict(state.get("train_mode_state") or {})
    if torch.distributed.get_rank() == 0:
        log.info("resumed %s at iteration %d", a.load, t.iteration)
