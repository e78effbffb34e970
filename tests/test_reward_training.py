"""Reward-model training (`--train-mode rm`, issue 13): layout invariance, learning, export to
transformers, exact resume after a kill, refusals, the launcher.

The model starts from a converted language model (tiny Llama 2) whose tokenizer pads with EOS
(pad == EOS: transformers then scores the token before a sequence's closing EOS), so the score
head is created, and the checkpoint becomes a LlamaForSequenceClassification.

Tolerances: fp32 on CPU. Layouts sum the same numbers in other orders (TP all-reduces, DP
gradient reduction): losses and metrics within 1e-5 over the run (harness.LOSS_ATOL); exported
scores within 1e-4 of ours (harness.LOGITS_ATOL); a resume at the same layout is bit-exact.
"""

from __future__ import annotations

import json
import os
import random

import harness
import pytest

SEQ, GBS, ITERS = 96, 4, 6
METRICS = ("loss", "accuracy", "margin")
# Polite answers are preferred to rude ones about the same subjects. Both sides end in one of
# the same closings, drawn independently, so the token a reward model reads differs at random
# between the two: an untrained head ranks them by chance, and learning must find the opener.
TRAIN_WORDS = ["fox", "dog", "model", "tensor", "pipeline", "number", "answer", "sky"]
HELD_OUT_WORDS = ["code", "cat", "language", "logits"]
POLITE, RUDE = ["Certainly!", "Of course!", "Gladly!"], ["Whatever.", "Ugh.", "Meh."]
CLOSINGS = ["thanks.", "bye.", "done.", "ok."]


def write_style_pairs(path: str, words: list[str], n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.sample(words, 2)
            answer = f"the {a} is like the {b},"
            f.write(json.dumps({
                "prompt": f"Tell me about the {a}.",
                "chosen": f"{rng.choice(POLITE)} {answer} {rng.choice(CLOSINGS)}",
                "rejected": f"{rng.choice(RUDE)} {answer} {rng.choice(CLOSINGS)}",
            }) + "\n")


def _prepare(root: str) -> None:
    """In a worker: the tiny LM with a pad == EOS tokenizer, converted; preference files."""
    from transformers import AutoTokenizer

    from megatron_patch import tiny
    from megatron_patch.convert.hf_megatron import hf_to_megatron

    hf = os.path.join(root, "hf")
    tiny.make_hf_model(hf, "llama2")
    tok = AutoTokenizer.from_pretrained(hf)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(hf)
    hf_to_megatron(hf, os.path.join(root, "lm"))
    write_style_pairs(os.path.join(root, "train.jsonl"), TRAIN_WORDS, 64, 0)
    write_style_pairs(os.path.join(root, "valid.jsonl"), HELD_OUT_WORDS, 32, 1)


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("rm_train"))
    harness.run(_prepare, 1, root)
    return root


def _args(root: str, load: str | None = None, *, iters: int = ITERS, tp: int = 1, pp: int = 1,
          sp: bool = False, mbs: int = 2, gbs: int = GBS, lr: float = 1e-3,
          save: str | None = None, extra: tuple = ()):
    from megatron_patch.training.arguments import parse_args

    argv = ["--train-mode", "rm", "--load", load or os.path.join(root, "lm"),
            "--train-data-path", os.path.join(root, "train.jsonl"), "--seq-length", str(SEQ),
            "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs),
            "--train-iters", str(iters), "--lr", str(lr), "--min-lr", "1e-5",
            "--lr-warmup-iters", "1", "--eval-interval", "1000", "--log-interval", "100",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--seed", str(harness.learning_seed(7)), *extra]
    if sp:
        argv.append("--sequence-parallel")
    if save:
        argv += ["--save", save, "--save-interval", "2"]
    return parse_args(argv)


def _curve(*args, **kwargs) -> list[dict[str, float]]:
    from megatron_patch.training.loop import Trainer

    history = Trainer(_args(*args, **kwargs)).train()
    return [{k: s[k] for k in METRICS} for s in history]


def _single_rank_curves(root: str) -> dict[str, list]:
    """In a worker: micro-batches 2 x 2 (the reference), 1 x 4 and 4 x 1; and the reference
    with TRL's centring term (--center-rewards-coefficient 1)."""
    curves = {f"mbs{mbs}": _curve(root, mbs=mbs) for mbs in (2, 1, 4)}
    curves["centred"] = _curve(root, extra=("--center-rewards-coefficient", "1"))
    return curves


def _four_rank_curves(root: str) -> dict[str, list]:
    """In a worker of 4 ranks: TP=2 with SP x DP=2, PP=2 x DP=2, TP=2 x PP=2."""
    return {"tp2_sp_dp2": _curve(root, tp=2, sp=True, mbs=1),
            "pp2_dp2": _curve(root, pp=2, mbs=1),
            "tp2_pp2": _curve(root, tp=2, pp=2)}


@pytest.fixture(scope="module")
def reference(rm_run) -> dict[str, list]:
    (curves,) = harness.run(_single_rank_curves, 1, rm_run)
    return curves


def _max_difference(a: list[dict], b: list[dict]) -> float:
    assert len(a) == len(b) == ITERS
    return max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in METRICS)


