"""What conversion, checkpoints and resume refuse (issue 21, part A): nothing the user had is
lost or silently changed, a checkpoint's pickles cannot run code, a resume that contradicts its
checkpoint is refused, and torchrun's workers die with it.

Every refusal is checked three ways: the exception, that its message names the file or flag,
and that the directories it concerned hash the same before and after."""

import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import harness
import pytest
from harness import GLOBAL_BATCH, training_args


def _tree(root: str) -> dict[str, str]:
    """relative path -> sha256 of every file (and '<dir>' for every directory) under root."""
    out = {}
    for here, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(here, d), root)] = "<dir>"
        for f in files:
            with open(os.path.join(here, f), "rb") as fh:
                out[os.path.relpath(os.path.join(here, f), root)] = hashlib.sha256(
                    fh.read()).hexdigest()
    return out


def _error(fn, *args, **kwargs) -> str:
    """'ExceptionType: message' of what fn raises, or 'no error'."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # the type is part of what the tests check
        return f"{type(e).__name__}: {e}"
    return "no error"


class _Fault:
    """Replace module.name by a function that raises OSError(code) for the duration."""

    def __init__(self, module, name: str, code: int, when=lambda *a, **k: True) -> None:
        self.module, self.name, self.code, self.when = module, name, code, when

    def __enter__(self):
        self.real = getattr(self.module, self.name)

        def faulty(*args, **kwargs):
            if self.when(*args, **kwargs):
                path = next((a for a in args if isinstance(a, str)), None)
                raise OSError(self.code, os.strerror(self.code), path)
            return self.real(*args, **kwargs)

        setattr(self.module, self.name, faulty)

    def __exit__(self, *exc) -> None:
        setattr(self.module, self.name, self.real)


def _fake_training_run(root: str) -> None:
    """A directory as a training run leaves it (contents need not load: nothing may read it)."""
    os.makedirs(os.path.join(root, "iter_0000010"))
    os.makedirs(os.path.join(root, "hf"))
    for name, text in (("latest_checkpointed_iteration.txt", "10\n"),
                       ("iter_0000010/__0_0.distcp", "weights of model A"),
                       ("megatron_patch.json", '{"architecture": "LlamaForCausalLM"}'),
                       ("hf/config.json", '{"architectures": ["LlamaForCausalLM"]}')):
        with open(os.path.join(root, name), "w") as f:
            f.write(text)


# ---- 1, 3: conversion never overwrites, publishes in one rename, removes only its own staging

def _conversion_cases(root: str, hf_dir: str, ckpt: str) -> dict:
    from megatron_patch import checkpoint
    from megatron_patch.convert import distcp, hf_io
    from megatron_patch.convert.hf_megatron import hf_to_megatron, megatron_to_hf

    r: dict = {}
    run = os.path.join(root, "run")
    _fake_training_run(run)
    before = _tree(run)
    r["import_into_run"] = _error(hf_to_megatron, hf_dir, run)
    r["run_unchanged"] = _tree(run) == before

    def in_staging(*args, **kwargs) -> bool:
        return any(isinstance(a, str) and ".partial" in a for a in args)

    # Disk full while the weights are written, and while the HF files are copied after them.
    for case, fault in (("weights_enospc", _Fault(distcp.UnsyncedSave, "save", errno.ENOSPC)),
                        ("hf_files_enospc", _Fault(hf_io, "copy_non_weight_files",
                                                   errno.ENOSPC)),
                        ("read_only", _Fault(os, "makedirs", errno.EROFS, in_staging))):
        out = os.path.join(root, case)
        with fault:
            r[case] = _error(hf_to_megatron, hf_dir, out)
        r[case + "_left"] = sorted(n for n in os.listdir(root) if n.startswith(case))

    # Staging directories: somebody else's is refused and kept, ours is replaced.
    foreign = os.path.join(root, "foreign.partial")
    os.makedirs(foreign)
    with open(os.path.join(foreign, "notes.txt"), "w") as f:
        f.write("not ours")
    r["foreign_staging"] = _error(hf_to_megatron, hf_dir, os.path.join(root, "foreign"))
    r["foreign_export"] = _error(megatron_to_hf, ckpt, os.path.join(root, "foreign"))
    r["foreign_kept"] = _tree(foreign) == {"notes.txt": hashlib.sha256(b"not ours").hexdigest()}
    ours = os.path.join(root, "ours.partial")
    os.makedirs(ours)
    for name in (checkpoint.STAGING_MARKER, "half-written.distcp"):
        open(os.path.join(ours, name), "w").close()
    hf_to_megatron(hf_dir, os.path.join(root, "ours"))
    r["ours_published"] = sorted(os.listdir(os.path.join(root, "ours")))
    r["ours_release"] = sorted(os.listdir(os.path.join(root, "ours", "release")))
    r["ours_left"] = sorted(n for n in os.listdir(root) if n.startswith("ours"))

    # Export: disk full while writing, read-only output.
    for case, fault in (("export_enospc", _Fault(hf_io, "write_safetensors", errno.ENOSPC)),
                        ("export_read_only", _Fault(os, "makedirs", errno.EROFS, in_staging))):
        out = os.path.join(root, case)
        with fault:
            r[case] = _error(megatron_to_hf, ckpt, out)
        r[case + "_left"] = sorted(n for n in os.listdir(root) if n.startswith(case))
    r["export_into_run"] = _error(megatron_to_hf, ckpt, run)
    r["run_unchanged_after_export"] = _tree(run) == before
    return r


def test_conversion_refuses_existing_outputs_and_publishes_only_complete_ones(llama_models,
                                                                              tmp_path):
    hf_dir = os.path.join(llama_models["llama2"], "hf")
    ckpt = os.path.join(llama_models["llama2"], "mcore")
    (r,) = harness.run(_conversion_cases, 1, str(tmp_path), hf_dir, ckpt)
    run = str(tmp_path / "run")
    assert r["import_into_run"] == f"FileExistsError: {run} exists and is not empty: give a new " \
                                   "output directory", r
    assert r["export_into_run"] == r["import_into_run"]
    assert r["run_unchanged"] and r["run_unchanged_after_export"], r
    # A failed write names the output, says nothing was published and leaves nothing behind.
    for case in ("weights_enospc", "hf_files_enospc", "export_enospc"):
        assert r[case].startswith(f"OSError: [Errno 28] writing {tmp_path / case} failed, "
                                  "nothing was published"), (case, r[case])
    for case in ("read_only", "export_read_only"):
        assert r[case] == (f"OSError: [Errno 30] Read-only file system: "
                           f"'{tmp_path / case}.partial'"), (case, r[case])
    for case in ("weights_enospc", "hf_files_enospc", "export_enospc", "read_only",
                 "export_read_only"):
        assert r[case + "_left"] == [], (case, r)
    foreign = str(tmp_path / "foreign.partial")
    assert r["foreign_staging"].startswith(f"FileExistsError: {foreign} exists, holds files and "
                                           "was not made by megatron-patch"), r
    assert r["foreign_export"] == r["foreign_staging"] and r["foreign_kept"], r
    assert r["ours_published"] == ["hf", "latest_checkpointed_iteration.txt",
                                   "megatron_patch.json", "release"], r
    assert r["ours_release"] == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"], r
    assert r["ours_left"] == ["ours"], r


# ---- 4: a checkpoint's pickles cannot run code -----------------------------------------

class _Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted_pickle_cases(root: str, ckpt: str, data: str) -> dict:
    import pickle

    import torch

    from megatron_patch import generation, vocab
    from megatron_patch.convert.hf_megatron import megatron_to_hf
    from megatron_patch.training import loop

    marker = os.path.join(root, "PAYLOAD_RAN")
    r: dict = {}

    def crafted(name: str, file: str, write) -> str:
        path = os.path.join(root, name)
        shutil.copytree(ckpt, path)
        write(os.path.join(path, "release", file))
        return path

    def pickled(path: str) -> None:
        with open(path, "wb") as f:
            pickle.dump(_Payload(marker), f)

    metadata = crafted("metadata", ".metadata", pickled)
    common = crafted("common", "common.pt", lambda p: torch.save({"x": _Payload(marker)}, p))
    r["export"] = _error(megatron_to_hf, metadata, os.path.join(root, "out"))
    r["export_common"] = _error(megatron_to_hf, common, os.path.join(root, "out"))
    r["extend_vocab"] = _error(vocab.extend_megatron, metadata, os.path.join(root, "ext"),
                               ["hello"])
    r["train"] = _error(loop.Trainer, training_args(metadata, data, iters=3))
    parser = __import__("argparse").ArgumentParser()
    generation.add_arguments(parser)
    prompts = os.path.join(root, "prompts.jsonl")  # generation reads its prompts first
    with open(prompts, "w") as f:
        f.write('{"prompt": "hi"}\n')
    r["generate"] = _error(generation.run, parser.parse_args(
        ["--load", metadata, "--input-file", prompts, "--output-file", "none.out"]))
    # An HF directory whose pytorch_model.bin is the payload.
    from megatron_patch.convert.hf_megatron import hf_to_megatron

    hf_bin = os.path.join(root, "hf_bin")
    os.makedirs(hf_bin)
    shutil.copy(os.path.join(ckpt, "hf", "config.json"), hf_bin)
    torch.save({"model.embed_tokens.weight": _Payload(marker)},
               os.path.join(hf_bin, "pytorch_model.bin"))
    r["import_bin"] = _error(hf_to_megatron, hf_bin, os.path.join(root, "out_bin"))
    r["outputs"] = sorted(n for n in os.listdir(root) if n.startswith(("out", "ext")))

    # A training checkpoint whose RNG state (a pickled object record in the data file, which
    # DCP reads with torch.load(weights_only=False)) is the payload.
    from unittest import mock

    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_patch.training import checkpointing

    save = os.path.join(root, "evil_run")
    evil = ShardedObject("rng_state", _Payload(marker), (1, 1, 1), (0, 0, 0), replica_id=0)
    with mock.patch.object(checkpointing, "_rng_state", lambda trainer: evil):
        loop.Trainer(training_args(ckpt, data, iters=3, save=save)).train()
    r["resume_rng"] = _error(loop.Trainer, training_args(save, data, iters=3))
    r["payload_ran"] = os.path.exists(marker)
    return r


def test_crafted_checkpoint_pickles_are_refused_and_never_run(llama_models, tmp_path):
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    ckpt = os.path.join(llama_models["llama2"], "mcore")
    (r,) = harness.run(_crafted_pickle_cases, 1, str(tmp_path), ckpt, data)
    assert r["payload_ran"] is False, r
    metadata = tmp_path / "metadata" / "release" / ".metadata"
    refused = f"UnsafePickleError: {metadata}: refusing to unpickle posix.system"
    for case in ("export", "extend_vocab", "train", "generate"):
        assert r[case].startswith(refused), (case, r[case])
    common = tmp_path / "common" / "release" / "common.pt"
    assert r["export_common"].startswith(f"UnsafePickleError: {common}: refusing the common "
                                         "state"), r
    assert "posix.system" in r["export_common"], r
    data_file = tmp_path / "evil_run" / "iter_0000003" / "__0_0.distcp"
    assert r["resume_rng"].startswith(f"UnsafePickleError: {data_file}: refusing the record of "
                                      "rng_state"), r
    assert "posix.system" in r["resume_rng"], r
    bin_file = tmp_path / "hf_bin" / "pytorch_model.bin"
    assert r["import_bin"].startswith(f"UnsafePickleError: {bin_file}: refusing its tensors: it "
                                      "names posix.system"), r["import_bin"]
    assert r["outputs"] == [], r


# ---- 2, 5, 6: resume and --save -------------------------------------------------------

def _resume_cases(root: str, ckpt: str, other_model: str, data: str) -> dict:
    import math

    from megatron.core import dist_checkpointing

    from megatron_patch import checkpoint
    from megatron_patch.models import from_checkpoint
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.loop import Trainer

    r: dict = {}
    run = os.path.join(root, "run")
    # 4 iterations, warmup 2, cosine to min lr 1e-5, saved at 2 and 4.
    r["straight"] = [s["loss"] for s in Trainer(training_args(ckpt, data, iters=4, save=run,
                                                      save_interval=2)).train()]
    before = _tree(run)

    def refused(**kwargs) -> str:
        return _error(Trainer, training_args(run, data, **kwargs))

    # 5: a different schedule, sequence length or architecture flag.
    r["train_iters"] = refused(iters=6)
    r["lr"] = refused(iters=4, lr=2e-3)
    r["min_lr"] = refused(iters=4, extra=("--min-lr", "0"))
    r["decay_style"] = refused(iters=4, extra=("--lr-decay-style", "linear"))
    r["seq_length"] = refused(iters=4, extra=("--seq-length", "16"))
    sft_records = os.path.join(root, "sft.jsonl")
    with open(sft_records, "w") as f:
        for i in range(GLOBAL_BATCH):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    r["train_mode"] = refused(iters=4, extra=("--train-mode", "finetune",
                                              "--train-data-path", sft_records))
    r["num_layers"] = refused(iters=4, extra=("--num-layers", "3"))
    r["normalization"] = _error(Trainer, training_args(ckpt, data, extra=("--normalization",
                                                                   "LayerNorm")))
    r["both_flags"] = _error(parse_args, ["--seq-length", "8", "--train-iters", "1",
                                          "--override-opt-param-scheduler",
                                          "--use-checkpoint-opt-param-scheduler"])
    r["unchanged_after_refusals"] = _tree(run) == before

    def lrs(*flags) -> list[float]:
        return [s["lr"] for s in Trainer(training_args(run, data, iters=6, extra=flags)).train()]

    r["override_lrs"] = lrs("--override-opt-param-scheduler")
    r["checkpoint_lrs"] = lrs("--use-checkpoint-opt-param-scheduler")
    # The command line's cosine over 6 iterations (warmup 2, lr 1e-3 -> 1e-5), by hand; the
    # scheduler counts samples, and the lr logged after iteration k is the one at k * GLOBAL_BATCH.
    r["cosine_6"] = [1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (k - 2) / (6 - 2)))
                     for k in (5, 6)]

    # 2: --save holding another model's checkpoints, or iterations after the resumed one.
    other = os.path.join(root, "other")
    shutil.copytree(other_model, other)
    other_before = _tree(other)
    r["other_model"] = _error(Trainer, training_args(ckpt, data, iters=3, save=other))
    r["other_unchanged"] = _tree(other) == other_before
    harness.stopped_at(run, 2)
    before = _tree(run)
    r["newer"] = _error(Trainer, training_args(run, data, iters=4, save=run))
    r["unchanged_after_newer"] = _tree(run) == before
    r["overwritten"] = [s["loss"] for s in Trainer(training_args(
        run, data, iters=4, save=run, extra=("--overwrite-checkpoints",))).train()]
    r["latest"] = checkpoint.latest_iteration(run)

    # A save that fails (disk full; read-only) or finds somebody else's iter_N.partial leaves
    # the previous checkpoint and the tracker as they were.
    before = _tree(run)
    for case, fault in (("save_enospc", _Fault(dist_checkpointing, "save", errno.ENOSPC)),
                        ("save_read_only", _Fault(os, "makedirs", errno.EROFS,
                                                  lambda p, *a, **k: str(p).endswith(
                                                      ".partial")))):
        with fault:
            r[case] = _error(Trainer(training_args(
                run, data, iters=6, save=run, save_interval=2,
                extra=("--use-checkpoint-opt-param-scheduler",))).train)
        after = _tree(run)
        r[case + "_kept"] = all(after.get(k) == v for k, v in before.items())
    partial = os.path.join(run, "iter_0000006.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    with open(os.path.join(partial, "notes.txt"), "w") as f:
        f.write("mine")
    before = _tree(run)
    r["foreign_partial"] = _error(Trainer(training_args(
        run, data, iters=6, save=run, save_interval=2,
        extra=("--use-checkpoint-opt-param-scheduler",))).train)
    r["foreign_partial_kept"] = _tree(run) == before

    # 6: hf/config.json naming another architecture than megatron_patch.json.
    mismatched = os.path.join(root, "mismatched")
    shutil.copytree(ckpt, mismatched)
    config_path = os.path.join(mismatched, "hf", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    with open(config_path, "w") as f:
        json.dump(config, f)
    r["arch_train"] = _error(Trainer, training_args(mismatched, data, iters=3))
    r["arch_load"] = _error(from_checkpoint, mismatched)
    return r


def test_resume_refuses_what_contradicts_the_checkpoint(llama_models, tmp_path):
    from megatron_patch import tiny

    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    ckpt = os.path.join(llama_models["llama2"], "mcore")
    other = os.path.join(llama_models["llama1_tied"], "mcore")
    (r,) = harness.run(_resume_cases, 1, str(tmp_path), ckpt, other, data)
    run = tmp_path / "run"
    schedule = f"ValueError: {run}: the learning-rate schedule it was saved with differs"
    for case, named in (("train_iters", f"lr_decay_steps {4 * GLOBAL_BATCH} saved, "
                                        f"{6 * GLOBAL_BATCH} given "
                                        "(--train-iters/--train-tokens/--lr-decay-iters)"),
                        ("lr", "max_lr 0.001 saved, 0.002 given (--lr)"),
                        ("min_lr", "min_lr 1e-05 saved, 0.0 given (--min-lr)"),
                        ("decay_style", "lr_decay_style 'cosine' saved, 'linear' given "
                                        "(--lr-decay-style)")):
        assert r[case].startswith(schedule) and named in r[case], (case, r[case])
        assert "--override-opt-param-scheduler" in r[case], r[case]
    assert r["train_mode"].startswith(f"ValueError: --train-mode finetune: {run} is a "
                                      "--train-mode pretrain run"), r["train_mode"]
    assert r["seq_length"].startswith(f"ValueError: --seq-length 16: {run} was trained at "
                                      "--seq-length 32"), r["seq_length"]
    layers = tiny.COMMON["num_hidden_layers"]  # the tiny model's config
    assert f"--num-layers 3 (the checkpoint has {layers})" in r["num_layers"], r["num_layers"]
    assert "--normalization LayerNorm (the checkpoint has RMSNorm)" in r["normalization"], r
    assert r["both_flags"] == ("ValueError: --override-opt-param-scheduler and "
                               "--use-checkpoint-opt-param-scheduler are exclusive"), r
    assert r["unchanged_after_refusals"], r
    # Overriding follows the command line's 6-iteration cosine (fp64 formula, same operations:
    # 1e-12 relative); keeping the checkpoint's stays at its end, the min lr.
    pairs = zip(r["override_lrs"], r["cosine_6"], strict=True)
    assert len(r["override_lrs"]) == 2 and all(abs(a - b) <= 1e-12 * b for a, b in pairs), r
    assert r["override_lrs"][0] > 1e-4, r  # the bug: iterations after the saved end at min lr
    assert r["checkpoint_lrs"] == [1e-5, 1e-5], r

    assert r["other_model"].startswith(f"ValueError: --save {tmp_path / 'other'} holds "
                                       "checkpoints of another model"), r["other_model"]
    assert "share_embeddings_and_output_weights True there, False here" in r["other_model"], r
    assert r["other_unchanged"], r
    assert r["newer"].startswith(f"ValueError: --save {run} holds iterations [4] after the one "
                                 "this run starts from (2)"), r["newer"]
    assert "--overwrite-checkpoints" in r["newer"] and r["unchanged_after_newer"], r
    # Told to, it resumes from 2 and redoes 3-4 exactly (same layout: bit-exact).
    assert r["overwritten"] == r["straight"][2:] and r["latest"] == 4, r
    assert r["save_enospc"].startswith("OSError: [Errno 28]") and r["save_enospc_kept"], r
    assert r["save_read_only"].startswith("OSError: [Errno 30]"), r
    assert "iter_0000006.partial" in r["save_read_only"] and r["save_read_only_kept"], r
    assert r["foreign_partial"].startswith(f"FileExistsError: {run / 'iter_0000006.partial'} "
                                           "exists, holds files and was not made by "
                                           "megatron-patch"), r["foreign_partial"]
    assert r["foreign_partial_kept"], r
    meta = tmp_path / "mismatched" / "megatron_patch.json"
    config = tmp_path / "mismatched" / "hf" / "config.json"
    named = (f"ValueError: {meta} records architecture LlamaForCausalLM, but {config} names "
             "MistralForCausalLM")
    assert r["arch_train"].startswith(named) and r["arch_load"].startswith(named), r


# ---- issue 28, 3: a base or reference replaced at its recorded path -----------------------

def _replaced_base_cases(root: str, ckpt: str, data: str) -> dict:
    """A LoRA run, a DPO run, a GRPO and a PPO run (KL to the reference) from a copy of `ckpt`,
    then that copy replaced by another model of the same architecture and shape (other
    weights): resuming each, and exporting the LoRA run merged, must refuse."""
    import logging

    from megatron_patch import tiny
    from megatron_patch.convert.hf_megatron import hf_to_megatron
    from megatron_patch.lora import checkpoint as lora_checkpoint
    from megatron_patch.rlhf import cli as rl_cli
    from megatron_patch.rlhf.loop import RLTrainer
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.loop import Trainer

    base, other = os.path.join(root, "base"), os.path.join(root, "other")
    shutil.copytree(ckpt, base)
    tiny.make_hf_model(os.path.join(other, "hf"), "llama2", seed=1)
    hf_to_megatron(os.path.join(other, "hf"), os.path.join(other, "mcore"))
    runs = {k: os.path.join(root, k) for k in ("lora", "dpo", "grpo", "ppo")}
    pairs = os.path.join(root, "pairs.jsonl")
    with open(pairs, "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n")
    prompts = os.path.join(root, "prompts.jsonl")
    with open(prompts, "w") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in ("One", "Two")))

    def lora(load: str, *extra: str):
        return training_args(load, data, iters=3, save=runs["lora"],
                             extra=("--lora-rank", "4", "--lora-target-modules", "q_proj",
                                    *extra))

    def dpo(load: str):
        return parse_args(["--train-mode", "dpo", "--load", load, "--train-data-path", pairs,
                           "--seq-length", "96", "--micro-batch-size", "2",
                           "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-3",
                           "--save", runs["dpo"], "--eval-interval", "1000"])

    def rl(algorithm: str, load: str):
        return rl_cli.parse_args(["--algorithm", algorithm, "--load", load,
                                  "--prompt-data-path", prompts,
                                  "--reward-function", "rl_rewards:digits", "--seq-length", "16",
                                  "--max-new-tokens", "4", "--train-iters", "2",
                                  "--rollout-batch-size", "2", "--num-samples-per-prompt", "2",
                                  "--micro-batch-size", "4", "--kl-coef", "0.05",
                                  "--save", runs[algorithm]])

    Trainer(lora(base, "--exit-interval", "1")).train()
    Trainer(dpo(base)).train()
    for algorithm in ("grpo", "ppo"):
        RLTrainer(rl(algorithm, base)).train()
    with open(os.path.join(runs["lora"], lora_checkpoint.LORA_FILE)) as f:
        r: dict = {"recorded": json.load(f)["base"]}
    shutil.rmtree(base)
    shutil.copytree(os.path.join(other, "mcore"), base)
    before = {k: _tree(v) for k, v in runs.items()}
    r["lora"] = _error(Trainer, lora(runs["lora"]))
    r["merge"] = _error(lora_checkpoint.export, runs["lora"], os.path.join(root, "merged"),
                        merge=True)
    r["dpo"] = _error(Trainer, dpo(runs["dpo"]))
    for algorithm in ("grpo", "ppo"):
        r[algorithm] = _error(RLTrainer, rl(algorithm, runs[algorithm]))
    r["runs_unchanged"] = {k: _tree(v) for k, v in runs.items()} == before
    r["merged_written"] = os.path.exists(os.path.join(root, "merged"))

    # A copy of the original at that path is the original: accepted. A lora.json written before
    # fingerprints were recorded loads with a warning, and the next save records one.
    shutil.rmtree(base)
    shutil.copytree(ckpt, base)
    with open(os.path.join(runs["lora"], lora_checkpoint.LORA_FILE)) as f:
        record = json.load(f)
    for key in ("architecture", "fingerprint", "hf_name"):
        record["base"].pop(key, None)
    with open(os.path.join(runs["lora"], lora_checkpoint.LORA_FILE), "w") as f:
        json.dump(record, f)
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda rec: warnings.append(rec.getMessage())
    logging.getLogger("megatron_patch").addHandler(handler)
    try:
        r["old_format_losses"] = len(Trainer(lora(runs["lora"])).train())
    finally:
        logging.getLogger("megatron_patch").removeHandler(handler)
    r["old_format_warnings"] = [w for w in warnings if "fingerprint" in w]
    with open(os.path.join(runs["lora"], lora_checkpoint.LORA_FILE)) as f:
        r["rerecorded"] = json.load(f)["base"]
    return r


def test_a_base_or_reference_replaced_at_its_path_is_refused(llama_models, tmp_path):
    """Issue 28, 3: lora.json and the DPO / GRPO / PPO reference state record what their base or
    reference is (architecture, fingerprint) with its path; another model at that path is
    refused naming both fingerprints, nothing written. A copy of the same checkpoint is
    accepted, and a lora.json without a fingerprint (older runs) loads with a warning."""
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    ckpt = os.path.join(llama_models["llama2"], "mcore")
    (r,) = harness.run(_replaced_base_cases, 1, str(tmp_path), ckpt, data)
    base = tmp_path / "base"
    recorded = r["recorded"].get("fingerprint")
    for case, what in (("lora", f"the base checkpoint named by {tmp_path / 'lora'}/lora.json,"),
                       ("merge", f"the base checkpoint named by {tmp_path / 'lora'}/lora.json,"),
                       ("dpo", "the DPO reference model"), ("grpo", "the KL reference model"),
                       ("ppo", "the KL reference model")):
        message = r[case]
        assert message.startswith(f"ValueError: {what} {base} (iteration release) is not the "
                                  "model that was recorded"), (case, message)
        found = message.split("found LlamaForCausalLM fingerprint ")[1].split()[0]
        assert f"recorded LlamaForCausalLM fingerprint {recorded}" in message, (case, message)
        assert found != recorded, (case, message)
    assert r["recorded"]["architecture"] == "LlamaForCausalLM", r["recorded"]
    assert r["runs_unchanged"] and not r["merged_written"], r
    assert r["old_format_losses"] == 2, r
    assert len(r["old_format_warnings"]) == 1 and "accepted unchecked" in (
        r["old_format_warnings"][0]), r["old_format_warnings"]
    assert r["rerecorded"]["fingerprint"] == recorded, r["rerecorded"]


# ---- 11: torchrun's workers die with it -------------------------------------------------

WORKER = """
import os, sys, time
from megatron_patch import parallel
parallel.initialize(1, 1)
open(os.path.join(sys.argv[1], f"{os.getpid()}.pid"), "w").close()
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (dead, waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_workers_exit_when_torchrun_is_killed(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    pids = tmp_path / "pids"
    pids.mkdir()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(pids)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = time.time() + 120
        while len(workers) < 2 and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.2)
            workers = [int(n.removesuffix(".pid")) for n in os.listdir(pids)]
        assert len(workers) == 2, launcher.stderr.read().decode()[-3000:]
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 5
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), [p for p in workers if _alive(p)]
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


