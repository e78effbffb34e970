"""DPO (--train-mode dpo): TRL's losses, transformers as the oracle of log-probs and loss, layout
and micro-batch invariance, exact resume with the same reference, learning a preference."""

import json
import math
import os

import harness
import pytest

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
            "--eval-iters", "1", "--log-interval", "100",
            "--seed", str(harness.learning_seed(3)),
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


# ---- training runs ----------------------------------------------------------------------------

def _sequence_logps_hf(model, tok, pairs: list[dict]):
    """Per pair (chosen, rejected) sums of response-token log-probs under a transformers model,
    the prompt rendered by hand as the Alpaca prompt (the tokenizer has no chat template)."""
    import torch

    from megatron_patch.data.sft import ALPACA_PROMPT

    out = []
    for pair in pairs:
        prompt = tok(ALPACA_PROMPT.format(instruction=pair["prompt"]))["input_ids"]
        sides = []
        for side in ("chosen", "rejected"):
            response = tok(pair[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + response])).logits[0].double()
            # Position t predicts token t+1.
            logps = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
            sides.append(logps[torch.arange(len(response)), torch.tensor(response)].sum())
        out.append(sides)
    return torch.tensor(out)


def _dpo_run(model_root: str, train: str, valid: str, save: str | None, *, tp: int = 1,
             pp: int = 1, mbs: int = 2, extra: tuple = ()) -> dict:
    """Three DPO steps, then the validation metrics (one global batch); and what it printed."""
    import contextlib
    import io

    from megatron_patch.training.loop import Trainer

    trainer = Trainer(_args(os.path.join(model_root, "mcore"), train, valid=valid, tp=tp, pp=pp,
                            mbs=mbs, save=save, extra=extra))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        history = trainer.train()
    return {"history": history, "valid": trainer.evaluate_metrics(), "stdout": printed.getvalue(),
            "reference copy": trainer.mode.reference.copy is not None}


def _transformers_metrics(model_root: str, save: str, valid: str) -> dict:
    """The validation metrics computed by transformers on the exported policy and on the
    original model (the reference)."""
    import torch
    import transformers

    from megatron_patch.convert.hf_megatron import megatron_to_hf
    from megatron_patch.lora import checkpoint as lora_checkpoint

    exported = save + "_hf"
    if lora_checkpoint.is_lora_checkpoint(save):  # the policy: base + adapters, merged
        lora_checkpoint.export(save, exported, merge=True)
    else:
        megatron_to_hf(save, exported)
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    with open(valid) as f:
        pairs = [json.loads(line) for line in f]
    policy, reference = (
        _sequence_logps_hf(transformers.AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32).eval(), tok, pairs)
        for d in (exported, os.path.join(model_root, "hf")))
    ratios = policy - reference
    h = BETA * (ratios[:, 0] - ratios[:, 1])
    return {"dpo loss": (-torch.nn.functional.logsigmoid(h)).mean().item(),
            "rewards/chosen": (BETA * ratios[:, 0]).mean().item(),
            "rewards/rejected": (BETA * ratios[:, 1]).mean().item(),
            "logps/chosen": policy[:, 0].mean().item(),
            "logps/rejected": policy[:, 1].mean().item(),
            "rewards/accuracies": (h > 0).double().mean().item()}


@pytest.fixture(scope="module")
def runs(llama_models, tmp_path_factory) -> dict:
    """The DPO runs the tests below compare: TP=1 (micro-batches 2 x 2, the reference), TP=2,
    PP=2, DP=2 (distributed optimizer), 1 x 4 and 4 x 1 micro-batches, and a run stopped after
    iteration 2 and resumed in a new process."""
    tmp = tmp_path_factory.mktemp("dpo")
    train = _write(str(tmp / "train.jsonl"), PAIRS)
    valid = _write(str(tmp / "valid.jsonl"), PAIRS[:4])  # one global batch
    root = llama_models["llama2"]
    out = {"tp1": harness.run(_dpo_run, 1, root, train, valid, str(tmp / "tp1"))[0],
           "tp2": harness.run(_dpo_run, 2, root, train, valid, str(tmp / "tp2"), tp=2,
                              extra=("--sequence-parallel",))[0],
           "pp2": harness.run(_dpo_run, 2, root, train, valid, None, pp=2)[-1],
           "dp2": harness.run(_dpo_run, 2, root, train, valid, None,
                              extra=("--use-distributed-optimizer",))[0],
           "mbs1": harness.run(_dpo_run, 1, root, train, valid, None, mbs=1)[0],
           # Also logged every iteration, validated at 3 and written to TensorBoard.
           "mbs4": harness.run(_dpo_run, 1, root, train, valid, None, mbs=4, extra=(
               "--log-interval", "1", "--eval-interval", "3", "--tensorboard-dir",
               str(tmp / "tensorboard")))[0]}
    out["tensorboard"] = str(tmp / "tensorboard")
    for layout in ("tp1", "tp2"):
        out[layout]["hf"] = harness.run(_transformers_metrics, 1, root, str(tmp / layout),
                                        valid)[0]
    # Killed while saving iteration 3 (written, not published), then resumed from its own
    # iteration-2 checkpoint (--load points there, not at the start model): the reference must
    # still be the starting weights, which the checkpoint names.
    stopped = str(tmp / "stopped")
    out["killed_exit"] = harness.run_killed_in_save(3, _dpo_run, root, train, valid, stopped,
                                                    extra=("--save-interval", "1"))
    out["resumed"] = harness.run(_resume, 1, stopped, train, valid)[0]
    out["ref_load_changed"] = harness.run(_resume, 1, stopped, train, valid,
                                          ref_load=str(tmp / "tp1"))[0]
    out["ref_load_missing"] = harness.run(_resume, 1, stopped, train, valid,
                                          ref_load=os.path.join(root, "hf"))[0]
    return out