def test_rm_losses_and_metrics_agree_across_layouts_and_micro_batching(rm_run, reference):
    ref = reference["mbs2"]
    harness.report_learning("rm layouts", first=ref[0]["loss"],
                            drop=ref[0]["loss"] - ref[-1]["loss"])
    # The score head is new (random), so the first loss is near ln 2, not at it; it learns.
    # On seeds 1, 2, 3 and 7 (the default; MEGATRON_PATCH_TEST_SEED, for another CPU's
    # rounding): first loss 0.691-0.698; drop over the 6 steps 0.07-0.32, worst 0.070 (seed
    # 3). Bars: 0.6 < first < 0.8; drop >= 0.03 (0.43 of the worst).
    assert 0.6 < ref[0]["loss"] < 0.8 and ref[-1]["loss"] < ref[0]["loss"] - 0.03, ref
    # The centring term is added at equal weights on the first step (the unit tests check its
    # value against TRL's); then it changes the path.
    centred = reference["centred"]
    assert centred[0]["loss"] > ref[0]["loss"] + 1e-4 and centred[0]["margin"] == ref[0][
        "margin"], (centred, ref)
    curves = {name: c for name, c in reference.items() if name not in ("mbs2", "centred")}
    for rank_curves in harness.run(_four_rank_curves, 4, rm_run):
        curves.update(rank_curves)
    for name, curve in curves.items():
        assert _max_difference(curve, ref) <= harness.LOSS_ATOL, (name, curve, ref)


def _learn_export_and_score(root: str) -> dict:
    """In a worker: 40 steps from the LM, then held-out accuracy from our scores, and the
    exported model's scores (AutoModelForSequenceClassification) on the same batch."""
    import torch
    import transformers

    from megatron_patch import checkpoint
    from megatron_patch.convert.hf_megatron import megatron_to_hf
    from megatron_patch.data.preference import build_preference_dataset
    from megatron_patch.rlhf.pairs import pair_tensors
    from megatron_patch.rlhf.reward import score
    from megatron_patch.training.loop import Trainer

    save = os.path.join(root, "rm")
    trainer = Trainer(_args(root, iters=40, mbs=4, gbs=8, lr=2e-3, extra=("--save", save)))
    tok = trainer.tokenizer()
    held_out, summary = build_preference_dataset(os.path.join(root, "valid.jsonl"), tok, SEQ)
    assert summary.truncated == 0  # every sequence keeps its closing EOS
    items = [held_out[i] for i in range(len(held_out))]
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    tokens, lengths = pair_tensors(batch, "tokens"), pair_tensors(batch, "length")
    pairs = len(items)

    def scores():
        trainer.module.eval()
        return score([trainer.module], tokens, trainer.mode.pad_token_id, lengths,
                     micro_batch_size=16)

    before = scores()
    trainer.train()
    ours = scores()
    out = os.path.join(root, "rm_hf")
    megatron_to_hf(save, out)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    # transformers pools by config.pad_token_id alone: pad with it beyond each length.
    padded = tokens.clone()
    padded[torch.arange(SEQ)[None, :] >= lengths[:, None]] = hf.config.pad_token_id
    with torch.no_grad():
        theirs = hf(input_ids=padded).logits[:, 0]
    return {"accuracy": (ours[:pairs] > ours[pairs:]).float().mean().item(),
            "margin": (ours[:pairs] - ours[pairs:]).mean().item(),
            "margin_before": (before[:pairs] - before[pairs:]).mean().item(),
            "accuracy_before": (before[:pairs] > before[pairs:]).float().mean().item(),
            "pairs": pairs, "max_abs": (theirs - ours).abs().max().item(),
            "pad_token_id": hf.config.pad_token_id, "eos": tok.eos_token_id,
            "class": type(hf).__name__,
            "meta": checkpoint.read_meta(save).architecture,
            "ends_in_eos": bool((tokens[torch.arange(2 * pairs), lengths - 1]
                                 == tok.eos_token_id).all())}


