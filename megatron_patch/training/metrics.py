"""Where training scalars go: TensorBoard (`--tensorboard-dir`) and Weights & Biases
(`--wandb-project`), with Megatron-LM's flags. Both get the same scalars, from the last rank.

wandb is optional: it is imported only when `--wandb-project` is given, and its absence is then
an error before training starts. wandb's own settings apply: `WANDB_MODE=offline` runs without a
network (the run directory can be uploaded later with `wandb sync`), `WANDB_API_KEY` logs in.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


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
