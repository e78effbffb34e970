"""PPO/GRPO arithmetic (megatron_patch.rlhf.advantages) against hand computations.

Every expected number below was worked out by hand (the working is in the comments); the
tolerance 1e-6 is float32 rounding of numbers of order 1. Each check runs in a forked worker:
the test process does no torch computation (tests/harness.py says why)."""

import math

import harness
import pytest
import torch

from megatron_patch.rlhf import advantages as adv

TOL = 1e-6


def close(actual: torch.Tensor, expected: list) -> bool:
    return torch.allclose(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=TOL,
                          rtol=0)


def check_gae_over_masked_response_tokens():
    # gamma 0.9, lambda 0.8, rewards [0, 0, 1], values [0.5, 0.4, 0.3], episode ends after t=2:
    # delta2 = 1 - 0.3 = 0.7                 A2 = 0.7
    # delta1 = 0.9 * 0.3 - 0.4 = -0.13       A1 = -0.13 + 0.72 * 0.7 = 0.374
    # delta0 = 0.9 * 0.4 - 0.5 = -0.14       A0 = -0.14 + 0.72 * 0.374 = 0.12928
    # returns = A + V = [0.62928, 0.774, 1.0]
    # Row 1 is the same response after one prompt position (whose reward and value, 9, must not
    # leak in); row 0 has a padding position after it (value 7, ignored).
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0], [9.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 7.0], [9.0, 0.5, 0.4, 0.3]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    advantages, returns = adv.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert close(advantages, [[0.12928, 0.374, 0.7, 0.0], [0.0, 0.12928, 0.374, 0.7]])
    assert close(returns, [[0.62928, 0.774, 1.0, 0.0], [0.0, 0.62928, 0.774, 1.0]])


def check_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    # gamma = lambda = 1: A_t = sum_{k>=t} r_k - V_t. rewards [1, 2, 3]: to-go [6, 5, 3].
    advantages, returns = adv.gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 1.0, 1.0]]),
                                  torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert close(advantages, [[5.0, 4.0, 2.0]])
    assert close(returns, [[6.0, 5.0, 3.0]])


