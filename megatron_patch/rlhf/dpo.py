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

from dataclasses import dataclass

import torch

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logps(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor,
                   vocab_size: int) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities of each sequence, [b].

    `logits` [b, s, V_padded / TP] are vocab-parallel: log p = -cross entropy is taken with
    Megatron-Core's vocab-parallel cross entropy, never gathering the vocabulary. Position t
    predicts token t+1 (`loss_mask` is aligned with those labels, as in SFT).
    """
    from megatron_patch.forward import masked_vocab_parallel_cross_entropy

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
