"""The training log: the iteration line, FLOPs, metrics reduced over the global batch, and where
the scalars go: TensorBoard (`--tensorboard-dir`) and Weights & Biases
(`--wandb-project`), with Megatron-LM's flags. Both get the same scalars, from the last rank.

wandb is optional: it is imported only when `--wandb-project` is given, and its absence is then
an error before training starts. wandb's own settings apply: `WANDB_MODE=offline` runs without a
network (the run directory can be uploaded later with `wandb sync`), `WANDB_API_KEY` logs in.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

# Function-level imports: cpu_mode and parallel import torch, which this module otherwise does
# not need (its flags and writers are plain Python).

# The validation line shows exp(min(lm loss, this)): a perplexity above exp(20) ~ 4.9e8 is
# beyond any vocabulary's (uniform guessing scores the vocabulary size), and the cap keeps
# math.exp from overflowing on a diverged loss.
PERPLEXITY_LOSS_CAP = 20.0


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--wandb-project", default="",
                       help="log to this Weights & Biases project (needs `pip install wandb`)")
    group.add_argument("--wandb-exp-name", default="", help="the W&B run name")
    group.add_argument("--wandb-save-dir", default="",
                       help="W&B's local run files (default: SAVE/wandb, else ./wandb)")
    group.add_argument("--wandb-entity", default="", help="the W&B team or user")


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ValueError("--wandb-project needs the wandb package: pip install wandb "
                         "(or leave --wandb-project out)") from e
    return wandb


def check(args: argparse.Namespace) -> None:
    """Refuse an unusable logging setup before any work is done."""
    if args.wandb_project:
        _import_wandb()


class MetricsWriter:
    """add_scalar(name, value, step) to TensorBoard and/or W&B; close() at the end."""

    def __init__(self, tensorboard=None, wandb_run=None) -> None:
        self.tensorboard, self.wandb_run = tensorboard, wandb_run

    def add_scalar(self, name: str, value: float, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(name, value, step)
        if self.wandb_run is None:
            return
        if " vs " in name:
            # W&B has one monotonic step per run, the iteration: a TensorBoard series against
            # another axis ("lm loss vs tokens") joins the iteration last logged, with its
            # x value alongside.
            self.wandb_run.log({name: value, name.split(" vs ")[1]: step}, commit=False)
        else:
            self.wandb_run.log({name: value}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def open_writer(args: argparse.Namespace, is_last_rank: bool,
                config: dict[str, Any] | None = None) -> MetricsWriter | None:
    """The last rank's writer (the one that knows the loss under pipeline parallelism), or
    None when no logger is configured or on other ranks."""
    if not is_last_rank or not (args.tensorboard_dir or args.wandb_project):
        return None
    tensorboard = wandb_run = None
    if args.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        tensorboard = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=10)
    if args.wandb_project:
        wandb = _import_wandb()
        save_dir = args.wandb_save_dir or (os.path.join(args.save, "wandb") if args.save
                                           else "wandb")
        os.makedirs(save_dir, exist_ok=True)
        wandb_run = wandb.init(project=args.wandb_project, name=args.wandb_exp_name or None,
                               entity=args.wandb_entity or None, dir=save_dir,
                               config=config if config is not None else vars(args))
    return MetricsWriter(tensorboard, wandb_run)


def flops_per_token(m: Any, padded_vocab_size: int, seq_length: int) -> float:
    """Approximate training FLOPs per token of the model args `m` (forward + backward: 6N plus
    attention)."""
    attn = m.hidden_size * (m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels
    attn += m.num_attention_heads * m.kv_channels * m.hidden_size
    mlp = (3 if m.gated_linear_unit else 2) * m.hidden_size * m.ffn_hidden_size
    params = m.num_layers * (attn + mlp) + padded_vocab_size * m.hidden_size
    attention_scores = 2 * m.num_layers * seq_length * m.num_attention_heads * m.kv_channels
    return 6 * params + 6 * attention_scores


def reduce_metrics(outputs: list[dict[str, Any]], names: tuple[str, ...], dp: int,
                   pp: int) -> dict[str, float]:
    """Each metric's sum / count over the global batch (the [sum, count] pairs a mode's loss
    reports per micro-batch), made known to every rank."""
    import torch
    from megatron.core import parallel_state

    from megatron_patch import cpu_mode

    total = torch.zeros(len(names), 2, device=cpu_mode.device())
    for out in outputs:  # empty except on the last pipeline stage
        for i, name in enumerate(names):
            total[i] += out[name].float()
    # Collectives over one rank are skipped: on a busy CPU each costs a thread hand-off.
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and dp > 1:
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if pp > 1:
        torch.distributed.broadcast(
            total, parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group())
    means = total[:, 0] / total[:, 1].clamp(min=1)
    return dict(zip(names, means.tolist(), strict=True))


def log_iteration(writer: MetricsWriter | None, stats: dict[str, float], *, iteration: int,
                  train_iters: int, consumed_tokens: int, metric_names: tuple[str, ...],
                  eta: float) -> None:
    """Megatron-LM's iteration line (on the last rank) and the same scalars to the writer."""
    from megatron_patch import parallel

    shown = " | ".join(f"{name} {stats[name]:.6f}" for name in metric_names)
    parallel.print_last_rank(
        f"iteration {iteration:6d}/{train_iters} | consumed tokens {consumed_tokens} | {shown} | "
        f"lr {stats['lr']:.3e} | grad norm {stats['grad_norm']:.4f} | loss scale "
        f"{stats['loss_scale']:g} | tokens/s {stats['tokens_per_sec']:.1f} | TFLOP/s/device "
        f"{stats['tflops']:.4f} | ETA {eta:.0f}s")
    if writer is None:
        return
    for name in metric_names:
        writer.add_scalar(name, stats[name], iteration)
    for key, name in (("lr", "learning-rate"), ("grad_norm", "grad-norm"),
                      ("loss_scale", "loss-scale"), ("tokens_per_sec", "tokens-per-sec"),
                      ("tflops", "tflops-per-device")):
        writer.add_scalar(name, stats[key], iteration)
    writer.add_scalar(f"{metric_names[0]} vs tokens", stats[metric_names[0]], consumed_tokens)


def log_validation(writer: MetricsWriter | None, values: dict[str, float], *, iteration: int,
                   loss_name: str) -> None:
    import math

    from megatron_patch import parallel

    shown = " | ".join(f"{name} {value:.6f}" for name, value in values.items())
    ppl = ""
    if loss_name == "lm loss":
        ppl = f" | ppl {math.exp(min(values[loss_name], PERPLEXITY_LOSS_CAP)):.3f}"
    parallel.print_last_rank(f"validation at iteration {iteration} | {shown}{ppl}")
    if writer is not None:
        for name, value in values.items():
            writer.add_scalar(f"validation {name}", value, iteration)
