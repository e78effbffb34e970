"""The actor's training mode in RL: the clipped-surrogate loss on rollout batches (+ the KL
to the reference for GRPO; PPO has it in its rewards), the ratio maxima the step logs, and the
RL state the trainer's checkpoints carry (rlhf/loop.py's RLTrainer holds it)."""

from __future__ import annotations

from typing import Any

import torch

from megatron_patch.rlhf import advantages as adv
from megatron_patch.rlhf import rollout
from megatron_patch.training.modes import Datasets, LossOutput, TrainingMode


class PolicyMode(TrainingMode):
    """The trainer's view of GRPO and PPO's actor."""

    loss_name = "policy loss"
    metric_names = ("policy loss", "kl", "entropy", "clip fraction", "ratio")

    def __init__(self, trainer, rl: Any) -> None:
        super().__init__(trainer)
        self.rl = rl  # the RLTrainer
        self.name = rl.args.algorithm
        self.maxima: list[torch.Tensor] = []  # [ratio max, |ratio - 1| max] per micro-batch

    def build_datasets(self) -> Datasets:
        # Rollout batches are made as training goes; optimizer steps: one per mini-batch.
        return Datasets(None, None, self.rl.args.train_iters * self.rl.updates_per_step)

    def loss(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> LossOutput:
        """The clipped surrogate (+ KL coefficient x KL to the reference) summed over the
        micro-batch's response tokens, their count, and the metrics as [sum, count]."""
        rl, a, vocab = self.rl, self.rl.args, self.trainer.vocab_size
        logp = rollout.token_logprobs(output, batch["labels"], vocab, a.temperature)
        mask = batch["loss_mask"]
        ref_logp = batch["ref_logprobs"] if rl.has_reference else None
        if rl.ppo:  # PPO has the KL in its rewards: here it is only reported
            loss, ratio, clipped = adv.clipped_surrogate(logp, batch["old_logprobs"],
                                                         batch["advantages"], a.clip_eps)
            kl = (torch.zeros_like(loss) if ref_logp is None
                  else adv.kl_estimate(logp, ref_logp, a.kl_estimator))
        else:
            loss, ratio, clipped, kl = adv.grpo_token_loss(
                logp, batch["old_logprobs"], batch["advantages"], a.clip_eps, ref_logp,
                rl.kl_controller.value, a.kl_estimator, a.kl_bias_correction)
        count = mask.sum()
        values = {"policy loss": loss, "clip fraction": clipped.float(), "ratio": ratio,
                  "entropy": rollout.token_entropy(output, vocab, a.temperature), "kl": kl}
        reported = {name: torch.stack([(value.detach().float() * mask).sum(), count.detach()])
                    for name, value in values.items()}
        counted = mask > 0
        ratio = ratio.detach()
        self.maxima.append(torch.stack([
            ratio[counted].max() if counted.any() else ratio.new_tensor(1.0),
            (ratio[counted] - 1).abs().max() if counted.any() else ratio.new_tensor(0.0)]))
        return (loss * mask).sum(), count.to(torch.int), reported

    def state_dict(self) -> dict[str, Any]:
        return self.rl.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rl.load_state_dict(state)
