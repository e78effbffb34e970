"""The training loop: HF-exact first loss, learning, layout invariance, exact resume, safe saves."""

import os

import harness
import pytest
from harness import train_losses, training_args


def _first_step_vs_hf(model_root: str, data: str) -> dict:
    import torch
    import transformers

    from megatron_patch.training import data as train_data
    from megatron_patch.training.loop import Trainer

    trainer = Trainer(training_args(os.path.join(model_root, "mcore"), data, iters=3))
    batch = next(train_data.microbatches(trainer.datasets[0], 0, harness.GLOBAL_BATCH, 1, 0, 1))
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(model_root, "hf"),
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=batch["tokens"]).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                batch["labels"].flatten()).item()
    return {"megatron": trainer.train()[0]["loss"], "hf": hf_loss}


def test_first_step_loss_equals_transformers(llama_models, tmp_path):
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    (r,) = harness.run(_first_step_vs_hf, 1, llama_models["llama2"], data)
    # fp32 on CPU, same batch: only reduction order differs.
    assert abs(r["megatron"] - r["hf"]) <= harness.LOSS_ATOL, r


def test_loss_goes_down_at_tp2(llama_models, tmp_path):
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    losses = harness.run(train_losses, 2, os.path.join(llama_models["llama2"], "mcore"), data,
                         iters=30, tp=2, sp=True, lr=5e-3)[0]
    # Drop (first loss minus the mean of the last 5) on seeds 1, 2, 3 and 7 (the default;
    # MEGATRON_PATCH_TEST_SEED, standing in for another CPU's rounding): 2.5-2.8, worst 2.505
    # (seed 3). Bar: 1.0 (0.4 of the worst).
    harness.report_learning("pretrain tp2", drop=losses[0] - sum(losses[-5:]) / 5)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_loss_curves_agree_across_layouts(llama_models, tmp_path):
    """(TP,PP,DP) = (1,1,1), (2,1,1)+SP, (1,2,1), (1,1,2)+distributed optimizer."""
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    ckpt = os.path.join(llama_models["llama2"], "mcore")
    reference = harness.run(train_losses, 1, ckpt, data)[0]
    curves = {
        "tp2_sp": harness.run(train_losses, 2, ckpt, data, tp=2, sp=True)[0],
        "pp2": harness.run(train_losses, 2, ckpt, data, pp=2)[0],
        "dp2_do": harness.run(train_losses, 2, ckpt, data, do=True)[0],
    }
    # fp32: the layouts sum the same numbers in different orders (TP all-reduces, DP gradient
    # reduction); over 10 Adam steps that stays below 1e-5 in the loss.
    for name, curve in curves.items():
        diff = max(abs(a - b) for a, b in zip(curve, reference, strict=True))
        assert len(curve) == len(reference) == 10 and diff <= harness.LOSS_ATOL, (
            name, diff, curve, reference)


def test_resume_is_exact(llama_models, tmp_path):
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    ckpt = os.path.join(llama_models["llama2"], "mcore")
    straight = harness.run(train_losses, 1, ckpt, data, iters=20)[0]
    save = str(tmp_path / "run")
    first = harness.run(train_losses, 1, ckpt, data, iters=20, save=save,
                        extra=("--exit-interval", "10"))[0]
    # A new process resumes from the iteration-10 checkpoint (same layout: bit-exact).
    second = harness.run(train_losses, 1, save, data, iters=20)[0]
    assert first + second == straight
    # Resumed at TP=2 with SP instead: same within fp32 reduction-order noise.
    other = harness.run(train_losses, 2, save, data, iters=20, tp=2, sp=True)[0]
    diff = max(abs(a - b) for a, b in zip(other, straight[10:], strict=True))
    assert diff <= harness.LOSS_ATOL, (other, straight[10:])
    # Its (plain) optimizer state does not load into the distributed optimizer.
    (message,) = harness.run(_load_error, 1, save, data, do=True)
    assert "saved without --use-distributed-optimizer" in message, message


def _load_error(*args, **kwargs) -> str:
    from megatron_patch.training.loop import Trainer

    try:
        Trainer(training_args(*args, **kwargs))
    except ValueError as e:
        return str(e)
    return "no error"