def test_rm_learns_a_style_preference_and_exports_to_transformers(rm_run):
    (r,) = harness.run(_learn_export_and_score, 1, rm_run)
    harness.report_learning("rm style", accuracy=r["accuracy"], before=r["accuracy_before"],
                            margin=r["margin"], margin_before=r["margin_before"])
    # Untrained (a random new head) it scores chosen and rejected alike; trained, it prefers the
    # style on held-out pairs: margin = mean chosen minus rejected score, accuracy = the share
    # of the 32 pairs ranked right. Measured (MEGATRON_PATCH_TEST_SEED: a seed stands in for
    # another CPU's rounding) on seeds 1-4 and 7: margin before |0.005| at most, after 4.2-5.5
    # (worst 4.22, seed 4); on seeds 1-5 and 7: accuracy after 0.94-1.0 (worst 0.9375, 2 pairs
    # wrong, seed 2). The untrained head's accuracy is noise (0.34-0.78), so it is not a bar.
    # Bars: margin before < 0.1, after >= 2 (0.47 of the worst); accuracy >= 0.85 (up to 4
    # pairs wrong: 0.8 of the worst seed's gain over chance).
    assert abs(r["margin_before"]) < 0.1 and r["margin"] >= 2.0, r
    assert r["accuracy"] >= 0.85 and r["pairs"] == 32, r
    assert r["class"] == r["meta"] == "LlamaForSequenceClassification", r
    # pad == EOS: every sequence ends in EOS, which transformers skips as padding; ours too.
    assert r["pad_token_id"] == r["eos"] and r["ends_in_eos"], r
    assert r["max_abs"] <= harness.LOGITS_ATOL, r


def _resume(root: str, save: str) -> dict:
    from megatron_patch.training.loop import Trainer

    trainer = Trainer(_args(root, load=save))
    start = trainer.iteration
    history = trainer.train()
    return {"start": start, "curve": [{k: s[k] for k in METRICS} for s in history]}