def _resume(save: str, train: str, valid: str, ref_load: str | None = None) -> dict | str:
    from megatron_patch.training.loop import Trainer

    extra = ("--ref-load", ref_load) if ref_load else ()
    try:
        trainer = Trainer(_args(save, train, valid=valid, save=save, extra=extra))
    except ValueError as e:
        return str(e)
    start = trainer.iteration
    return {"start": start, "history": trainer.train(), "valid": trainer.evaluate_metrics()}


def test_first_step_is_ln2_with_zero_rewards(runs):
    first = runs["tp1"]["history"][0]
    assert abs(first["dpo loss"] - math.log(2)) <= 1e-6, first
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0
    assert first["rewards/accuracies"] == 0  # ties are not wins (TRL: chosen > rejected)
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_loss_and_logps_equal_transformers_on_the_exported_policy(runs, layout):
    ours, hf = runs[layout]["valid"], runs[layout]["hf"]
    # The policy has moved from the reference (else this checks nothing beyond ln 2).
    assert abs(hf["dpo loss"] - math.log(2)) > 1e-3, hf
    # fp32: megatron and transformers order their reductions differently (fused QKV,
    # vocab-parallel softmax at TP=2); each log-prob sums a handful of tokens.
    for name, value in hf.items():
        assert abs(ours[name] - value) <= 1e-5, (layout, name, ours[name], value)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2", "mbs1", "mbs4"])
def test_losses_do_not_depend_on_the_layout(runs, layout):
    reference = [s["dpo loss"] for s in runs["tp1"]["history"]]
    curve = [s["dpo loss"] for s in runs[layout]["history"]]
    # fp32, 3 Adam steps: only the order of sums differs between layouts.
    assert len(curve) == 3 and max(abs(a - b) for a, b in zip(curve, reference,
                                                               strict=True)) <= 1e-5, (
        layout, curve, reference)
    for name, value in runs["tp1"]["valid"].items():
        assert abs(runs[layout]["valid"][name] - value) <= 1e-5, (layout, name)


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(runs):
    assert runs["killed_exit"] == -9  # really killed
    straight = [s["dpo loss"] for s in runs["tp1"]["history"]]
    resumed = runs["resumed"]
    assert resumed["start"] == 2, resumed
    # Same layout: bit-exact.
    assert [s["dpo loss"] for s in resumed["history"]] == straight[2:], (resumed, straight)
    assert runs["resumed"]["valid"] == runs["tp1"]["valid"]
    assert "a resumed run keeps it" in runs["ref_load_changed"], runs["ref_load_changed"]
    assert runs["ref_load_missing"].startswith("--ref-load ") and (
        "not a checkpoint" in runs["ref_load_missing"]), runs["ref_load_missing"]


# LoRA (rank 4, alpha 8, all linears): the reference is the policy with its adapters off, so no
# second model is built; its log-probs are still the base model's (transformers on the original
# HF model is the reference in _transformers_metrics), and the policy's the merged export's.
@pytest.mark.parametrize("tp", [1, 2])
def test_lora_dpo_uses_the_base_as_reference_without_a_copy(llama_models, tmp_path, tp):
    train = _write(str(tmp_path / "train.jsonl"), PAIRS)
    valid = _write(str(tmp_path / "valid.jsonl"), PAIRS[:4])
    root, save = llama_models["llama2"], str(tmp_path / "lora")
    flags = ("--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2",
             *(("--sequence-parallel",) if tp > 1 else ()))
    run = harness.run(_dpo_run, tp, root, train, valid, save, tp=tp, extra=flags)[0]
    (hf,) = harness.run(_transformers_metrics, 1, root, save, valid)
    assert not run["reference copy"], run["history"]
    # B starts at zero: the adapted policy is the base, so the first loss is ln 2.
    assert abs(run["history"][0]["dpo loss"] - math.log(2)) <= 1e-6, run["history"]
    assert abs(hf["dpo loss"] - math.log(2)) > 1e-3, hf  # the adapters moved the policy
    # fp32, as test_loss_and_logps_equal_transformers_on_the_exported_policy.
    for name, value in hf.items():
        assert abs(run["valid"][name] - value) <= 1e-5, (name, run["valid"][name], value)


