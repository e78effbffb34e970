"""Classic positional launchers -> torchrun + Megatron-LM flags.

The bash scripts under examples/ pass their positional arguments here unchanged; this module
names them, maps the short switches (PR, AC, DO, FL, SP) onto flags and starts torchrun.
Arguments after the positional ones are passed through as extra flags.

torchrun itself runs through `torchrun()` below: it prints the one-line error of the worker that
failed first, and torchrun's own report of the failure (a wall of tracebacks) is left out.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys

from megatron_patch import errors

PRETRAIN_FIELDS = (
    "ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR "
    "SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP SAVE_INTERVAL DATASET_PATH "
    "PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH"
).split()

FINETUNE_FIELDS = (
    "ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN "
    "EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH "
    "PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH"
).split()

GENERATE_FIELDS = (
    "ENV MEGATRON_PATH MEGATRON_PATCH_PATH CHECKPOINT_PATH MODEL_SIZE TP BS SEQ_LEN PAD_LEN "
    "EXTRA_VOCAB_SIZE PR TOP_K INPUT_SEQ_LEN OUTPUT_SEQ_LEN INPUT_FILE OUTPUT_FILE TOP_P "
    "TEMPERATURE REPETITION_PENALTY"
).split()

RL_FIELDS = (
    "ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PR TP AC DO "
    "PROMPT_DATASET_PATH REWARD PRETRAIN_CHECKPOINT_PATH TRAIN_ITERS ROLLOUT_BATCH_SIZE "
    "NUM_SAMPLES MAX_NEW_TOKENS SAVE_INTERVAL OUTPUT_BASEPATH"
).split()

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The fine-tuning scripts' positional arguments name no validation interval: validate every
# this many iterations, more often than the trainer's --eval-interval default (1000), which a
# short fine-tuning run may never reach.
FINETUNE_EVAL_INTERVAL = 100


def exit_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux's PR_SET_PDEATHSIG):
    torchrun's workers, and torchrun under this launcher, must not outlive the process that
    started them (orphaned workers went on training and saving checkpoints). Elsewhere a
    no-op. (A worker whose torchrun died before this cannot join the process group: torchrun
    holds its rendezvous store.)"""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _bool(name: str, value: str) -> bool:
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def precision_flags(pr: str) -> list[str]:
    flags = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"],
             "fp8": ["--bf16", "--fp8-format", "hybrid"]}
    if pr not in flags:
        raise ValueError(f"PR must be one of {', '.join(flags)}, got {pr!r}")
    return flags[pr]


def recompute_flags(ac: str) -> list[str]:
    flags = {"none": [], "sel": ["--recompute-activations"],
             "full": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                      "--recompute-num-layers", "1"]}
    if ac not in flags:
        raise ValueError(f"AC must be one of {', '.join(flags)}, got {ac!r}")
    return flags[ac]


def parallel_flags(v: dict[str, str]) -> list[str]:
    flags = ["--tensor-model-parallel-size", v["TP"], "--pipeline-model-parallel-size", v["PP"]]
    flags += precision_flags(v["PR"]) + recompute_flags(v["AC"])
    if _bool("DO", v["DO"]):
        flags.append("--use-distributed-optimizer")
    if _bool("FL", v["FL"]):
        flags.append("--use-flash-attn")
    if _bool("SP", v["SP"]):
        flags.append("--sequence-parallel")
    return flags


