"""Megatron-LM's --check-for-nan-in-loss-and-grad (on by default; turned off by
--no-check-for-nan-in-loss-and-grad): a loss or gradient that is NaN or infinite stops the run
before the optimizer step, so neither the model nor any checkpoint ever holds the update it
would make.

Every rank takes the same decision, so they stop together instead of some waiting in a
collective for the others: the loss checked is the one reduced over the global batch (the same
on every rank, `metrics.reduce_metrics`), and each rank's verdict on its gradients is
max-reduced over all ranks. Gradients are read in DDP's buffers after their reduction: a
non-finite gradient on any rank reaches a reduced gradient (with the distributed optimizer the
part of the buffer a rank does not own still holds its own unreduced gradients), and a
non-finite reduced gradient is in some rank's buffer. With --fp16 non-finite gradients are the
loss scaler's business (the step is skipped and the scale lowered, as in Megatron-LM), so only
the loss is checked.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_patch import cpu_mode

OFF_FLAG = "--no-check-for-nan-in-loss-and-grad"


class NonFiniteError(ValueError):
    """The run's loss or gradients became NaN or infinite (it diverged)."""


def _stop(iteration: int, what: str) -> NonFiniteError:
    return NonFiniteError(
        f"iteration {iteration}: {what}; stopped before its optimizer step, so nothing of this "
        f"iteration was applied or saved (the run diverged: lower --lr or look at its data; "
        f"{OFF_FLAG} trains on regardless)")


def check_loss(iteration: int, loss_name: str, loss: float) -> None:
    """`loss` is the global batch's reduced loss, the same on every rank."""
    if not math.isfinite(loss):
        raise _stop(iteration, f"the loss ({loss_name}) is {loss}")


def _local_verdict(buffers: list[Any]) -> torch.Tensor:
    """[any non-finite gradient, any NaN gradient] in this rank's gradient buffers."""
    verdict = torch.zeros(2, device=cpu_mode.device())
    for buffer in buffers:
        if not torch.isfinite(buffer.grad_data).all():
            verdict[0] = 1
            verdict[1] = max(verdict[1], buffer.grad_data.isnan().any().float())
    return verdict


def check_gradients(iteration: int, ddp_model: Any) -> None:
    """Stop on any non-finite gradient in any rank's DDP buffers (a collective: every rank
    calls it)."""
    verdict = _local_verdict(list(ddp_model.buffers) + list(ddp_model.expert_parallel_buffers))
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MAX)
    if verdict[0]:
        kind = "NaN" if verdict[1] else "infinite"
        raise _stop(iteration, f"a gradient is {kind} (the loss is finite)")


def check_grad_norm(iteration: int, grad_norm: float | None) -> None:
    """The optimizer's gradient norm (reduced, the same on every rank): finite gradients can
    still overflow it, which makes clipping zero them."""
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise NonFiniteError(
            f"iteration {iteration}: the gradient norm is {grad_norm} (the gradients are finite "
            f"but their norm overflows); nothing of this iteration was saved (the run diverged: "
            f"lower --lr; {OFF_FLAG} trains on regardless)")


def before_step(trainer: Any, values: dict[str, float]) -> None:
    """The checks of the iteration the trainer is about to step, when the flag is on."""
    if not trainer.args.check_for_nan_in_loss_and_grad:
        return
    iteration = trainer.iteration + 1
    check_loss(iteration, trainer.mode.loss_name, values[trainer.mode.loss_name])
    if not trainer.args.fp16:
        check_gradients(iteration, trainer.model)
