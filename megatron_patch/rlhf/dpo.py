"""Direct Preference Optimization (Rafailov et al. 2023) with TRL's loss definitions.

For a pair (chosen c, rejected r) with sequence log-probabilities s (sums over response tokens)
under the policy and the frozen reference, h = (s_pi(c) - s_ref(c)) - (s_pi(r) - s_ref(r)):
- sigmoid: -log sigmoid(beta h); with label smoothing e (conservative DPO, cDPO):
  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
- ipo: (h' - 1 / (2 beta))^2, where h' uses log-probs averaged over each side's response
  tokens instead of summed (TRL's IPO normalisation).
Implicit rewards are beta (s_pi - s_ref) for chosen and for rejected.
"""

from __future__ import annotations

import argparse
import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from megatron_patch import checkpoint
from megatron_patch.errors import FloatRange, positive_float
from megatron_patch.forward import masked_vocab_parallel_cross_entropy
from megatron_patch.rlhf.pairs import PreferencePairsMode, pair_tensors
from megatron_patch.training.modes import LossOutput
from megatron_patch.training.reference import FrozenReference

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logps(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor,
                   vocab_size: int) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities of each sequence, [b].

    `logits` [b, s, V_padded / TP] are vocab-parallel: log p = -cross entropy is taken with
    Megatron-Core's vocab-parallel cross entropy, never gathering the vocabulary. Position t
    predicts token t+1 (`loss_mask` is aligned with those labels, as in SFT).
    """
    labels = torch.roll(tokens, -1, dims=1)  # the last position's label is masked out
    per_token = masked_vocab_parallel_cross_entropy(logits, labels, vocab_size)
    return -(per_token * loss_mask).sum(dim=1)


@dataclass
class PairTerms:
    """Per-pair values of a batch, [b] each."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> PairTerms:
    """Per-pair DPO losses and implicit rewards from sequence log-probabilities [b].

    `*_tokens` (response token counts, [b]) are needed by IPO only.
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    if loss_type == "sigmoid":
        h = beta * (chosen_ratio - rejected_ratio)
        losses = -torch.nn.functional.logsigmoid(h)
        if label_smoothing:
            losses = (1 - label_smoothing) * losses \
                - label_smoothing * torch.nn.functional.logsigmoid(-h)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss needs the response token counts")
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(
            min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"--dpo-loss {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    return PairTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def pair_metrics(terms: PairTerms, policy_chosen: torch.Tensor,
                 policy_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's DPO metrics as {name: [sum over pairs, pairs]}, to be summed over micro-batches
    and data-parallel ranks and reported as sum / count (the mean over the global batch)."""
    pairs = torch.tensor(float(terms.losses.numel()), device=terms.losses.device)
    values = {
        "rewards/chosen": terms.chosen_rewards,
        "rewards/rejected": terms.rejected_rewards,
        "rewards/accuracies": (terms.chosen_rewards > terms.rejected_rewards).float(),
        "rewards/margins": terms.chosen_rewards - terms.rejected_rewards,
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }
    return {name: torch.stack([v.float().sum(), pairs]) for name, v in values.items()}


# ---- the training mode (megatron-patch train --train-mode dpo) -------------------------------

# The probability that a preference label is flipped: below one half.
LABEL_SMOOTHING = FloatRange(0.0, 0.5, high_open=True)
METRIC_NAMES = ("dpo loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected")


class DPOMode(PreferencePairsMode):
    """DPO on preference pairs: the policy is the trained model; the reference is a frozen copy
    of the starting weights (under LoRA: the policy with its adapters off), whose
    log-probabilities of each global batch are computed by a forward-only schedule before the
    policy's step (see rlhf/README.md for why).

    The reference is the checkpoint --ref-load (default: --load) at the iteration it held when
    the run started; checkpoints record it, so a resumed run keeps the same reference.
    """

    name = "dpo"
    loss_name = "dpo loss"
    metric_names = METRIC_NAMES

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        a = trainer.args

        source = a.ref_load or a.load
        try:
            iteration = checkpoint.latest_iteration(source)
            identity = checkpoint.fingerprint(source, iteration)
        except FileNotFoundError as e:
            flag = "--ref-load" if a.ref_load else "--load"
            raise ValueError(f"{flag} {source}: not a checkpoint ({e})") from e
        # What the reference is (architecture, fingerprint) is recorded with where it is: a
        # resumed run refuses another model put at that path.
        self.reference_source = {"load": source, "iteration": iteration, **identity}
        self.reference: FrozenReference | None = None
        self._reference_logps: deque[torch.Tensor] = deque()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("direct preference optimisation (--train-mode dpo; TRL's "
                                      "names and defaults)")
        g.add_argument("--dpo-beta", type=positive_float, default=0.1,
                       help="how far the policy may move from the reference (TRL's beta; the "
                            "IPO loss's regularisation tau)")
        g.add_argument("--dpo-loss", choices=["sigmoid", "ipo"], default="sigmoid",
                       help="sigmoid: the DPO paper's loss; ipo: Azar et al.'s, on per-token "
                            "averaged log-probabilities as TRL computes it")
        g.add_argument("--dpo-label-smoothing", type=LABEL_SMOOTHING, default=0.0,
                       help="conservative DPO: the assumed probability that a preference label "
                            "is flipped, in [0, 0.5) (sigmoid loss)")
        g.add_argument("--ref-load", default=None,
                       help="the frozen reference model's checkpoint (default: --load, at the "
                            "iteration it holds when the run starts); recorded in the run's "
                            "checkpoints, which a resumed run keeps")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        super().check_args(args)
        if not args.load:
            raise ValueError("--train-mode dpo needs --load: the policy's starting weights, "
                             "which are also the frozen reference (or give that as --ref-load)")
        if not (math.isfinite(args.dpo_beta) and args.dpo_beta > 0):  # (flags built in code)
            raise ValueError(f"--dpo-beta {args.dpo_beta}: must be a finite number > 0")
        if not 0 <= args.dpo_label_smoothing < 0.5:
            raise ValueError(f"--dpo-label-smoothing {args.dpo_label_smoothing}: must be in "
                             "[0, 0.5) (the probability that a preference label is flipped)")
        if args.dpo_label_smoothing and args.dpo_loss != "sigmoid":
            raise ValueError("--dpo-label-smoothing applies to --dpo-loss sigmoid only")

    # ---- reference ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"reference": dict(self.reference_source)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("reference")
        if saved is None:
            return
        given = self.trainer.args.ref_load
        if given and os.path.abspath(given) != os.path.abspath(saved["load"]):
            raise ValueError(f"--ref-load {given}: {self.trainer.args.load} is a DPO run whose "
                             f"reference is {saved['load']} (iteration {saved['iteration']}); "
                             "a resumed run keeps it (leave --ref-load out)")

        self.reference_source = {**saved, **checkpoint.check_fingerprint(
            saved, saved["load"], saved["iteration"], "the DPO reference model")}

    def _reference(self) -> FrozenReference:
        """The reference (made at the first step: the resumed run's recorded source is known
        only once its checkpoint is loaded); under LoRA, when it is the adapters' base, the
        policy with its adapters off."""
        if self.reference is None:
            source = self.reference_source
            self.reference = self.trainer.frozen_reference(
                source["load"], source["iteration"],
                "--ref-load" if self.trainer.args.ref_load else "the recorded reference")
        return self.reference

    def before_schedule(self, dataset: Any, consumed: int, forward_only: bool) -> None:
        """The reference log-probabilities of this global batch's micro-batches, in order."""
        reference = self._reference()
        model = reference.model

        def step(data_iterator, model):
            batch = next(data_iterator)
            output = self.forward(model, batch)

            def logps(output: torch.Tensor):
                values = sequence_logps(output, pair_tensors(batch, "tokens"),
                                        pair_tensors(batch, "loss_mask"), self.trainer.vocab_size)
                return values.sum() * 0, torch.tensor(1, dtype=torch.int), {"logps": values}

            return output, logps

        was_training = model.training
        model.eval()  # no dropout: the reference is the frozen model
        with torch.no_grad(), reference.active():
            outputs = self.trainer.run_schedule(dataset, consumed, True, forward_step=step,
                                                model=model)
        model.train(was_training)
        self._reference_logps = deque(out["logps"] for out in outputs)

    # ---- policy -------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> LossOutput:
        a = self.trainer.args
        tokens, loss_mask = pair_tensors(batch, "tokens"), pair_tensors(batch, "loss_mask")
        policy_chosen, policy_rejected = sequence_logps(
            output, tokens, loss_mask, self.trainer.vocab_size).chunk(2)
        reference_chosen, reference_rejected = self._reference_logps.popleft().chunk(2)
        terms = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                         beta=a.dpo_beta, loss_type=a.dpo_loss,
                         label_smoothing=a.dpo_label_smoothing,
                         chosen_tokens=batch["chosen_loss_mask"].sum(1),
                         rejected_tokens=batch["rejected_loss_mask"].sum(1))
        loss_sum = terms.losses.sum()
        pairs = torch.tensor(terms.losses.numel(), dtype=torch.int, device=loss_sum.device)
        metrics = pair_metrics(terms, policy_chosen, policy_rejected)
        metrics["dpo loss"] = torch.stack([loss_sum.detach().clone(), pairs.float()])
        return loss_sum, pairs, metrics
