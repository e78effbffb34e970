"""The families built from the pieces Megatron-Core lacks (tests/zoo/gpt2_lineage.py,
tests/zoo/baichuan_alibi.py) in training and generation: the loss goes down, curves agree
across layouts, greedy generation with a KV cache equals transformers', and models from
scratch select the architecture their position-encoding flags name."""

from __future__ import annotations

import os

import harness
import pytest
from harness import training_args

# Families exercising the pieces: ALiBi + embedding norm (bloom), ALiBi + q;k;v concat
# (baichuan), parallel layers with two and one norms (falcon), learned positions with offset.
TRAINED = ["bloom", "baichuan13b_alibi", "falcon40b_style", "falcon_new_one_norm", "galactica"]
GENERATED = ["bloom", "falcon40b_style", "galactica", "gpt_bigcode_mha", "starcoder"]


def _train_each(ckpts: dict[str, str], data: str) -> dict[str, list[float]]:
    from megatron_patch.training.loop import Trainer

    curves = {}
    for name, ckpt in ckpts.items():
        # The position-encoding flags users know must agree with the checkpoint.
        flags = ("--use-alibi-mask",) if name in ("bloom", "baichuan13b_alibi") else ()
        trainer = Trainer(training_args(ckpt, data, iters=20, tp=2, sp=True, lr=5e-3, extra=flags))
        curves[name] = [s["loss"] for s in trainer.train()]
    try:
        Trainer(training_args(ckpts["bloom"], data, extra=("--position-embedding-type", "rope")))
    except ValueError as e:
        curves["refused"] = str(e)
    return curves


def test_pretraining_loss_goes_down_at_tp2(zoo_models, tmp_path):
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    ckpts = {n: os.path.join(zoo_models[n], "mcore") for n in TRAINED}
    curves = harness.run(_train_each, 2, ckpts, data)[0]
    assert "disagrees with the checkpoint" in curves.pop("refused", "")
    harness.report_learning("families tp2", **{n: c[0] - sum(c[-5:]) / 5
                                               for n, c in curves.items()})
    # The data is a few repeated motifs: 20 steps at lr 5e-3 learn most of it. Drop (first
    # loss minus the mean of the last 5) on seeds 1, 2 and 7 (the default;
    # MEGATRON_PATCH_TEST_SEED, for another CPU's rounding), the 5 families: 2.13-2.70, worst
    # 2.125 (baichuan13b_alibi, seed 7). Bar: 1.0 (0.47 of the worst).
    for name, losses in curves.items():
        assert sum(losses[-5:]) / 5 < losses[0] - 1.0, (name, losses)


def _curves(ckpts: dict[str, str], data: str, **layout) -> dict[str, list[float]]:
    from megatron_patch.training.loop import Trainer

    return {name: [s["loss"] for s in Trainer(training_args(ckpt, data, **layout)).train()]
            for name, ckpt in ckpts.items()}


def test_loss_curves_agree_across_layouts(zoo_models, tmp_path):
    """The new parameters (embedding norm, per-branch norms, offset position table, tied
    embeddings across pipeline stages, a multi-query KV head replicated 4 times, whose copies
    sit on both TP ranks at TP=2) get the same gradients at every layout: a norm weight whose
    sequence-parallel gradient were not summed over TP would drift at once."""
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    ckpts = {n: os.path.join(zoo_models[n], "mcore")
             for n in ("bloom", "falcon40b_style", "galactica", "starcoder")}
    reference = harness.run(_curves, 1, ckpts, data)[0]
    layouts = {"tp2_sp": harness.run(_curves, 2, ckpts, data, tp=2, sp=True)[0],
               "pp2": harness.run(_curves, 2, ckpts, data, pp=2)[-1]}
    for layout, curves in layouts.items():
        for name, curve in curves.items():
            # fp32, 10 Adam steps: summation order alone stays below 1e-5 (as for Llama).
            diff = max(abs(a - b) for a, b in zip(curve, reference[name], strict=True))
            assert len(curve) == 10 and diff <= harness.LOSS_ATOL, (layout, name, diff)


# A random tiny model's EOS may come at any step: decode a fixed number of tokens instead.
MAX_NEW = 12


@pytest.mark.parametrize("name", GENERATED)
def test_greedy_generation_with_kv_cache_matches_transformers(zoo_models, name):
    """Left-padded prompts with a KV cache: ALiBi (keys at cached positions), parallel layers,
    learned positions counted from each row's first real token."""
    root = zoo_models[name]
    (expected,) = harness.run(harness.hf_greedy, 1, root, MAX_NEW, None)
    (tp1,) = harness.run(harness.megatron_greedy, 1, root, 1, MAX_NEW, None)
    tp2 = harness.run(harness.megatron_greedy, 2, root, 2, MAX_NEW, None)
    assert tp1 == expected, (tp1, expected)
    assert tp2[0] == tp2[1] == expected, (tp2, expected)


def _scratch_train_export_compare(tokenizer_dir: str, data: str, root: str,
                                  flags: tuple[str, ...]) -> dict:
    """From-scratch training with the position-encoding flags, export, and the exported native
    transformers model's logits against the trained Megatron model's."""
    import torch
    import transformers

    from megatron_patch.convert.hf_megatron import megatron_to_hf
    from megatron_patch.forward import forward_logits
    from megatron_patch.models import from_checkpoint
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.loop import Trainer

    save, out = os.path.join(root, "save"), os.path.join(root, "hf")
    args = parse_args([
        "--tokenizer-model", tokenizer_dir, "--data-path", data, "--split", "90,10,0",
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--normalization", "LayerNorm", *flags, "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "20",
        "--lr", "3e-3", "--eval-interval", "1000", "--save", save,
        "--seed", str(harness.learning_seed(5))])
    losses = [s["loss"] for s in Trainer(args).train()]
    megatron_to_hf(save, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits = hf(input_ids=tokens).logits
    model, meta = from_checkpoint(save)
    ours = forward_logits([model.eval()], tokens, meta.vocab_size)["logits"]
    return {"arch": type(hf).__name__, "losses": losses,
            "max_abs": (ours - hf_logits).abs().max().item()}


@pytest.mark.parametrize("flags, arch", [
    (("--use-alibi-mask",), "BloomForCausalLM"),
    (("--position-embedding-type", "learned_absolute", "--group-query-attention",
      "--num-query-groups", "1"), "GPTBigCodeForCausalLM"),
])
def test_models_from_scratch_select_the_architecture(zoo_models, tmp_path, flags, arch):
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    tokenizer = os.path.join(zoo_models["bloom"], "hf")
    (r,) = harness.run(_scratch_train_export_compare, 1, tokenizer, data, str(tmp_path), flags)
    harness.report_learning(f"scratch {arch}", drop=r["losses"][0] - r["losses"][-1])
    # Drop (first loss minus the last, 20 steps) on seeds 1, 2, 3 and 5 (the default;
    # MEGATRON_PATCH_TEST_SEED, for another CPU's rounding): Bloom 1.02-1.18, GPTBigCode
    # 1.40-1.63, worst 1.023 (Bloom, seed 2). Bar: 0.5 (0.49 of the worst). The former 10 steps
    # gave Bloom 0.086 (seed 1) under a bar of 0.
    assert r["arch"] == arch and r["losses"][-1] < r["losses"][0] - 0.5, r
    # fp32, same weights: summation order only (as the zoo's 1e-4).
    assert r["max_abs"] <= harness.LOGITS_ATOL, r