# ---- issue 28, 1: a run whose loss or gradients turn non-finite stops before that step -----

def _saved_iterations(save: str) -> list[int]:
    return sorted(int(n.removeprefix("iter_")) for n in os.listdir(save)
                  if n.startswith("iter_") and n.removeprefix("iter_").isdigit())


def _nan_gradient_at(trainer, iteration: int, rank: int) -> None:
    """From now on, iteration `iteration`'s gradient of one parameter of this rank's stage is
    NaN on rank `rank` only (the others' stay finite): a tensor hook on the parameter changes
    its gradient before DDP accumulates it."""
    import torch

    if torch.distributed.get_rank() != rank:
        return
    param = [p for p in trainer.module.parameters() if p.requires_grad][-1]
    param.register_hook(lambda g: g * float("nan") if trainer.iteration == iteration - 1 else g)


def _diverging_runs(root: str, ckpt: str, data: str) -> dict:
    from megatron_patch.training.loop import Trainer

    r: dict = {}

    def run(name: str, lr: float = 1e-3, extra: tuple = (), nan_at: int | None = None) -> None:
        save = os.path.join(root, name)
        trainer = Trainer(training_args(ckpt, data, iters=6, save=save, save_interval=1, lr=lr,
                                        extra=extra))
        if nan_at:
            _nan_gradient_at(trainer, nan_at, rank=0)
        r[name] = _error(lambda: r.setdefault(name + "_history", [
            (s["loss"], s["grad_norm"]) for s in trainer.train()]))
        r[name + "_saved"] = _saved_iterations(save)

    run("lr", lr=1e30)  # Adam moves every weight by about the lr: the loss overflows
    run("lr_unchecked", lr=1e30, extra=("--no-check-for-nan-in-loss-and-grad",))
    run("grad", nan_at=3)
    return r