# ---- learning a preference -------------------------------------------------------------------

TOPICS = ["the sky", "a cat", "the sea", "a tree", "the sun", "a fox", "the moon", "a dog",
          "the rain", "a bird", "the road", "a book", "the snow", "a ship", "the wind", "a lamp"]
HELD_OUT = ["the city", "a horse", "the river", "a song"]


def _style_pairs(topics: list[str]) -> list[dict]:
    # The preferred style is an enthusiastic answer; the other a flat one.
    return [{"prompt": f"Tell me about {t}.", "chosen": f"Wow! I love {t}!",
             "rejected": f"I know {t}."} for t in topics]


def _learn(model_root: str, train: str, held_out: str) -> dict:
    import transformers

    from megatron_patch.data.sft import render_prompt
    from megatron_patch.generation import generate
    from megatron_patch.training.loop import Trainer

    trainer = Trainer(_args(os.path.join(model_root, "mcore"), train, valid=held_out, iters=40,
                            mbs=8, gbs=8, seq=64, lr=2e-3))
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(model_root, "hf"))
    prompts = [render_prompt(tok, {"instruction": p["prompt"]})
               for p in _style_pairs(HELD_OUT)]

    def answers() -> list[str]:
        out = generate(trainer.module, prompts, max_new_tokens=8, vocab_size=trainer.vocab_size,
                       eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
        trainer.module.train()
        return [tok.decode(ids, skip_special_tokens=True) for ids in out]

    before = {"answers": answers(), **trainer.evaluate_metrics()}
    history = trainer.train()
    return {"before": before, "after": {"answers": answers(), **trainer.evaluate_metrics()},
            "first": history[0]["dpo loss"], "last": history[-1]["dpo loss"]}


def test_dpo_learns_the_preferred_style(llama_models, tmp_path):
    train = _write(str(tmp_path / "train.jsonl"), _style_pairs(TOPICS))
    held_out = _write(str(tmp_path / "held_out.jsonl"), _style_pairs(HELD_OUT))
    (r,) = harness.run(_learn, 1, llama_models["llama2"], train, held_out)
    harness.report_learning("dpo style", before=r["before"]["answers"],
                            after=r["after"]["answers"], first=r["first"], last=r["last"],
                            **{k: v for k, v in r["after"].items() if k.startswith("rewards/")})
    # Measured on seeds 1-5 (MEGATRON_PATCH_TEST_SEED; 3 is the default; a seed stands in for
    # another CPU's rounding): on the 4 held-out pairs, accuracy 1.0 and reward margin 5.7-6.0
    # (worst 5.72, seed 5) on every seed, all 4 greedy answers start with "Wow!", the loss goes
    # from ln 2 to 0.002-0.003. Bars: accuracy >= 0.9 (all 4 pairs, each ranked by a margin far
    # from 0), margin >= 2.5 (0.44 of the worst), every answer in the style.
    assert not any(a.startswith("Wow!") for a in r["before"]["answers"]), r
    assert r["after"]["rewards/accuracies"] >= 0.9, r
    assert r["after"]["rewards/margins"] >= 2.5, r
    assert all(a.startswith("Wow!") for a in r["after"]["answers"]), r
    assert r["last"] < r["first"], r


# ---- refusals -----------------------------------------------------------------------------------

def _refusal(argv: list[str]) -> str:
    """The refusal of argv's flags: argparse's error line, or validation's ValueError."""
    import contextlib
    import io

    from megatron_patch.training.arguments import parse_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parse_args(argv)
    except ValueError as e:
        return str(e)
    except SystemExit:
        return err.getvalue()
    return "no error"


def test_bad_flags_are_refused(tmp_path):
    base = ["--train-mode", "dpo", "--train-data-path", "x.jsonl", "--seq-length", "64",
            "--train-iters", "2"]
    (messages,) = harness.run(lambda: [
        _refusal(base),
        _refusal(base + ["--load", "m", "--dpo-loss", "ipo", "--dpo-label-smoothing", "0.1"]),
        _refusal(base + ["--load", "m", "--dpo-label-smoothing", "0.5"]),
        _refusal(base + ["--load", "m", "--dpo-beta", "0"]),
    ], 1)
    assert "--train-mode dpo needs --load" in messages[0], messages
    assert "--dpo-label-smoothing applies to --dpo-loss sigmoid only" in messages[1], messages
    assert "argument --dpo-label-smoothing: must be a number in [0, 0.5), got 0.5" in messages[
        2], messages
    assert "argument --dpo-beta: must be a finite number > 0, got 0" in messages[3], messages


def _bad_data(model_root: str, train: str) -> str:
    from megatron_patch.training.loop import Trainer

    try:
        Trainer(_args(os.path.join(model_root, "mcore"), train))
    except ValueError as e:
        return str(e)
    return "no error"


def _other_reference(model_root: str, other_root: str, train: str) -> str:
    from megatron_patch.training.loop import Trainer

    reference = os.path.join(other_root, "mcore")
    try:
        Trainer(_args(os.path.join(model_root, "mcore"), train,
                      extra=("--ref-load", reference))).train()
    except ValueError as e:
        return str(e)
    return "no error"


def test_a_reference_of_another_model_is_refused(llama_models, tmp_path):
    train = _write(str(tmp_path / "train.jsonl"), PAIRS)
    (message,) = harness.run(_other_reference, 1, llama_models["llama2"],
                             llama_models["llama1_tied"], train)
    other = os.path.join(llama_models["llama1_tied"], "mcore")
    assert message.startswith(f"--ref-load {other} holds another model than the policy"), message
    assert "num_query_groups 4 there, 2 here" in message, message


def test_bad_pairs_name_file_and_line(llama_models, tmp_path):
    train = _write(str(tmp_path / "train.jsonl"),
                   [PAIRS[0], {"prompt": "q", "chosen": "", "rejected": "b"}])
    (message,) = harness.run(_bad_data, 1, llama_models["llama2"], train)
    assert message == f"{train}:2: 'chosen' is empty", message


# ---- the log line, TensorBoard and the launcher ------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_trl_metric_names_in_the_log_line_and_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    iterations = [line for line in runs["mbs4"]["stdout"].splitlines()
                  if line.startswith("iteration")]
    assert len(iterations) == 3, runs["mbs4"]["stdout"]
    assert "| dpo loss 0.693147 | rewards/chosen 0.000000 | rewards/rejected 0.000000 | " \
           "rewards/accuracies 0.000000 | rewards/margins 0.000000 | logps/chosen " \
           in iterations[0], iterations[0]
    assert "validation at iteration 3 | dpo loss " in runs["mbs4"]["stdout"]
    events = EventAccumulator(runs["tensorboard"])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"dpo loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
            "rewards/margins", "logps/chosen", "logps/rejected",
            "validation rewards/accuracies"} <= tags, tags
    margins = events.Scalars("rewards/margins")
    assert [e.step for e in margins] == [1, 2, 3]
    assert [e.value for e in margins] == pytest.approx(
        [s["rewards/margins"] for s in runs["mbs4"]["history"]], abs=1e-6)


