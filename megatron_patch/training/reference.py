"""The frozen reference model of a run that trains a policy against one (DPO's reference, RL's KL
reference, a distillation teacher): a frozen copy of a checkpoint's weights, or, under LoRA when
that checkpoint is the adapters' base, the policy itself with its adapters off (no second copy
of the model is held)."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from megatron_patch.training.loop import Trainer

log = logging.getLogger("megatron_patch.train")


def frozen_copy(trainer: Trainer, load: str, iteration: int | str, flag: str) -> torch.nn.Module:
    """A frozen copy of the trainer's model with the weights of checkpoint `load` at
    `iteration`: same layout, no gradients, no optimizer, in eval mode. A checkpoint of another
    model is refused naming `flag`."""
    from megatron_patch import checkpoint
    from megatron_patch.training import checkpointing

    if differ := checkpointing.model_differences(trainer, load):
        raise ValueError(f"{flag} {load} holds another model than the policy "
                         f"(--load {trainer.args.load}): {'; '.join(differ[:6])}; the reference "
                         "must be the policy's model (its starting weights)")
    # Weights come from the checkpoint: no initialisation (which would also draw from the
    # RNG streams a resumed run must find as they were saved).
    _, module = trainer.build_module(perform_initialization=False)
    checkpoint.load_model(load, module, iteration)
    module.requires_grad_(False)
    module.eval()
    if torch.distributed.get_rank() == 0:
        log.info("reference model: %s (iteration %s)", load, iteration)
    return module


class FrozenReference:
    """Checkpoint `load` at `iteration` as a frozen model beside the trainer's: the policy with
    its LoRA adapters off when the checkpoint is their base (peft's `disable_adapter`, as TRL
    does), else a frozen copy (`frozen_copy`; a checkpoint of another model is refused naming
    `flag`).

    Run the reference as `with reference.active(): ... reference.model ...` (the adapters are
    off for the duration when it is the policy).
    """

    def __init__(self, trainer: Trainer, load: str, iteration: int | str, flag: str) -> None:
        self.load, self.iteration = load, iteration
        self._policy = trainer.model
        shares_policy = trainer.lora is not None and trainer.lora.adapts(load, iteration)
        self.copy: torch.nn.Module | None = (
            None if shares_policy else frozen_copy(trainer, load, iteration, flag))

    @property
    def shares_policy(self) -> bool:
        """Whether the reference is the policy with its adapters off (no copy held)."""
        return self.copy is None

    @property
    def model(self) -> torch.nn.Module:
        """The model to run: the trainer's (DDP-wrapped) policy, or the copy."""
        return self._policy if self.copy is None else self.copy

    @property
    def module(self) -> torch.nn.Module:
        """The same, unwrapped: the GPTModel (for forward passes outside the schedule)."""
        return self._policy.module if self.copy is None else self.copy

    def active(self) -> contextlib.AbstractContextManager[Any]:
        """The context the reference runs in: the policy's adapters off when it is the policy."""
        if self.copy is not None:
            return contextlib.nullcontext()
        from megatron_patch import lora

        return lora.disabled(self._policy)