def test_distributed_optimizer_resume_is_exact(llama_models, tmp_path):
    """With --use-distributed-optimizer (on torch Adam here: no apex/TE), at (TP,DP) = (1,2) and
    (2,2): 10 straight iterations (saving at 5) equal 5 + 5 resumed in new processes."""
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    ckpt = os.path.join(llama_models["llama2"], "mcore")
    dp2, tp2dp2 = str(tmp_path / "dp2"), str(tmp_path / "tp2dp2")
    straight = harness.run(train_losses, 2, ckpt, data, do=True, save=dp2, save_interval=5)[0]
    straight_tp2 = harness.run(train_losses, 4, ckpt, data, tp=2, do=True, save=tp2dp2,
                               save_interval=5)[0]
    harness.stopped_at(dp2, 5)
    harness.stopped_at(tp2dp2, 5)
    # Same layout: bit-exact (Adam moments, main params, step count, RNG and data position).
    assert harness.run(train_losses, 2, dp2, data, do=True)[0] == straight[5:]
    assert harness.run(train_losses, 4, tp2dp2, data, tp=2, do=True)[0] == straight_tp2[5:]
    # Resharded to (TP,PP,DP) = (1,2,1) (fully_reshardable state): fp32 reduction-order noise.
    other = harness.run(train_losses, 2, tp2dp2, data, pp=2, do=True)[0]
    diff = max(abs(a - b) for a, b in zip(other, straight_tp2[5:], strict=True))
    assert diff <= harness.LOSS_ATOL, (other, straight_tp2[5:])
    # The distributed optimizer's state does not load into the plain one.
    (message,) = harness.run(_load_error, 1, dp2, data)
    assert "saved with --use-distributed-optimizer" in message, message


def _killed_during_second_save(ckpt: str, data: str, save: str) -> None:
    import signal

    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save
    calls = []

    def save_then_die(*args, **kwargs):
        calls.append(1)
        real_save(*args, **kwargs)
        if len(calls) == 2:  # data written, not yet published
            os.kill(os.getpid(), signal.SIGKILL)

    dist_checkpointing.save = save_then_die
    train_losses(ckpt, data, iters=4, save=save, save_interval=2)


def _load_latest(save: str, data: str) -> dict:
    from megatron_patch import checkpoint
    from megatron_patch.training.loop import Trainer

    # The killed run's length (its LR schedule).
    trainer = Trainer(training_args(save, data, iters=4))
    return {"iteration": trainer.iteration, "latest": checkpoint.latest_iteration(save),
            "losses": [s["loss"] for s in trainer.train()]}


def test_sigkill_during_save_keeps_previous_checkpoint(llama_models, tmp_path):
    import multiprocessing

    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    save = str(tmp_path / "run")
    proc = multiprocessing.get_context("fork").Process(
        target=harness._worker,
        args=(0, 1, harness._free_port(), _killed_during_second_save,
              (os.path.join(llama_models["llama2"], "mcore"), data, save),
              multiprocessing.get_context("fork").Queue()))
    proc.start()
    proc.join(300)
    assert proc.exitcode == -9  # really killed
    assert os.path.isdir(os.path.join(save, "iter_0000004.partial"))
    (r,) = harness.run(_load_latest, 1, save, data)
    assert r["latest"] == 2 and r["iteration"] == 2 and len(r["losses"]) == 2


def _split_error(data: str) -> str:
    from megatron_patch.training.data import check_splits

    try:
        check_splits([data], "969,30,1")
    except ValueError as e:
        return str(e)
    return "no error"


def test_a_split_without_documents_is_refused(tmp_path):
    data = str(tmp_path / "small")
    harness.run(harness.make_token_dataset, 1, data, num_docs=20)
    (message,) = harness.run(_split_error, 1, data)
    assert "test part" in message and "20 documents" in message, message


def _scratch_and_eval(tokenizer_dir: str, data: str, save: str) -> dict:
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.loop import Trainer

    args = parse_args([
        "--tokenizer-model", tokenizer_dir, "--data-path", data, "--split", "90,10,0",
        "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
        "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
        "--use-rotary-position-embeddings", "--untie-embeddings-and-output-weights",
        "--seq-length", str(harness.SEQ_LENGTH), "--micro-batch-size", "2",
        "--global-batch-size", "4",
        "--train-iters", "30", "--lr", "3e-3", "--lr-warmup-iters", "2", "--eval-interval", "30",
        "--eval-iters", "2", "--save", save, "--seed", str(harness.learning_seed(5))])
    trainer = Trainer(args)
    initial_eval = trainer.evaluate()
    losses = [s["loss"] for s in trainer.train()]
    return {"initial_eval": initial_eval, "final_eval": trainer.evaluate(), "losses": losses}


