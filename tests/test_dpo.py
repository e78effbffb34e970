"""DPO (--train-mode dpo): TRL's losses, transformers as the oracle of log-probs and loss, layout
and micro-batch invariance, exact resume with the same reference, learning a preference."""

import json
import math

import harness

from megatron_patch.tiny import QA

BETA = 0.1
# Each question's answer is chosen; the next question's answer is rejected.
PAIRS = [{"prompt": q, "chosen": a, "rejected": QA[(i + 1) % len(QA)][1]}
         for i, (q, a) in enumerate(QA)]


def _write(path: str, records: list[dict]) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def _args(load: str, train: str, *, valid: str | None = None, iters: int = 3, mbs: int = 2,
          gbs: int = 4, tp: int = 1, pp: int = 1, seq: int = 96, lr: float = 1e-3,
          save: str | None = None, extra: tuple = ()):
    from megatron_patch.training.arguments import parse_args

    argv = ["--train-mode", "dpo", "--load", load, "--train-data-path", train,
            "--seq-length", str(seq), "--micro-batch-size", str(mbs),
            "--global-batch-size", str(gbs), "--train-iters", str(iters), "--lr", str(lr),
            "--min-lr", str(lr / 10), "--lr-warmup-iters", "0", "--eval-interval", "100000",
            "--eval-iters", "1", "--log-interval", "100", "--seed", "3",
            "--dpo-beta", str(BETA), "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), *extra]
    if valid:
        argv += ["--valid-data-path", valid]
    if save:
        argv += ["--save", save]
    return parse_args(argv)


# ---- the losses against TRL's DPOTrainer, on the same log-probabilities ---------------------

def _trl_loss(pc, pr, rc, rr, nc, nr, loss_type: str, label_smoothing: float = 0.0):
    """TRL's DPOTrainer._compute_loss on given sequence log-probabilities: a stand-in model
    returns per-token log-probs that sum to them (and nc / nr completion tokens, which IPO
    averages over); the reference log-probs go in as TRL's precomputed ones."""
    import collections
    import types

    import torch
    from trl import DPOTrainer

    b = pc.numel()
    seq = int(max(nc.max(), nr.max())) + 2
    completion = torch.zeros(2 * b, seq, dtype=torch.long)
    for i, n in enumerate(torch.cat([nc, nr]).tolist()):
        completion[i, 1:1 + int(n)] = 1
    per_token = torch.zeros(2 * b, seq - 1)
    per_token[:, 0] = torch.cat([pc, pr])
    zeros = torch.zeros(2 * b, seq - 1)
    outputs = types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                    is_top1=zeros.bool())
    accelerator = types.SimpleNamespace(device="cpu", gather=lambda t: t,
                                        gather_for_metrics=lambda t: t)
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=accelerator,
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=BETA,
        label_smoothing=label_smoothing, use_weighting=False,
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=None)
    inputs = {"input_ids": torch.zeros(2 * b, seq, dtype=torch.long),
              "attention_mask": torch.ones(2 * b, seq, dtype=torch.long),
              "completion_mask": completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _losses_vs_trl() -> dict:
    import torch

    from megatron_patch.rlhf.dpo import dpo_loss, pair_metrics

    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-30 * torch.rand(6, generator=g) for _ in range(4))
    nc, nr = torch.tensor([3.0, 5, 7, 2, 9, 1]), torch.tensor([4.0, 4, 1, 9, 2, 6])
    out = {}
    for loss_type in ("sigmoid", "ipo"):
        ours = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type, chosen_tokens=nc,
                        rejected_tokens=nr)
        theirs, trl_metrics = _trl_loss(pc, pr, rc, rr, nc, nr, loss_type)
        metrics = {k: (v[0] / v[1]).item() for k, v in pair_metrics(ours, pc, pr).items()}
        out[loss_type] = {"ours": ours.losses.mean().item(), "trl": theirs,
                          "metrics": metrics, "trl_metrics": trl_metrics}
    # TRL 1.x keeps conservative DPO's label-smoothed sigmoid (TRL 0.x's `sigmoid` with
    # label_smoothing) as its `aot` loss, which sorts over the batch: one pair at a time it is
    # exactly that formula.
    smoothed = dpo_loss(pc, pr, rc, rr, beta=BETA, label_smoothing=0.2).losses
    out["label_smoothing"] = {
        "ours": smoothed.tolist(),
        "trl": [_trl_loss(pc[i:i + 1], pr[i:i + 1], rc[i:i + 1], rr[i:i + 1], nc[i:i + 1],
                          nr[i:i + 1], "aot", 0.2)[0] for i in range(6)],
        "unsmoothed": dpo_loss(pc, pr, rc, rr, beta=BETA).losses.tolist()}
    same = dpo_loss(pc, pr, pc, pr, beta=BETA)
    out["policy_is_reference"] = {"losses": same.losses.tolist(),
                                  "rewards": same.chosen_rewards.tolist()
                                  + same.rejected_rewards.tolist()}
    return out


def test_losses_and_metrics_equal_trl():
    (r,) = harness.run(_losses_vs_trl, 1)
    # Same formulas on the same fp32 numbers: only operation order differs.
    for loss_type in ("sigmoid", "ipo"):
        case = r[loss_type]
        assert abs(case["ours"] - case["trl"]) <= 1e-6, (loss_type, case)
        for name, value in case["metrics"].items():
            assert abs(value - case["trl_metrics"][name]) <= 1e-5, (loss_type, name, case)
    smoothed = r["label_smoothing"]
    assert max(abs(a - b) for a, b in zip(smoothed["ours"], smoothed["trl"], strict=True)) <= 1e-6
    assert smoothed["ours"] != smoothed["unsmoothed"]
    assert all(abs(v - math.log(2)) <= 1e-7 for v in r["policy_is_reference"]["losses"])
    assert set(r["policy_is_reference"]["rewards"]) == {0.0}