def test_a_non_finite_loss_or_gradient_stops_the_run_before_its_step(llama_models, tmp_path):
    import re

    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    ckpt = os.path.join(llama_models["llama2"], "mcore")
    (r,) = harness.run(_diverging_runs, 1, str(tmp_path), ckpt, data)
    # Unchecked, the same run trains on non-finite losses to the end and saves them (the bug).
    assert r["lr_unchecked"] == "no error" and r["lr_unchecked_saved"] == [1, 2, 3, 4, 5, 6], r
    history = r["lr_unchecked_history"]
    first_bad = next(i for i, (loss, grad_norm) in enumerate(history, 1)
                     if not (math.isfinite(loss) and math.isfinite(grad_norm)))
    assert first_bad > 1 and not math.isfinite(history[-1][0]), history
    # Checked, it stops at that iteration, naming it, with only the iterations before it saved.
    loss, _ = history[first_bad - 1]
    what = (f"the loss (lm loss) is {loss}" if not math.isfinite(loss) else
            "a gradient is NaN (the loss is finite)")
    assert r["lr"].startswith(f"NonFiniteError: iteration {first_bad}: {what}; stopped before "
                              "its optimizer step"), (r["lr"], history)
    assert "--no-check-for-nan-in-loss-and-grad" in r["lr"], r["lr"]
    assert r["lr_saved"] == list(range(1, first_bad)), r
    assert re.match(r"NonFiniteError: iteration 3: a gradient is NaN \(the loss is finite\)",
                    r["grad"]), r["grad"]
    assert r["grad_saved"] == [1, 2], r