def test_model_from_scratch_trains_evaluates_and_exports(llama_models, tmp_path):
    data, save = str(tmp_path / "tokens"), str(tmp_path / "scratch")
    harness.run(harness.make_token_dataset, 1, data)
    (r,) = harness.run(_scratch_and_eval, 1, os.path.join(llama_models["llama2"], "hf"), data,
                       save)
    # Validation loss drop on seeds 1, 2, 3 and 5 (the default; MEGATRON_PATCH_TEST_SEED, for
    # another CPU's rounding): 1.71-1.82, worst 1.714 (seed 3). Bar: 0.5 (0.29 of the worst).
    # The training loss fell by 1.66-1.88 on the same seeds (bar: it falls).
    harness.report_learning("scratch", eval_drop=r["initial_eval"] - r["final_eval"],
                            drop=r["losses"][0] - r["losses"][-1])
    assert r["final_eval"] < r["initial_eval"] - 0.5, r
    assert r["losses"][-1] < r["losses"][0], r
    out = str(tmp_path / "exported")
    (r,) = harness.run(_export_and_run, 1, save, out)
    # One logit per token of the tokenizer's vocabulary: padding rows are not exported.
    assert r["shape"] == [1, 3, r["tokenizer_size"]], r


def _export_and_run(ckpt: str, out: str) -> dict:
    import torch
    import transformers

    from megatron_patch.convert.hf_megatron import megatron_to_hf

    megatron_to_hf(ckpt, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    return {"shape": list(model(torch.tensor([[1, 2, 3]])).logits.shape),
            "tokenizer_size": len(transformers.AutoTokenizer.from_pretrained(out))}


MIXED_ITERS = 12


def _mixed_precision(ckpt: str, data: str, flag: str) -> list[dict]:
    from megatron_patch.training.loop import Trainer

    extra = (flag, "--initial-loss-scale", "4096") if flag == "--fp16" else (flag,)
    return Trainer(training_args(ckpt, data, iters=MIXED_ITERS, lr=3e-3, extra=extra)).train()


def test_bf16_and_fp16_with_dynamic_loss_scaling(llama_models, tmp_path):
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    ckpt = os.path.join(llama_models["llama2"], "mcore")
    (bf16,) = harness.run(_mixed_precision, 1, ckpt, data, "--bf16")
    (fp16,) = harness.run(_mixed_precision, 1, ckpt, data, "--fp16")
    harness.report_learning("bf16 fp16", bf16_drop=bf16[0]["loss"] - bf16[-1]["loss"],
                            fp16_drop=fp16[0]["loss"] - fp16[-1]["loss"],
                            fp16_skipped=sum(s["skipped"] for s in fp16))
    # Drops (first loss minus the last, 12 steps) on seeds 1-4 and 7 (the default;
    # MEGATRON_PATCH_TEST_SEED, for another CPU's rounding, which bf16 and fp16 amplify): bf16
    # 0.49-0.87, fp16 0.46-0.74 (4 of the 12 steps skipped on every seed); worst 0.49 and 0.46
    # (seed 3). Bars: 0.2 for both (0.41 and 0.43 of the worst). With the former 8 steps the
    # drops were 0.21 and 0.078 at worst (seeds 3 and 1), under the former bars 0.3 and 0.1.
    assert bf16[-1]["loss"] < bf16[0]["loss"] - 0.2, bf16
    assert all(s["loss_scale"] == 1.0 for s in bf16)
    # fp16: a dynamic scale that starts at 4096 and is halved on every overflow (hysteresis 2).
    assert fp16[0]["loss_scale"] <= 4096 and not all(s["skipped"] for s in fp16), fp16
    # The skipped (overflowing) first steps leave fewer updates: a smaller drop.
    assert fp16[-1]["loss"] < fp16[0]["loss"] - 0.2, fp16




def _logged_tokens(model_root: str, train: str, mode: str) -> dict:
    """In a worker: two logged steps of `mode` (2 samples a step, 1 per micro-batch), on a clock
    that advances one second per training step, so that the logged tokens/s is the token count
    of one step; and a hand count of the tokens in the first global batch the model is given."""
    import contextlib
    import io
    import re
    import types

    from megatron_patch.training import data as train_data
    from megatron_patch.training import loop
    from megatron_patch.training.arguments import parse_args

    trainer = loop.Trainer(parse_args([
        "--train-mode", mode, "--load", os.path.join(model_root, "mcore"),
        "--train-data-path", train, "--seq-length", "64", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-4",
        "--eval-interval", "100", "--log-interval", "1"]))
    # Every token of every sequence of the batch (an SFT sample's `tokens`; a pair's
    # `chosen_tokens` and `rejected_tokens`), padding included, as tokens/s counts them.
    batch_tokens = sum(tensor.numel()
                       for micro in train_data.microbatches(trainer.datasets[0], 0, 1, 2, 0, 1)
                       for name, tensor in micro.items() if name.endswith("tokens"))
    clock = [0.0]
    train_step = trainer.train_step

    def timed_step() -> dict:
        clock[0] += 1.0
        return train_step()

    trainer.train_step = timed_step
    loop.time = types.SimpleNamespace(time=lambda: clock[0])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.train()
    logged = [(int(m[1]), float(m[2])) for m in re.finditer(
        r"consumed tokens (\d+) \|.*\| tokens/s ([\d.]+)", printed.getvalue())]
    return {"batch_tokens": batch_tokens, "logged": logged}


@pytest.mark.parametrize("mode", ["dpo", "rm", "finetune"])
def test_consumed_tokens_count_the_tokens_tokens_per_second_counts(llama_models, tmp_path, mode):
    """A preference pair puts two sequences through the model: both count, in the consumed
    tokens as in tokens/s (SFT, one sequence a sample, for comparison)."""
    import json

    from megatron_patch.tiny import QA

    train = str(tmp_path / "train.jsonl")
    if mode == "finetune":
        harness.write_sft_records(train, 4)
    else:
        with open(train, "w") as f:
            for i, (q, a) in enumerate(QA[:4]):
                f.write(json.dumps({"prompt": q, "chosen": a, "rejected": QA[i + 1][1]}) + "\n")
    (r,) = harness.run(_logged_tokens, 1, llama_models["llama2"], train, mode)
    sequences = 1 if mode == "finetune" else 2
    assert r["batch_tokens"] == 2 * sequences * 64, r  # 2 samples of `sequences` x 64 tokens
    assert r["logged"] == [(r["batch_tokens"], r["batch_tokens"]),
                           (2 * r["batch_tokens"], r["batch_tokens"])], r


def _load_messages(load: str, data: str) -> list[str]:
    """This rank's megatron_patch log records while a Trainer loads `load`."""
    import logging

    from megatron_patch.training.loop import Trainer

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("megatron_patch")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        Trainer(training_args(load, data, iters=3))
    finally:
        logger.removeHandler(handler)
    return [m for m in records if m.startswith("loaded weights from")]


def test_the_loaded_weights_line_is_printed_once_not_per_rank(llama_models, tmp_path):
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    per_rank = harness.run(_load_messages, 2, os.path.join(llama_models["llama2"], "mcore"),
                           data)
    assert sorted(len(m) for m in per_rank) == [0, 1], per_rank


def test_a_registered_mode_brings_its_flags_and_choice(monkeypatch):
    """A mode registered with `register_mode` is a --train-mode choice; its `add_arguments`
    puts its flags (in its group) into the train parser and its `check_flags_of` runs whichever
    mode is chosen; one registered with selectable=False is neither offered nor asked."""
    import argparse

    from megatron_patch.errors import ArgumentParser
    from megatron_patch.training import arguments, modes

    monkeypatch.setattr(modes, "MODES", dict(modes.MODES))
    monkeypatch.setattr(modes, "SELECTABLE", list(modes.SELECTABLE))
    monkeypatch.setattr(arguments, "MODES", modes.MODES)
    monkeypatch.setattr(arguments, "SELECTABLE", modes.SELECTABLE)
    asked = []

    class ToyMode(modes.FinetuneMode):
        name = "toy"

        @classmethod
        def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
            parser.add_argument_group("toy mode").add_argument("--toy-strength", type=float)

        @classmethod
        def check_flags_of(cls, args: argparse.Namespace) -> None:
            asked.append(args.train_mode)

    class HiddenMode(ToyMode):
        name = "hidden"

        @classmethod
        def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
            parser.add_argument("--hidden-flag")

    modes.register_mode("toy", ToyMode)
    modes.register_mode("hidden", HiddenMode, selectable=False)
    parser = arguments.add_arguments(ArgumentParser(prog="megatron-patch train"))
    assert "toy mode:" in parser.format_help()
    assert "--hidden-flag" not in parser.format_help()
    args = parser.parse_args(["--train-mode", "toy", "--toy-strength", "2", "--seq-length", "8",
                              "--train-iters", "1", "--train-data-path", "x.jsonl"])
    assert args.toy_strength == 2.0
    assert arguments.validate(args) is args and asked == ["toy"]
    assert modes.mode_class("toy") is ToyMode and modes.mode_class("hidden") is HiddenMode
    with pytest.raises(SystemExit):
        parser.parse_args(["--train-mode", "hidden", "--seq-length", "8"])
    with pytest.raises(ValueError, match="registered twice"):
        modes.register_mode("toy", HiddenMode)
