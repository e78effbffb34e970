"""PPO's critic: a scalar-head model (part 1's reward-model head, models/score_head.py) whose
output at each position is the value of the sequence so far, trained by the clipped value loss
as a training mode of its own Trainer (model, optimizer, schedule and checkpoints beside the
actor's).

It starts from the reward model when one is given (--reward-model: its score head is kept), else
from the starting policy (the LM head dropped, a score head created as part 1 creates one).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from megatron_patch import checkpoint
from megatron_patch.forward import pipelined
from megatron_patch.lora import training as lora_training
from megatron_patch.rlhf import advantages as adv
from megatron_patch.rlhf.reward import RewardMode
from megatron_patch.training.modes import Datasets, LossOutput

CRITIC_DIR = "critic"


class CriticMode(RewardMode):
    """The value model's forward (every position's value) and clipped value loss."""

    name = "critic"
    loss_name = "value loss"
    metric_names = ("value loss", "value clip fraction")
    sequences_per_sample = 1

    def __init__(self, trainer, train_iters: int, clip_eps: float) -> None:
        super().__init__(trainer)
        self.train_iters, self.clip_eps = train_iters, clip_eps

    def build_datasets(self) -> Datasets:
        return Datasets(None, None, self.train_iters)  # the actor's rollout batches

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["tokens"], batch["position_ids"], None)

    def loss(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> LossOutput:
        mask = batch["loss_mask"]
        loss, clipped = adv.clipped_value_loss(output[..., 0].float(), batch["old_values"],
                                               batch["returns"], self.clip_eps)
        count = mask.sum()
        metrics = {"value loss": torch.stack([(loss.detach() * mask).sum(), count.detach()]),
                   "value clip fraction": torch.stack([(clipped.float() * mask).sum(),
                                                       count.detach()])}
        return (loss * mask).sum(), count.to(torch.int), metrics


def critic_args(args: argparse.Namespace, trainer_args: argparse.Namespace, resumed: bool
                ) -> argparse.Namespace:
    """The critic Trainer's flags: the actor's, with its own checkpoints (SAVE/critic), its
    learning rate, and its starting point."""
    c = copy.copy(trainer_args)
    c.train_mode = CriticMode.name
    if resumed:
        c.load, c.finetune = os.path.join(args.load, CRITIC_DIR), False
        # The actor's tracker, written last, marks a step saved: a run killed between the two
        # saves holds a critic one step ahead, which the resumed run redoes and overwrites.
        c.ckpt_step = checkpoint.latest_iteration(args.load)
        c.overwrite_checkpoints = True
    else:
        c.load, c.finetune = args.reward_model or args.load, True
    c.save = os.path.join(args.save, CRITIC_DIR) if args.save else None
    c.lr = args.critic_lr if args.critic_lr is not None else args.lr
    c.tensorboard_dir = None  # the actor's writer logs the critic's scalars
    # A LoRA actor's critic is trained whole: its new score head must learn, and a LoRA
    # checkpoint keeps the adapters only.
    lora_training.clear_flags(c)
    c.wandb_project = ""
    return c


@torch.no_grad()
def values(module: torch.nn.Module, batch: dict[str, torch.Tensor], micro_batch_size: int
           ) -> torch.Tensor:
    """[N, S] values of every position (no gradients), in micro-batches, on every stage."""
    out = []
    for start in range(0, batch["tokens"].shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        tokens = batch["tokens"][rows]
        out.append(pipelined(module, tokens, batch["position_ids"][rows], None,
                             lambda output: output[..., 0].float(),
                             torch.empty(tokens.shape)))
    return torch.cat(out)



def prepare_advantages(rl, batch: dict[str, torch.Tensor], rewards: torch.Tensor
                       ) -> torch.Tensor:
    """Per-token rewards (-coef x KL on each response token, the score on the last), GAE over
    the critic's values, advantages whitened over the whole rollout batch, into `batch`.
    Returns [KL summed over the response tokens, samples], for the adaptive controller."""
    from megatron.core import parallel_state

    a, mask = rl.args, batch["loss_mask"]
    value = values(rl.critic.module, batch, a.micro_batch_size) * mask
    kl = (adv.kl_estimate(batch["old_logprobs"], batch["ref_logprobs"], a.kl_estimator)
          if rl.has_reference else torch.zeros_like(mask))
    token_rewards = adv.token_rewards(rewards, kl, mask, rl.kl_controller.value)
    advantages, returns = adv.gae(token_rewards, value, mask, a.gamma, a.lam)
    group = parallel_state.get_data_parallel_group() if rl.trainer.dp > 1 else None
    batch.update(advantages=adv.whiten(advantages, mask, group=group), returns=returns,
                 old_values=value)
    return torch.stack([(kl * mask).sum(), torch.tensor(float(len(mask)))])