def _diverging_layouts(root: str, ckpt: str, data: str) -> dict:
    """At each two-rank layout, a run whose gradient is NaN on rank 1 alone at iteration 2."""
    from megatron_patch.training.loop import Trainer

    r = {}
    for name, tp, pp, do in (("tp", 2, 1, False), ("pp", 1, 2, False), ("dp", 1, 1, False),
                             ("dp_distributed_optimizer", 1, 1, True)):
        save = os.path.join(root, name)
        trainer = Trainer(training_args(ckpt, data, iters=3, tp=tp, pp=pp, do=do, save=save,
                                        save_interval=1))
        _nan_gradient_at(trainer, 2, rank=1)
        r[name] = _error(trainer.train)
        r[name + "_saved"] = _saved_iterations(save)
    return r


def test_every_rank_stops_together_when_one_ranks_gradient_is_nan(llama_models, tmp_path):
    """The verdict is reduced over the ranks: rank 0, whose own gradients are finite, stops at
    the same iteration instead of stepping on into a collective rank 1 never joins (a hang)."""
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    ckpt = os.path.join(llama_models["llama2"], "mcore")
    ranks = harness.run(_diverging_layouts, 2, str(tmp_path), ckpt, data, timeout=300)
    for layout in ("tp", "pp", "dp", "dp_distributed_optimizer"):
        for rank, r in enumerate(ranks):
            assert r[layout].startswith("NonFiniteError: iteration 2: a gradient is NaN (the "
                                        "loss is finite)"), (layout, rank, r[layout])
        assert ranks[0][layout + "_saved"] == [1], (layout, ranks[0])


