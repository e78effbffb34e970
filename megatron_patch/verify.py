"""Numerical parity of a converted checkpoint with its Hugging Face original, at a chosen layout.

Started by `megatron-patch verify` under torchrun (one process per TP x PP rank). Every rank runs
the Megatron model on the same random token batch; the last pipeline stage's first TP rank also
runs the transformers model and prints one JSON line:

    {"max_abs_diff": ..., "mean_abs_diff": ..., "argmax_agreement": ..., "loss_hf": ...,
     "loss_megatron": ..., "loss_diff": ..., "tp": T, "pp": P, "sp": bool, "ok": bool}

and exits 1 when a difference is above --atol (logits) or --loss-atol.

A reward model (`*ForSequenceClassification`) is compared by its scores instead, against
transformers' AutoModelForSequenceClassification: {"max_abs_diff" (scores), "tp", "pp", "sp",
"ok"}, with --atol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_patch.errors import ArgumentParser, nonnegative_float, positive_int, run_main
from megatron_patch.launch import TORCHRUN

# Function-level imports: the worker's modules import torch and megatron.core; the parser and
# the launcher (the light CLI) do not need them.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="the original HF model directory")
    parser.add_argument("ckpt_dir", help="the converted checkpoint (`convert hf-to-megatron`'s "
                                         "output, or a training checkpoint of the same model)")
    parser.add_argument("--tp", "--tensor-model-parallel-size", type=positive_int, default=1,
                        dest="tp", help="tensor parallel size to load the checkpoint at "
                                        "(default 1; TP x PP processes are started)")
    parser.add_argument("--pp", "--pipeline-model-parallel-size", type=positive_int, default=1,
                        dest="pp", help="pipeline parallel size (default 1)")
    parser.add_argument("--sp", "--sequence-parallel", action="store_true", dest="sp",
                        help="sequence parallelism (with --tp > 1)")
    parser.add_argument("--atol", type=nonnegative_float, default=1e-4,
                        help="largest allowed |delta logits| (default 1e-4, for fp32); for a "
                             "reward model, |delta score|")
    parser.add_argument("--loss-atol", type=nonnegative_float, default=1e-5,
                        help="largest allowed |delta loss| (default 1e-5)")
    parser.add_argument("--batch-size", type=positive_int, default=2,
                        help="sequences in the random token batch compared (default 2)")
    parser.add_argument("--seq-length", type=positive_int, default=64,
                        help="tokens per sequence (default 64)")
    parser.add_argument("--seed", type=int, default=1234,
                        help="seed of the random tokens (default 1234)")


def run_worker(args: argparse.Namespace) -> int:
    import torch
    from megatron.core import parallel_state

    from megatron_patch import checkpoint, parallel
    from megatron_patch.forward import forward_logits
    from megatron_patch.models import (
        checkpoint_expert_tensor_parallel_size,
        from_checkpoint,
        load_hf_config,
    )
    from megatron_patch.models.score_head import is_reward_config
    from megatron_patch.rlhf.reward import pad_token_id, score

    parallel.initialize(args.tp, args.pp, seed=args.seed,
                        expert_tensor_parallel_size=checkpoint_expert_tensor_parallel_size(
                            args.ckpt_dir, args.tp))
    model, meta = from_checkpoint(args.ckpt_dir, sequence_parallel=args.sp,
                                  params_dtype=torch.float32)
    model.eval()
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, meta.vocab_size, (args.batch_size, args.seq_length), generator=gen)
    code = 0
    hf_config = load_hf_config(os.path.join(args.ckpt_dir, checkpoint.HF_DIR))
    if is_reward_config(hf_config):
        # Pooled as transformers pools: by the config's pad token id.
        scores = score([model], tokens, pad_token_id(hf_config),
                       torch.full((args.batch_size,), args.seq_length))
        if torch.distributed.get_rank() == 0:
            code = _compare_scores(args, tokens, scores)
    else:
        out = forward_logits([model], tokens, meta.vocab_size)
        if out is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            code = _compare_with_transformers(args, tokens, out)
    # Every rank leaves the process group together: a rank exiting while another still uses
    # gloo can abort ("terminate called without an active exception").
    torch.distributed.barrier()
    parallel.destroy()
    return code


def _compare_with_transformers(args: argparse.Namespace, tokens, out: dict) -> int:
    """Run the HF model on the same tokens, print the JSON report, 0 if within tolerance."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = hf.eval()(input_ids=tokens, labels=tokens)
    delta = (out["logits"] - ref.logits).abs()
    report = {
        "max_abs_diff": delta.max().item(),
        "mean_abs_diff": delta.mean().item(),
        "argmax_agreement": (out["logits"].argmax(-1) == ref.logits.argmax(-1)).float().mean()
        .item(),
        "loss_hf": ref.loss.item(),
        "loss_megatron": out["loss"],
        "loss_diff": abs(out["loss"] - ref.loss.item()),
        "tp": args.tp, "pp": args.pp, "sp": args.sp,
    }
    report["ok"] = report["max_abs_diff"] <= args.atol and report["loss_diff"] <= args.loss_atol
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


def _compare_scores(args: argparse.Namespace, tokens, scores) -> int:
    """A reward model's scores against AutoModelForSequenceClassification's on the same tokens:
    print the JSON report, 0 if within --atol."""
    import torch
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(args.hf_dir,
                                                                        dtype=torch.float32)
    with torch.no_grad():
        ref = hf.eval()(input_ids=tokens).logits[:, 0]
    report = {"max_abs_diff": (scores - ref).abs().max().item(),
              "tp": args.tp, "pp": args.pp, "sp": args.sp}
    report["ok"] = report["max_abs_diff"] <= args.atol
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


def run(args: argparse.Namespace) -> int:
    """`megatron-patch verify`: start the workers under torchrun, or run in place when already
    started by it."""
    if "LOCAL_RANK" in os.environ:
        return run_worker(args)
    import subprocess

    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={args.tp * args.pp}",
           "-m", "megatron_patch.verify", *sys_argv(args)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(cmd, env=env)


def sys_argv(args: argparse.Namespace) -> list[str]:
    argv = [args.hf_dir, args.ckpt_dir, "--tp", str(args.tp), "--pp", str(args.pp),
            "--atol", str(args.atol), "--loss-atol", str(args.loss_atol),
            "--batch-size", str(args.batch_size), "--seq-length", str(args.seq_length),
            "--seed", str(args.seed)]
    return argv + (["--sp"] if args.sp else []) + (["--verbose"] if args.verbose else [])


if __name__ == "__main__":
    parser = ArgumentParser(prog="megatron-patch verify")
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    sys.exit(run_main("megatron-patch verify", lambda: run_worker(parser.parse_args())))