def test_launcher_builds_the_dpo_command(tmp_path):
    """rlhf/run_dpo_megatron.sh with a PYTHON that records what it is given (no training: the
    command it builds is that of the fine-tuning launcher, which test_sft_launchers runs)."""
    import subprocess

    from megatron_patch import launch

    recorder = tmp_path / "record.sh"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD"\n')
    recorder.chmod(0o755)
    record = str(tmp_path / "argv.txt")
    # ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
    # EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN VALID CKPT EPOCH OUTPUT_BASEPATH [FLAGS]
    positional = ["dsw", "", ROOT, "tiny", "2", "1e-6", "1e-7", "512", "512", "0", "bf16", "2",
                  "1", "sel", "true", "false", "true", "pairs.jsonl", "valid.jsonl", "ckpt/sft",
                  "1", str(tmp_path / "out"), "--dpo-beta", "0.2"]
    proc = subprocess.run(["bash", os.path.join(ROOT, "rlhf", "run_dpo_megatron.sh"),
                           *positional], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHON=str(recorder), RECORD=record))
    assert proc.returncode == 0, proc.stderr
    with open(record) as f:
        assert f.read().splitlines() == ["-m", "megatron_patch.launch", "dpo", *positional]
    cmd = launch.dpo_command(positional)
    flags = cmd[cmd.index("train") + 1:]
    joined = " ".join(flags)
    assert "--train-mode dpo --train-data-path pairs.jsonl" in joined, joined
    assert "--load ckpt/sft" in joined and "--finetune" in flags, joined
    assert "--valid-data-path valid.jsonl" in joined and "--bf16" in flags, joined
    assert flags[flags.index("--dpo-beta") + 1] == "0.2", joined
