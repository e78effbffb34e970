"""Classic positional launchers -> torchrun + Megatron-LM flags.

The bash scripts under examples/ pass their positional arguments here unchanged; this module
names them, maps the short switches (PR, AC, DO, FL, SP) onto flags and starts torchrun.
Arguments after the positional ones are passed through as extra flags.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

PRETRAIN_FIELDS = (
    "ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR "
    "SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP SAVE_INTERVAL DATASET_PATH "
    "PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH"
).split()

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


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


def torchrun_prefix(env: str, tp: int, pp: int) -> list[str]:
    """dsw: one node, every local device (CPU: TP x PP processes). dlc: a multi-node job whose
    WORLD_SIZE (nodes), RANK (node rank), MASTER_ADDR and MASTER_PORT come from the platform."""
    import torch

    local = int(os.environ.get("NPROC_PER_NODE") or os.environ.get("GPUS_PER_NODE")
                or torch.cuda.device_count() or tp * pp)
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={local}"]
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


def pretrain_command(argv: list[str]) -> list[str]:
    if len(argv) < len(PRETRAIN_FIELDS):
        raise ValueError("usage: run_pretrain_*.sh " + " ".join(PRETRAIN_FIELDS)
                         + f" [EXTRA FLAGS...]\n(got {len(argv)} arguments)")
    v = dict(zip(PRETRAIN_FIELDS, argv))
    extra = argv[len(PRETRAIN_FIELDS):]
    name = (f"pretrain-{v['MODEL_SIZE']}-lr{v['LR']}-bs{v['BATCH_SIZE']}-gbs"
            f"{v['GLOBAL_BATCH_SIZE']}-seq{v['SEQ_LEN']}-pr{v['PR']}-tp{v['TP']}-pp{v['PP']}")
    out = v["OUTPUT_BASEPATH"]
    save = os.path.join(out, "checkpoint", name)
    # Resume the run when its own checkpoints exist, otherwise start from the given model.
    resume = os.path.isfile(os.path.join(save, "latest_checkpointed_iteration.txt"))
    flags = [
        "--load", save if resume else v["PRETRAIN_CHECKPOINT_PATH"], "--save", save,
        "--save-interval", v["SAVE_INTERVAL"], "--data-path", *v["DATASET_PATH"].split(),
        "--micro-batch-size", v["BATCH_SIZE"], "--global-batch-size", v["GLOBAL_BATCH_SIZE"],
        "--seq-length", v["SEQ_LEN"], "--lr", v["LR"], "--min-lr", v["MIN_LR"],
        "--train-tokens", v["TRAIN_TOKENS"], "--lr-warmup-tokens", v["WARMUP_TOKENS"],
        "--extra-vocab-size", v["EXTRA_VOCAB_SIZE"],
        "--tensorboard-dir", os.path.join(out, "tensorboard", name),
        "--log-interval", "1",
    ] + parallel_flags(v) + extra
    return (torchrun_prefix(v["ENV"], int(v["TP"]), int(v["PP"]))
            + ["-m", "megatron_patch.training.loop"] + flags)


COMMANDS = {"pretrain": pretrain_command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m megatron_patch.launch {{{','.join(COMMANDS)}}} ARGS...",
              file=sys.stderr)
        return 2
    try:
        cmd = COMMANDS[argv[0]](argv[1:])
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    print("+ " + shlex.join(cmd), flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
