"""Multi-query models whose one KV head is replicated so that TP can split it
(models/spec.py kv_replicas, training/kv_replicas.py): the layout is grouped-query attention
with repeated KV heads, the copies get the summed gradient and stay identical in training, and
the replicated model trains as the original one."""

from __future__ import annotations

import os
import shutil

import harness
import pytest
from harness import training_args


def test_distributed_optimizer_with_data_parallel_is_refused_for_replicated_kv():
    """It shards the reduced gradients over DP ranks, so no rank could sum a head's copies."""
    from megatron_patch.models import family_for
    from megatron_patch.training.kv_replicas import finalize_model_grads_func

    cfg = {"architectures": ["GPTBigCodeForCausalLM"], "n_layer": 2, "n_embd": 64, "n_head": 4,
           "vocab_size": 1000, "n_positions": 64, "multi_query": True}
    args = family_for(cfg).model_args(cfg)
    assert finalize_model_grads_func(print, args, True, 1) is not print
    with pytest.raises(ValueError, match="--use-distributed-optimizer with data parallel"):
        finalize_model_grads_func(print, args, True, 2)
    mha = family_for({**cfg, "multi_query": False}).model_args({**cfg, "multi_query": False})
    assert finalize_model_grads_func(print, mha, True, 2) is print


@pytest.mark.parametrize("kind", ["QKV", "QKV_CONCAT", "QKV_GROUPED"])
def test_replicated_kv_layout_is_grouped_query_attention_with_repeated_kv(kind):
    """Replicating one KV head R times is the grouped-query layout whose R KV heads all equal
    it (each query head reads KV head i // (heads / R), as transformers' repeat_kv); export
    takes one copy back only while all copies are bit-identical."""
    import torch

    from megatron_patch.convert import engine
    from megatron_patch.models import weight_rules
    from megatron_patch.models.weight_rules import QKV, Binding, Dims

    heads, d, hidden, r = 8, 3, 5, 4
    mqa = Dims(num_layers=1, num_attention_heads=heads, num_query_groups=1, kv_channels=d,
               vocab_size=10, padded_vocab_size=10, kv_replicas=r)
    gqa = Dims(num_layers=1, num_attention_heads=heads, num_query_groups=r, kv_channels=d,
               vocab_size=10, padded_vocab_size=10)
    q, k, v = torch.randn(heads * d, hidden), torch.randn(d, hidden), torch.randn(d, hidden)
    hf = {"QKV": [q, k, v], "QKV_CONCAT": [torch.cat([q, k, v])],
          # One group: Megatron's per-group layout is all query heads, then k, then v.
          "QKV_GROUPED": [torch.cat([q, k, v])]}[kind]
    fused = getattr(weight_rules, kind).to_megatron(hf, mqa)
    want = QKV.to_megatron([q, k.repeat(r, 1), v.repeat(r, 1)], gqa)
    assert torch.equal(fused, want)
    back = getattr(weight_rules, kind).to_hf(fused, mqa)
    assert len(back) == len(hf) and all(torch.equal(a, b) for a, b in zip(back, hf, strict=True))

    # One copy of v that drifted by one ulp: refused, naming the tensor.
    tampered = fused.clone()
    last_v = fused.shape[0] - 1
    tampered[last_v, 0] = torch.nextafter(tampered[last_v, 0], torch.tensor(1e9))
    binding = Binding("decoder.layers.0.self_attention.linear_qkv.weight", ("x",) * len(hf),
                      getattr(weight_rules, kind))
    with pytest.raises(engine.ConversionError, match="linear_qkv.weight.*copies .* differ"):
        list(engine.megatron_to_hf([binding], mqa, lambda name: tampered))


def _train_replicated(ckpt: str, data: str, root: str) -> None:
    """TP=2 + SP training of a replicated multi-query model; and the same without the sum over
    KV copies (the control: its copies drift apart)."""
    from unittest import mock

    from megatron_patch.training import kv_replicas
    from megatron_patch.training.loop import Trainer

    for name, sum_grads in (("summed", kv_replicas.sum_copy_grads),
                            ("unsummed", lambda model, args: None)):
        with mock.patch.object(kv_replicas, "sum_copy_grads", sum_grads):
            # The distributed optimizer (DP=1 here) reads the summed gradient buffers too.
            Trainer(training_args(ckpt, data, iters=5, tp=2, sp=True, do=True, lr=5e-3,
                          save=os.path.join(root, name))).train()


def _export_each(root: str) -> dict[str, str]:
    from megatron_patch.convert.hf_megatron import megatron_to_hf

    out = {}
    for name in ("summed", "unsummed"):
        try:
            megatron_to_hf(os.path.join(root, name), os.path.join(root, name + "_hf"))
            out[name] = "exported"
        except ValueError as e:
            out[name] = str(e)
    return out


def test_replicated_kv_copies_stay_identical_in_training(zoo_models, tmp_path):
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    ckpt = os.path.join(zoo_models["starcoder"], "mcore")
    harness.run(_train_replicated, 2, ckpt, data, str(tmp_path))
    (r,) = harness.run(_export_each, 1, str(tmp_path))
    # Export checks every copy bit for bit (models/weight_rules.py merge_kv).
    assert r["summed"] == "exported", r
    assert "copies of each KV head differ" in r["unsummed"], r


def _curve_with_replicas(root: str, data: str, replicate: bool) -> list[float]:
    from unittest import mock

    from megatron_patch.convert.hf_megatron import hf_to_megatron
    from megatron_patch.models import spec
    from megatron_patch.training.loop import Trainer

    rule = spec.kv_replicas if replicate else (lambda heads, groups: 1)
    ckpt = os.path.join(root, "mcore" if replicate else "mcore_unreplicated")
    with mock.patch.object(spec, "kv_replicas", rule):
        if not replicate:
            hf_to_megatron(os.path.join(root, "hf"), ckpt)
        # Without clipping: the gradient norm counts each KV copy (see README).
        trainer = Trainer(training_args(ckpt, data, extra=("--clip-grad", "0")))
        return [s["loss"] for s in trainer.train()]


def test_replicated_kv_trains_as_the_original_model(zoo_models, tmp_path):
    """Each copy's update is the original KV head's (the sum of the copies' gradients): the
    replicated model (4 copies) follows the unreplicated one's loss curve. Without the sum the
    curves part by ~5e-3 within 10 steps. (Adam would hide a mean instead of the sum: the
    scale of a gradient hardly changes its update.)"""
    data = str(tmp_path / "tokens")
    harness.run(harness.make_token_dataset, 1, data)
    root = str(tmp_path / "starcoder")
    shutil.copytree(zoo_models["starcoder"], root)
    (replicated,) = harness.run(_curve_with_replicas, 1, root, data, True)
    (original,) = harness.run(_curve_with_replicas, 1, root, data, False)
    diff = max(abs(a - b) for a, b in zip(replicated, original, strict=True))
    # fp32, 10 Adam steps: summation order only (measured 5e-7).
    assert len(original) == 10 and diff <= harness.LOSS_ATOL, (diff, replicated, original)