def test_rm_resume_after_a_kill_reproduces_the_losses_exactly(rm_run, reference, tmp_path):
    save = str(tmp_path / "run")
    # Killed inside the third save (iteration 6 written, not yet published).
    assert harness.run_killed_in_save(3, _curve, rm_run, save=save) == -9  # really killed
    with open(os.path.join(save, "hf", "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForSequenceClassification"]
    (r,) = harness.run(_resume, 1, rm_run, save)
    assert r["start"] == 4 and r["curve"] == reference["mbs2"][4:], (r, reference["mbs2"])


def _train_error(argv: list[str]) -> tuple[int, str]:
    return harness.cli_error(["train", *argv])


def _convert_rm(root: str) -> None:
    from reward_models import MODELS, save_hf_reward_model

    from megatron_patch.convert.hf_megatron import hf_to_megatron

    save_hf_reward_model(os.path.join(root, "hf"), *MODELS["llama"])
    hf_to_megatron(os.path.join(root, "hf"), os.path.join(root, "rm"))


def test_rm_checkpoint_refused_by_lm_modes_and_rm_flags_checked(rm_run, tmp_path):
    rm = str(tmp_path / "rm")
    harness.run(_convert_rm, 1, str(tmp_path))
    common = ["--train-data-path", os.path.join(rm_run, "train.jsonl"), "--seq-length",
              str(SEQ), "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-4"]
    cases = {
        "finetune": (["--train-mode", "finetune", "--load", rm, *common],
                     f"--load {rm}: a reward model (LlamaForSequenceClassification)"),
        "pack": (["--train-mode", "rm", "--load", rm, "--pack-sequences", *common],
                 "--pack-sequences: a reward model scores whole sequences"),
        "center in sft": (["--train-mode", "finetune", "--load", rm, *common,
                           "--center-rewards-coefficient", "0.01"],
                          "--center-rewards-coefficient applies to --train-mode rm, not finetune"),
        "negative center": (["--train-mode", "rm", "--load", rm, *common,
                             "--center-rewards-coefficient", "-1"],
                            "argument --center-rewards-coefficient: must be a finite number "
                            ">= 0, got -1"),
    }
    for name, (argv, needle) in cases.items():
        ((rc, err),) = harness.run(_train_error, 1, argv)
        lines = [x for x in err.splitlines() if ": error:" in x]
        assert rc != 0 and len(lines) == 1 and needle in lines[0], (name, err[-2000:])


def test_rm_launcher_maps_positional_arguments(tmp_path):
    """rlhf/run_rm_megatron.sh hands its arguments to launch.py's rm command (a stand-in
    interpreter prints them), which maps them onto the trainer's flags."""
    import subprocess

    from megatron_patch import launch

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fake = tmp_path / "fake-python"
    fake.write_text('#!/usr/bin/env bash\necho "ARGS=$*"\n')
    fake.chmod(0o755)
    # ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
    # EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN VALID CKPT EPOCH OUTPUT_BASEPATH
    args = ["dsw", "", root, "tiny", "2", "1e-5", "1e-6", "128", "64", "0", "bf16", "2", "1",
            "sel", "true", "false", "true", "pairs.jsonl", "none", "ckpt/sft", "1",
            str(tmp_path / "out")]
    proc = subprocess.run(["bash", os.path.join(root, "rlhf", "run_rm_megatron.sh"), *args],
                          env=dict(os.environ, PYTHON=str(fake)), capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout == "ARGS=-m megatron_patch.launch rm " + " ".join(args) + "\n", proc
    line = " ".join(launch.rm_command(args))
    for flags in ("-m megatron_patch train --load ckpt/sft", "--finetune",
                  "--train-mode rm --train-data-path pairs.jsonl",
                  "--micro-batch-size 2 --seq-length 64", "--epochs 1", "--bf16",
                  "--tensor-model-parallel-size 2", "--use-distributed-optimizer",
                  "--sequence-parallel"):
        assert flags in line, (flags, line)
    assert "--valid-data-path" not in line
    with pytest.raises(ValueError, match="usage: run_rm_megatron.sh"):
        launch.rm_command(args[:5])


def test_rlhf_readme_reward_model_commands_parse():
    """The `megatron-patch` command lines of rlhf/README.md's reward-model section are what
    the parser (and, for train, its validation) accepts."""
    import re
    import shlex

    from megatron_patch import cli
    from megatron_patch.training import arguments

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "rlhf", "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Reward models")[1].split("\n## ")[0]
    commands = [" ".join(line.replace("\\\n", " ").split())
                for block in re.findall(r"```\n(.*?)```", section, re.S)
                for line in block.replace("\\\n", " ").splitlines()
                if line.startswith("megatron-patch ")]
    assert len(commands) == 3 and any("--train-mode rm" in c for c in commands), commands
    for command in commands:
        args = cli.build_parser().parse_args(shlex.split(command)[1:])
        if args.command == "train":
            arguments.validate(args)
            assert args.train_mode == "rm"