# ---- issue 28: --hf-config may not add what the Megatron-LM checkpoint's args never had ------

def test_import_megatron_hf_config_may_not_add_a_sliding_window(tmp_path):
    """`convert import-megatron --hf-config`: a config describing the args' model is taken; the
    same config with a sliding window (which Megatron-LM's args here never had) is refused
    naming the field. (It used to be taken: the exported model attended differently.)"""
    import argparse

    import pytest

    from megatron_patch.convert.megatron_lm.architecture import architecture, derived_hf_config

    args = argparse.Namespace(
        num_layers=4, hidden_size=64, num_attention_heads=4, group_query_attention=True,
        num_query_groups=2, ffn_hidden_size=96, kv_channels=16, swiglu=True,
        normalization="RMSNorm", add_bias_linear=False, position_embedding_type="rope",
        untie_embeddings_and_output_weights=True, norm_epsilon=1e-5, rotary_base=10000,
        max_position_embeddings=256, seq_length=256, padded_vocab_size=1024)
    derived = derived_hf_config(args, 1000, "ckpt")
    same = dict(derived, architectures=["MistralForCausalLM"], model_type="mistral",
                sliding_window=None)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(same))
    assert architecture(args, "ckpt", str(path))["model_type"] == "mistral"
    path.write_text(json.dumps(dict(same, sliding_window=8)))
    with pytest.raises(ValueError, match=rf"^{path} does not describe the model of ckpt: "
                                         r"sliding_window: .* config 8$"):
        architecture(args, "ckpt", str(path))


