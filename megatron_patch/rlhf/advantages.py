"""The arithmetic of PPO and GRPO on response tokens: KL estimators, KL controllers, GAE,
group-normalised advantages, whitening, and the clipped losses.

Tensors are [batch, tokens]; `mask` is 1.0 on response tokens and 0.0 elsewhere (prompt and
padding). A response is contiguous: it starts at its first masked-in position and has no holes.
Sources of the formulas: Schulman et al. 2017 (PPO, GAE), Ziegler et al. 2019 (adaptive KL
controller), Shao et al. 2024 (GRPO), Schulman's "Approximating KL divergence" (k1, k2, k3).
"""

from __future__ import annotations

from typing import Any

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled token's log-probabilities.

    k1 = log pi - log ref (unbiased, can be negative); k2 = (log pi - log ref)^2 / 2;
    k3 = ref/pi - log(ref/pi) - 1 (unbiased, never negative: GRPO's estimator)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        # Clamped as verl/OpenRLHF do: exp of a large log-ratio would overflow and its gradient
        # would swamp the step; +-20 is far beyond any ratio a sane update produces.
        inverse = (-log_ratio).clamp(-20.0, 20.0)
        return inverse.exp() - inverse - 1.0
    raise ValueError(f"KL estimator must be one of {', '.join(KL_ESTIMATORS)}, got {kind!r}")


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: move the coefficient towards the KL target, proportionally to the
    clipped relative error: e = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + e * n / horizon,
    n being the number of samples (sequences) the KL was measured on."""

    def __init__(self, coef: float, target: float, horizon: float) -> None:
        super().__init__(coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs a positive target and horizon, got target "
                             f"{target}, horizon {horizon}")
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(x, mask) / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           eps: float = 1e-8, group=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked-in entries (over every rank of `group` when
    given), with the population variance; masked-out entries become 0. shift_mean=False keeps
    the mean (scales only)."""
    stats = torch.stack([mask.sum(), masked_sum(x, mask), masked_sum(x.square(), mask)]).double()
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(stats, group=group)
    count, total, squares = stats[0].clamp(min=1), stats[1], stats[2]
    mean = total / count
    var = (squares / count - mean.square()).clamp(min=0)
    centred = x - mean.to(x.dtype)
    out = centred * torch.rsqrt(var + eps).to(x.dtype)
    if not shift_mean:
        out = out + mean.to(x.dtype)
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's response tokens (reverse scan):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; past the last
    response token V and A are 0 (the episode ends). Returns (advantages, returns = A + V),
    both 0 outside the mask."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        # values and advantages are 0 outside the response: nothing carries over from padding.
        next_value, next_advantage = values[:, t], advantage
    return advantages, (advantages + values) * mask


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """One advantage per sample: its reward minus its group's mean, divided by the group's
    standard deviation (Bessel-corrected, as verl and TRL; + eps) unless scale_by_std is False
    (Dr. GRPO). Samples of a group are consecutive: rewards [groups * group_size]."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    if scale_by_std and group_size < 2:
        raise ValueError("group-normalised advantages need at least 2 samples per prompt "
                         "(--num-samples-per-prompt), or no std scaling")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """PPO's per-token reward: -kl_coef * KL_t on every response token, plus the sequence's
    score on its last response token."""
    rewards = -kl_coef * kl * mask
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, -1).max(dim=1).values
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    rewards[rows, last[has_tokens]] += score[has_tokens].to(rewards.dtype)
    return rewards


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's per-token policy loss max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho =
    exp(logp - old_logp); also returns rho and where the clipped term was the larger one."""
    ratio = (logp - old_logp).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), ratio, (clipped > unclipped)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    clip_eps: float, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                    kl_estimator: str = "k3", kl_bias_correction: bool = False,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO's per-token loss: the clipped surrogate + kl_coef x the KL estimate to the reference
    (none without ref_logp). With kl_bias_correction the KL term is multiplied by the (not
    detached) ratio rho, as TRL's `use_bias_correction_kl` (DeepSeek-V3.2): on samples of the
    old policy, rho x k3 is an unbiased estimate of KL(pi || ref) under the current policy, and
    its gradient differs even where rho == 1. Returns (loss, rho, clipped, KL term as added)."""
    loss, ratio, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps)
    kl = torch.zeros_like(loss)
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        if kl_bias_correction:
            kl = kl * ratio
        loss = loss + kl_coef * kl
    return loss, ratio, clipped, kl


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token value loss 0.5 max((V - R)^2, (V_old + clip(V - V_old, +-eps) - R)^2);
    also returns where the clipped term was the larger one."""
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped = (values - returns).square()
    clipped = (clipped_values - returns).square()
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped
