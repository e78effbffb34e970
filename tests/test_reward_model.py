"""Reward models (issue 13): HF *ForSequenceClassification import and export, scores at every
layout against transformers, the weight mapping of every family, and refusals.

Oracle: transformers' *ForSequenceClassification (num_labels == 1), which pools the score at
the last token that is not pad_token_id. Tolerance: 1e-4 on scores (harness.LOGITS_ATOL: fp32 on
CPU, megatron and transformers order their reductions differently, ~1e-6); conversion round
trips are bit-exact.
"""

from __future__ import annotations

import json
import os

import harness
import pytest
from reward_models import EOS, LENGTHS, MODELS, PAD, save_hf_reward_model


def _tokens(pad: int):
    """A right-padded batch: sequences of LENGTHS, each closed by EOS."""
    import torch

    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(3, 1000, (len(LENGTHS), max(LENGTHS)), generator=gen)
    for row, length in enumerate(LENGTHS):
        tokens[row, length - 1] = EOS
        tokens[row, length:] = pad
    return tokens


def _prepare(root: str) -> dict[str, dict]:
    """In a worker: each HF reward model, transformers' scores, its conversion, our scores at
    TP=1, and the export of the conversion (loaded back with AutoModelForSequenceClassification)."""
    import torch
    import transformers

    from megatron_patch import parallel
    from megatron_patch.convert.hf_megatron import hf_to_megatron, megatron_to_hf
    from megatron_patch.rlhf.reward import load_reward_model, score

    report = {}
    for name, (arch, config, pad) in MODELS.items():
        hf_dir, mcore, out = (os.path.join(root, name, d) for d in ("hf", "mcore", "export"))
        model = save_hf_reward_model(hf_dir, arch, config, pad)
        tokens = _tokens(pad)
        with torch.no_grad():
            reference = model(input_ids=tokens).logits[:, 0]
        torch.save({"tokens": tokens, "scores": reference}, os.path.join(root, name, "ref.pt"))
        meta = hf_to_megatron(hf_dir, mcore)
        parallel.initialize(1, 1)
        ours = score([load_reward_model(mcore)[0]], tokens, pad)
        megatron_to_hf(mcore, out)
        exported = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
        with torch.no_grad():
            theirs = exported(input_ids=tokens).logits[:, 0]
        report[name] = {"architecture": meta.architecture, "exported_class":
                        type(exported).__name__,
                        "ours": (ours - reference).abs().max().item(),
                        "export": (theirs - reference).abs().max().item(),
                        "differing": harness.differing_tensors(hf_dir, out)}
    return report


@pytest.fixture(scope="module")
def rm_models(tmp_path_factory) -> tuple[str, dict[str, dict]]:
    root = str(tmp_path_factory.mktemp("rm"))
    (report,) = harness.run(_prepare, 1, root)
    return root, report


def test_hf_reward_models_convert_score_and_export_exactly(rm_models):
    _, report = rm_models
    for name, r in report.items():
        arch = MODELS[name][0]
        assert r["architecture"] == arch and r["exported_class"] == arch, (name, r)
        assert r["ours"] <= harness.LOGITS_ATOL, (name, r)
        assert r["export"] == 0.0 and r["differing"] == [], (name, r)


def _scores_at_layouts(root: str) -> list[dict]:
    """In a worker of 4 ranks: every model's scores at TP=2 (SP), PP=2 and TP=2 x PP=2 against
    transformers'."""
    import torch

    from megatron_patch import parallel
    from megatron_patch.rlhf.reward import load_reward_model, score

    report = []
    for tp, pp, sp in ((2, 1, True), (1, 2, False), (2, 2, False)):
        parallel.initialize(tp, pp)
        for name, (_, _, pad) in MODELS.items():
            ref = torch.load(os.path.join(root, name, "ref.pt"))
            model, pad_id = load_reward_model(os.path.join(root, name, "mcore"),
                                              sequence_parallel=sp)
            assert pad_id == pad
            # Two micro batches of two: the pipeline schedule runs more than one.
            ours = score([model], ref["tokens"], pad_id, micro_batch_size=2)
            report.append({"layout": (tp, pp, sp), "model": name,
                           "max_abs": (ours - ref["scores"]).abs().max().item()})
    return report


def test_imported_reward_models_score_as_transformers_at_tp2_and_pp2(rm_models):
    root, _ = rm_models
    for rank_report in harness.run(_scores_at_layouts, 4, root):
        # Every rank (also the first pipeline stage) gets the scores.
        assert len(rank_report) == 9
        for r in rank_report:
            assert r["max_abs"] <= harness.LOGITS_ATOL, r


def test_score_positions_follow_transformers_pooling():
    import torch

    from megatron_patch.rlhf.reward import score_positions

    tokens = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 6, 7, 0], [0, 0, 0, 0, 0]])
    # pad == EOS (2): the rightmost token that is not 2.
    assert score_positions(tokens, 2).tolist() == [1, 4, 4]
    assert score_positions(tokens, 0).tolist() == [4, 3, 0]
    # Lengths cap the search; without a pad id they alone decide.
    assert score_positions(tokens, 2, torch.tensor([3, 2, 5])).tolist() == [1, 0, 4]
    assert score_positions(tokens, None, torch.tensor([3, 2, 5])).tolist() == [2, 1, 4]
    with pytest.raises(ValueError, match="pad token id"):
        score_positions(tokens, None)


def test_bradley_terry_loss_and_metrics_by_hand():
    import math

    import torch

    from megatron_patch.rlhf.reward import bradley_terry

    chosen, rejected = torch.tensor([1.0, 0.5, -2.0]), torch.tensor([0.0, 0.5, 1.0])
    margin = torch.tensor([0.5, 0.0, 0.0])
    loss_sum, pairs, metrics = bradley_terry(chosen, rejected, margin)
    # -log sigmoid(x) = log(1 + exp(-x)) for x = 0.5, 0, -3.
    expected = math.log1p(math.exp(-0.5)) + math.log(2) + math.log1p(math.exp(3))
    assert abs(loss_sum.item() - expected) < 1e-6 and pairs.item() == 3
    assert metrics["rm loss"].tolist() == pytest.approx([expected, 3])
    assert metrics["accuracy"].tolist() == [1.0, 3.0]  # the tie counts as wrong
    assert metrics["margin"].tolist() == pytest.approx([1.0 + 0.0 - 3.0, 3])


def _trl_reward_loss(chosen, rejected, margin, center: float | None) -> tuple[float, dict]:
    """TRL's RewardTrainer.compute_loss on given scores: a stand-in model returns them as its
    logits (chosen rows first, as TRL's collator stacks them)."""
    import collections
    import types

    import torch
    from trl import RewardTrainer

    outputs = types.SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])
    accelerator = types.SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=accelerator,
        args=types.SimpleNamespace(center_rewards_coefficient=center),
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"attention_mask": torch.ones(2 * chosen.numel(), 4), "margin": margin}
    loss = RewardTrainer.compute_loss(trainer, lambda **kwargs: outputs, inputs)
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("center", [None, 0.01, 0.5])
def test_bradley_terry_loss_and_metrics_equal_trl(center):
    import torch

    from megatron_patch.rlhf.reward import bradley_terry

    gen = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=gen) + 1.0, torch.randn(6, generator=gen)
    margin = torch.rand(6, generator=gen)
    loss_sum, pairs, metrics = bradley_terry(chosen, rejected, margin, center or 0.0)
    theirs, their_metrics = _trl_reward_loss(chosen, rejected, margin, center)
    # Both are fp32 sums of six terms.
    assert abs(loss_sum.item() / pairs.item() - theirs) <= 1e-6, (loss_sum, theirs)
    assert abs(metrics["rm loss"][0].item() / pairs.item() - theirs) <= 1e-6
    for name in ("accuracy", "margin"):
        ours = (metrics[name][0] / metrics[name][1]).item()
        assert abs(ours - their_metrics[name]) <= 1e-6, (name, ours, their_metrics)


def test_every_family_maps_its_score_head_or_is_refused_with_the_reason():
    """For each zoo family with a native transformers class: the reward family's rules produce
    exactly the tensors transformers' *ForSequenceClassification holds (LM head dropped, score
    added). Families whose remote code transformers does not know are refused, saying so."""
    import torch
    import zoo

    from megatron_patch.convert.hf_megatron import hf_expected_shapes
    from megatron_patch.models import family_for
    from megatron_patch.models.score_head import _registered, reward_hf_config
    from megatron_patch.models.weight_rules import bind

    checked = set()
    for case in zoo.all_cases():
        with torch.device("meta"):
            oracle = case.build()
        config = getattr(oracle, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            continue  # a reference forward of a remote-code family (refusal checked below)
        hf_config = reward_hf_config(json.loads(config.to_json_string()), PAD)
        family = family_for(hf_config)
        args = family.model_args(hf_config)
        assert args.score_head and not args.share_embeddings_and_output_weights
        bound = {n for b in bind(family.weights, hf_config, args.num_layers,
                                 args.num_moe_experts) for n in b.hf}
        expected = set(hf_expected_shapes(hf_config))
        kept = set(family.kept_names(hf_config, expected))
        assert bound == expected - kept, (case.name, sorted(bound ^ (expected - kept)))
        assert "score.weight" in bound and not any("lm_head" in n for n in bound), case.name
        checked.add(hf_config["architectures"][0])
    # Every registered family transformers has a sequence classifier for (Mistral shares
    # Llama's rules and has no zoo case).
    assert checked == _registered() - {"MistralForSequenceClassification"}, checked
    for remote in ({"architectures": ["QWenLMHeadModel"], "model_type": "qwen"},
                   {"architectures": ["ChatGLMModel"], "model_type": "chatglm"},
                   {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan"}):
        with pytest.raises(ValueError, match="no \\*ForSequenceClassification class"):
            reward_hf_config(remote, PAD)


def test_hf_classifier_with_several_labels_is_refused(tmp_path):
    from megatron_patch.models import family_for

    config = {"architectures": ["LlamaForSequenceClassification"], "model_type": "llama",
              "id2label": {"0": "a", "1": "b"}}
    with pytest.raises(ValueError, match="2 labels .* one \\(num_labels == 1\\)"):
        family_for(config)
    config = {"architectures": ["Qwen2ForSequenceClassification"], "model_type": "llama"}
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        family_for(config)


def _load_reward_error(ckpt: str) -> str:
    from megatron_patch import parallel
    from megatron_patch.rlhf.reward import load_reward_model

    parallel.initialize(1, 1)
    try:
        load_reward_model(ckpt)
    except ValueError as e:
        return str(e)
    return "no error"


def test_checkpoint_of_the_wrong_kind_is_refused_naming_flag_and_directory(rm_models,
                                                                            llama_models,
                                                                            tmp_path):
    root, _ = rm_models
    rm = os.path.join(root, "llama", "mcore")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    rc, err = harness.run(harness.cli_error, 1, [
        "generate", "--load", rm, "--input-file", str(prompts),
        "--output-file", str(tmp_path / "out.jsonl")])[0]
    (line,) = [x for x in err.splitlines() if ": error:" in x]
    assert rc != 0 and "Traceback" not in err
    assert f"--load {rm}: a reward model (LlamaForSequenceClassification)" in line, line
    assert not (tmp_path / "out.jsonl").exists()
    lm = os.path.join(llama_models["llama2"], "mcore")
    (message,) = harness.run(_load_reward_error, 1, lm)
    assert message.startswith(f"--reward-model {lm}: a language model (LlamaForCausalLM), "
                              "not a reward model"), message


def _verify(root: str, hf: str, ckpt: str) -> tuple[int, dict]:
    """In a worker: `megatron-patch verify` at PP=2 of the reward model `ckpt` against the HF
    model `hf` (run_worker leaves the process group: one call per launch)."""
    import contextlib
    import io

    from megatron_patch import verify
    from megatron_patch.errors import ArgumentParser

    parser = ArgumentParser()
    verify.add_arguments(parser)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = verify.run_worker(parser.parse_args(
            [os.path.join(root, hf, "hf"), os.path.join(root, ckpt, "mcore"), "--pp", "2"]))
    lines = out.getvalue().splitlines()
    return code, json.loads(lines[-1]) if lines else {}


def test_verify_compares_reward_model_scores_with_transformers(rm_models):
    root, _ = rm_models
    same = harness.run(_verify, 2, root, "qwen2", "qwen2", timeout=120)[0]
    assert same[0] == 0 and same[1]["ok"] and same[1]["max_abs_diff"] <= 1e-4, same
    other = harness.run(_verify, 2, root, "llama", "llama_pad_eos", timeout=120)[0]
    assert other[0] == 1 and not other[1]["ok"], other