def positive(name: str, value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return size


def expert_parallel_size(extra: list[str]) -> int:
    """--expert-model-parallel-size among the extra flags (MoE models), else 1."""
    for i, flag in enumerate(extra):
        if flag == "--expert-model-parallel-size" and i + 1 < len(extra):
            return positive(flag, extra[i + 1])
        if flag.startswith("--expert-model-parallel-size="):
            return positive("--expert-model-parallel-size", flag.split("=", 1)[1])
    return 1


# `megatron-patch train` itself: the CLI registers rlhf's modes (rm, dpo), which the training
# package alone does not know.
TRAIN_COMMAND = ["-m", "megatron_patch", "train"]


def torchrun_prefix(env: str, tp: int, pp: int, ep: int = 1) -> list[str]:
    """dsw: one node, every local device (CPU: TP x PP x EP processes). dlc: a multi-node job
    whose WORLD_SIZE (nodes), RANK (node rank), MASTER_ADDR and MASTER_PORT come from the
    platform."""
    import torch

    local = int(os.environ.get("NPROC_PER_NODE") or os.environ.get("GPUS_PER_NODE")
                or torch.cuda.device_count() or tp * pp * ep)
    run = TORCHRUN + [f"--nproc_per_node={local}"]
    if env == "dsw":
        return run + ["--standalone"]
    if env == "dlc":
        missing = [k for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")
                   if k not in os.environ]
        if missing:
            raise ValueError(f"ENV=dlc needs {', '.join(missing)} in the environment")
        return run + [f"--nnodes={os.environ['WORLD_SIZE']}", f"--node_rank={os.environ['RANK']}",
                      f"--master_addr={os.environ['MASTER_ADDR']}",
                      f"--master_port={os.environ['MASTER_PORT']}"]
    raise ValueError(f"ENV must be dsw or dlc, got {env!r}")


# Positional sizes checked here: torchrun's process count is computed from TP and PP; the others
# are flags the worker's parser checks.
SIZES = ("TP", "PP", "BATCH_SIZE", "GLOBAL_BATCH_SIZE", "SEQ_LEN", "PAD_LEN", "BS")


def _named(fields: list[str], argv: list[str], script: str) -> tuple[dict[str, str], list[str]]:
    if len(argv) < len(fields):
        raise ValueError(f"usage: {script} " + " ".join(fields)
                         + f" [EXTRA FLAGS...] (got {len(argv)} arguments)")
    named = dict(zip(fields, argv[:len(fields)], strict=True))
    for name in SIZES:
        if name in named:
            positive(name, named[name])
    return named, argv[len(fields):]


def _unless_given(pairs: list[str], extra: list[str]) -> list[str]:
    """The launcher's `--flag value` pairs, less those the extra flags give again: the extra
    flag's value wins either way (argparse keeps the last), and the printed command holds each
    flag once."""
    given = {arg.split("=", 1)[0] for arg in extra if arg.startswith("--")}
    kept: list[str] = []
    for flag, value in zip(pairs[::2], pairs[1::2], strict=True):
        if flag not in given:
            kept += [flag, value]
    return kept


def _run_dirs(v: dict[str, str], mode: str) -> tuple[list[str], bool]:
    """--load/--save/--tensorboard-dir of a run, and whether it resumes: it resumes from its own
    checkpoints when they exist, else starts from PRETRAIN_CHECKPOINT_PATH."""
    name = (f"{mode}-{v['MODEL_SIZE']}-lr{v['LR']}-bs{v['BATCH_SIZE']}-seq{v['SEQ_LEN']}"
            f"-pr{v['PR']}-tp{v['TP']}-pp{v['PP']}")
    save = os.path.join(v["OUTPUT_BASEPATH"], "checkpoint", name)
    resume = os.path.isfile(os.path.join(save, "latest_checkpointed_iteration.txt"))
    load = save if resume else v["PRETRAIN_CHECKPOINT_PATH"]
    tensorboard = os.path.join(v["OUTPUT_BASEPATH"], "tensorboard", name)
    return ["--load", load, "--save", save, "--tensorboard-dir", tensorboard], resume


def pretrain_command(argv: list[str]) -> list[str]:
    v, extra = _named(PRETRAIN_FIELDS, argv, "run_pretrain_*.sh")
    dirs, _ = _run_dirs(v, f"pretrain-gbs{v['GLOBAL_BATCH_SIZE']}")
    flags = dirs + ["--data-path", *v["DATASET_PATH"].split()] + _unless_given([
        "--save-interval", v["SAVE_INTERVAL"],
        "--micro-batch-size", v["BATCH_SIZE"], "--global-batch-size", v["GLOBAL_BATCH_SIZE"],
        "--seq-length", v["SEQ_LEN"], "--lr", v["LR"], "--min-lr", v["MIN_LR"],
        "--train-tokens", v["TRAIN_TOKENS"], "--lr-warmup-tokens", v["WARMUP_TOKENS"],
        "--extra-vocab-size", v["EXTRA_VOCAB_SIZE"], "--log-interval", "1",
    ], extra) + parallel_flags(v) + extra
    return (torchrun_prefix(v["ENV"], int(v["TP"]), int(v["PP"]), expert_parallel_size(extra))
            + TRAIN_COMMAND + flags)


def finetune_command(argv: list[str]) -> list[str]:
    """SFT: samples are padded (or packed) to PAD_LEN, which must not exceed SEQ_LEN."""
    return _from_model_command(argv, "finetune", "run_finetune_*.sh")


def rm_command(argv: list[str]) -> list[str]:
    """Reward-model training (rlhf/run_rm_megatron.sh): the fine-tuning fields, with preference
    pairs as TRAIN/VALID_DATASET_PATH, each side padded to PAD_LEN."""
    return _from_model_command(argv, "rm", "run_rm_megatron.sh")


def dpo_command(argv: list[str]) -> list[str]:
    """DPO (rlhf/run_dpo_megatron.sh): the fine-tuning fields, with preference pairs as
    TRAIN/VALID_DATASET_PATH, each side padded to PAD_LEN; PRETRAIN_CHECKPOINT_PATH is the
    policy's start and the frozen reference. DPO's settings (--dpo-beta, --dpo-loss,
    --dpo-label-smoothing) go among the extra flags."""
    return _from_model_command(argv, "dpo", "run_dpo_megatron.sh")


def _from_model_command(argv: list[str], mode: str, script: str) -> list[str]:
    """A run of `--train-mode mode` from PRETRAIN_CHECKPOINT_PATH on JSON(L) records."""
    v, extra = _named(FINETUNE_FIELDS, argv, script)
    if int(v["PAD_LEN"]) > int(v["SEQ_LEN"]):
        raise ValueError(f"PAD_LEN {v['PAD_LEN']} exceeds SEQ_LEN {v['SEQ_LEN']}")
    dirs, resume = _run_dirs(v, mode)
    if not resume:
        # Starting from a model, not resuming this run: its weights only (a pretraining
        # checkpoint's optimizer state and iteration are not carried over).
        dirs.append("--finetune")
    flags = dirs + _unless_given([
        "--train-mode", mode, "--train-data-path", v["TRAIN_DATASET_PATH"],
        "--micro-batch-size", v["BATCH_SIZE"], "--seq-length", v["PAD_LEN"],
        "--lr", v["LR"], "--min-lr", v["MIN_LR"], "--epochs", v["EPOCH"],
        "--extra-vocab-size", v["EXTRA_VOCAB_SIZE"], "--log-interval", "1",
    ], extra) + parallel_flags(v) + extra
    if v["VALID_DATASET_PATH"] not in ("", "none"):
        flags += ["--valid-data-path", v["VALID_DATASET_PATH"], "--eval-interval",
                  str(FINETUNE_EVAL_INTERVAL)]
    return (torchrun_prefix(v["ENV"], int(v["TP"]), int(v["PP"]), expert_parallel_size(extra))
            + TRAIN_COMMAND + flags)


def generate_command(argv: list[str]) -> list[str]:
    """Offline generation; TOP_K=0 and TOP_P=0 mean greedy (Megatron-LM's convention)."""
    v, extra = _named(GENERATE_FIELDS, argv, "run_text_generation_*.sh")
    flags = ["--load", v["CHECKPOINT_PATH"], "--input-file", v["INPUT_FILE"],
             "--output-file", v["OUTPUT_FILE"], "--tensor-model-parallel-size", v["TP"]]
    flags += _unless_given([
        "--micro-batch-size", v["BS"], "--max-input-length", v["INPUT_SEQ_LEN"],
        "--max-new-tokens", v["OUTPUT_SEQ_LEN"], "--top-k", v["TOP_K"],
        "--top-p", v["TOP_P"], "--temperature", v["TEMPERATURE"],
        "--repetition-penalty", v["REPETITION_PENALTY"]], extra)
    # Inference has no FP8 path here: PR=fp8 generates in bf16 (its first flag).
    flags += precision_flags(v["PR"])[:1]
    return (torchrun_prefix(v["ENV"], int(v["TP"]), 1) + ["-m", "megatron_patch.generation"]
            + flags + extra)


def rl_command(argv: list[str], algorithm: str) -> list[str]:
    """PPO / GRPO (`megatron-patch rl`). REWARD: a reward-model checkpoint directory, or a
    rule-based reward function as module:function. The classic layout has no PP field: pass
    --pipeline-model-parallel-size among the extra flags (and NPROC_PER_NODE on a CPU)."""
    v, extra = _named(RL_FIELDS, argv, f"run_{algorithm}_megatron.sh")
    dirs, _ = _run_dirs({**v, "PP": "1"}, algorithm)  # a run resumes from its own checkpoints
    reward = v["REWARD"]
    reward_flags = (["--reward-model", reward] if os.path.isdir(reward)
                    else ["--reward-function", reward])
    flags = dirs + reward_flags + _unless_given([
        "--algorithm", algorithm, "--prompt-data-path", v["PROMPT_DATASET_PATH"],
        "--micro-batch-size", v["BATCH_SIZE"], "--seq-length", v["SEQ_LEN"], "--lr", v["LR"],
        "--min-lr", v["MIN_LR"], "--train-iters", v["TRAIN_ITERS"],
        "--rollout-batch-size", v["ROLLOUT_BATCH_SIZE"],
        "--num-samples-per-prompt", v["NUM_SAMPLES"], "--max-new-tokens", v["MAX_NEW_TOKENS"],
        "--save-interval", v["SAVE_INTERVAL"],
    ], extra) + parallel_flags({**v, "PP": "1", "FL": "false", "SP": "false"}) + extra
    return (torchrun_prefix(v["ENV"], int(v["TP"]), 1) + ["-m", "megatron_patch.rlhf.cli"]
            + flags)


COMMANDS = {"pretrain": pretrain_command, "finetune": finetune_command,
            "generate": generate_command, "rm": rm_command, "dpo": dpo_command,
            "grpo": lambda argv: rl_command(argv, "grpo"),
            "ppo": lambda argv: rl_command(argv, "ppo")}

# torchrun, through torchrun() below.
TORCHRUN = [sys.executable, "-m", "megatron_patch.launch", "torchrun"]


def torchrun(argv: list[str]) -> int:
    """torchrun with argv. Its workers do not print their errors: the line of the rank that
    failed first is printed here (the others' are often consequences, collectives whose peer
    is gone); torchrun's own report of the failure is shown only with --debug, where every
    rank prints its traceback itself."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if errors.debug_requested(argv):
        from torch.distributed.run import main as torchrun_main

        torchrun_main(argv)
        return 0
    # The agent logs each failed and stopped worker at WARNING/ERROR.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # The workers inherit this process's environment; restored after, as it was.
    previous = os.environ.get(errors.LAUNCHER_REPORTS_ENV)
    os.environ[errors.LAUNCHER_REPORTS_ENV] = "1"
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        return _report_first_failure(e)
    finally:
        if previous is None:
            os.environ.pop(errors.LAUNCHER_REPORTS_ENV, None)
        else:
            os.environ[errors.LAUNCHER_REPORTS_ENV] = previous
    return 0


def _report_first_failure(error) -> int:
    """Print the one-line error of the rank that failed first and return its exit status."""
    ours = {r: f for r, f in error.failures.items()
            if f.error_file_data.get("source") == errors.ERROR_FILE_SOURCE}
    if ours:
        rank = min(ours, key=lambda r: (ours[r].error_file_data.get("time_ns", 0), r))
        print(ours[rank].error_file_data["message"], file=sys.stderr, flush=True)
        if ours[rank].exitcode > 0:
            return ours[rank].exitcode
        # (It was stopped by torchrun once another rank exited, after writing its line.)
    rank, failure = error.get_first_failure()
    if not ours and failure.exitcode < 0:
        # Killed by a signal (out of memory, say): nobody else says so.
        print(f"megatron-patch: error: rank {rank} {failure.message}", file=sys.stderr,
              flush=True)
    # Else the worker exited with a status of its own, having said why (argparse's usage).
    codes = [f.exitcode for f in error.failures.values() if f.exitcode > 0]
    return max(codes) if codes else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["torchrun"]:
        return torchrun(argv[1:])
    if not argv or argv[0] not in COMMANDS:
        print(f"megatron-patch launch: error: usage: python -m megatron_patch.launch "
              f"{{{','.join(COMMANDS)}}} ARGS...", file=sys.stderr)
        return 2
    try:
        cmd = COMMANDS[argv[0]](argv[1:])
    except ValueError as e:
        print(f"megatron-patch {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    print("+ " + shlex.join(cmd), flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env, preexec_fn=exit_with_parent)


if __name__ == "__main__":
    sys.exit(main())