# ---- issue 27, 7: tests leave no process behind --------------------------------------------

def _leave_a_child_behind() -> None:
    subprocess.Popen(["sleep", "300"])  # the worker leaves through os._exit: nothing reaps it


def test_a_process_a_worker_leaves_behind_fails_the_run_and_is_killed():
    """harness.run (and, at the end, the session's no_process_left_behind) sees the orphan of a
    forked worker, which the subreaper made the test process's child, names it, and kills it."""
    with pytest.raises(AssertionError, match="left processes running") as failed:
        harness.run(_leave_a_child_behind, 1)
    (pid,) = (int(p) for p in re.findall(r"(\d+): 'sleep 300'", str(failed.value)))
    assert not _alive(pid), pid


LEAVES_A_CHILD = """
import subprocess

def test_leaves_a_child():
    subprocess.Popen(["sleep", "300"])
"""


def test_the_session_fails_when_a_test_leaves_a_process(tmp_path):
    """The session-end check (process_check, on its own: no megatron import) fails a session
    whose test passed but left a child running, names it, and kills it."""
    (tmp_path / "test_leak.py").write_text(LEAVES_A_CHILD)
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "process_check", "-p", "no:cacheprovider",
         "test_leak.py"], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=tests),
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "1 passed, 1 error" in proc.stdout, proc.stdout[-3000:]
    # The pid is named in the error and again in the short summary (untruncated when CI is set).
    (pid,) = {int(p) for p in re.findall(r"(\d+): 'sleep 300'", proc.stdout)}
    assert not _alive(pid), pid