def check_grpo_advantages_with_and_without_std():
    # Group 1: rewards 1, 0, 0, 1: mean 0.5, Bessel std sqrt(4 * 0.25 / 3) = 0.5773503,
    # A = +-0.5 / (0.5773503 + 1e-6) = +-0.8660239. Group 2: all equal -> A = 0.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert close(adv.grpo_advantages(rewards, 4), [a, -a, -a, a, 0, 0, 0, 0])
    assert close(adv.grpo_advantages(rewards, 4, scale_by_std=False),
                 [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="groups of 3"):
        adv.grpo_advantages(rewards, 3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        adv.grpo_advantages(rewards, 1)


def check_kl_estimators():
    # pi(token) = 0.5, ref(token) = 0.25: log ratio = ln 2 = 0.6931472
    # k1 = ln 2; k2 = (ln 2)^2 / 2 = 0.2402265; k3 = 0.5 - ln 0.5 - 1 = 0.1931472
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert close(adv.kl_estimate(logp, ref, "k1"), [math.log(2)])
    assert close(adv.kl_estimate(logp, ref, "k2"), [0.5 * math.log(2) ** 2])
    assert close(adv.kl_estimate(logp, ref, "k3"), [0.5 + math.log(2) - 1])
    # Equal policies: every estimator is 0; k3 is never negative.
    assert close(adv.kl_estimate(ref, ref, "k3"), [0.0])
    assert adv.kl_estimate(ref, logp, "k3").item() >= 0
    with pytest.raises(ValueError, match="k1, k2, k3"):
        adv.kl_estimate(logp, ref, "k4")


def check_kl_controllers():
    fixed = adv.FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    # target 6, horizon 10000, 256 samples:
    # KL 9   -> error clip(0.5) = 0.2   -> 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    # KL 3   -> error clip(-0.5) = -0.2 -> 0.1 * (1 - 0.00512) = 0.099488
    # KL 6.6 -> error 0.1                -> 0.1 * (1 + 0.00256) = 0.100256
    for kl, expected in ((9.0, 0.100512), (3.0, 0.099488), (6.6, 0.100256)):
        ctl = adv.AdaptiveKLController(0.1, target=6.0, horizon=10000)
        ctl.update(kl, 256)
        assert abs(ctl.value - expected) < 1e-12, (kl, ctl.value)
    restored = adv.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def check_clipped_surrogate():
    # ratio 1.5 (eps 0.2): A=+1 -> max(-1.5, -1.2) = -1.2 (clipped); A=-1 -> max(1.5, 1.2) = 1.5
    # ratio 0.5:           A=+1 -> max(-0.5, -0.8) = -0.5;           A=-1 -> max(0.5, 0.8) = 0.8
    old = torch.zeros(4)
    logp = torch.tensor([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, ratio, clipped = adv.clipped_surrogate(logp, old, advantages, 0.2)
    assert close(loss, [-1.2, 1.5, -0.5, 0.8])
    assert close(ratio, [1.5, 1.5, 0.5, 0.5])
    assert clipped.tolist() == [True, False, False, True]


def check_clipped_value_loss():
    # V 1.0, V_old 0.5, eps 0.2 -> clipped V 0.7.
    # R 0.8: max((0.2)^2, (-0.1)^2) / 2 = 0.02 (unclipped); R 2.0: max(1, 1.69) / 2 = 0.845
    values, old = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5])
    loss, clipped = adv.clipped_value_loss(values, old, torch.tensor([0.8, 2.0]), 0.2)
    assert close(loss, [0.02, 0.845])
    assert clipped.tolist() == [False, True]


def check_whitening_over_masked_entries():
    # x = 1, 2, 3 (the 100 is masked out): mean 2, population variance 2/3,
    # (x - 2) / sqrt(2/3 + 1e-8) = -1.2247449, 0, 1.2247449.
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    s = 1 / math.sqrt(2 / 3 + 1e-8)
    assert close(adv.whiten(x, mask), [[-s, 0.0, s, 0.0]])
    # Without the shift the mean stays: (x - 2) * s + 2.
    assert close(adv.whiten(x, mask, shift_mean=False), [[2 - s, 2.0, 2 + s, 0.0]])


def check_token_rewards_put_the_score_on_the_last_response_token():
    # kl coef 0.5, KL 0.2 and 0.3 on the two response tokens, score 2 on the last:
    # [0, -0.1, -0.15 + 2, 0]; a row without response tokens gets nothing.
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.1, 0.1]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rewards = adv.token_rewards(torch.tensor([2.0, 5.0]), kl, mask, 0.5)
    assert close(rewards, [[0.0, -0.1, 1.85, 0.0], [0.0, 0.0, 0.0, 0.0]])


def check_token_mean_over_the_global_batch_does_not_depend_on_the_split():
    # Per-token losses of two sequences, 3 and 1 response tokens: the token mean is
    # (1 + 2 + 3 + 10) / 4 = 4; a mean of per-micro-batch means would give (2 + 10) / 2 = 6.
    per_token = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    for micro in (1, 2):
        parts = [(adv.masked_sum(per_token[i:i + micro], mask[i:i + micro]),
                  mask[i:i + micro].sum()) for i in range(0, 2, micro)]
        total = sum(s for s, _ in parts) / sum(c for _, c in parts)
        assert abs(total.item() - 4.0) < TOL
    assert abs(adv.masked_mean(per_token, mask).item() - 4.0) < TOL


CHECKS = sorted(name for name in globals() if name.startswith("check_"))


@pytest.mark.parametrize("name", [n.removeprefix("check_") for n in CHECKS])
def test_rl_math(name):
    harness.run(globals()["check_" + name], 1)
