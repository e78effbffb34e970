"""The pieces Megatron-Core lacks (models/alibi.py, parallel_layer.py, embedding.py, the
qkv_concat transform), each on its own, then in training and generation through the families
that use them (tests/zoo/gpt2_lineage.py, tests/zoo/baichuan_alibi.py).
"""

from __future__ import annotations

import os
import shutil

import harness
import pytest
from test_generation import _hf_greedy, _megatron_greedy
from test_training import _args, _make_dataset
from test_zoo import _prepare

# ALiBi slopes from the paper's definition, for head counts whose values are easy to state.
SLOPES_8 = [2.0 ** -k for k in range(1, 9)]
# 6 heads: the 4 slopes of 4 heads (2^-2, 2^-4, ...), then the odd-indexed slopes of 8 heads.
SLOPES_6 = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]


def test_alibi_slopes_follow_the_formula():
    import math

    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    from megatron_patch.models.alibi import alibi_slopes

    assert alibi_slopes(8).tolist() == SLOPES_8
    assert alibi_slopes(6).tolist() == SLOPES_6
    for n in (1, 2, 3, 5, 7, 12, 40, 71, 112):  # 112: BLOOM-176B, 40: Baichuan-13B
        ours, bloom = alibi_slopes(n), _get_alibi_slopes(n, "cpu")
        assert ours.shape == (n,) and math.isclose(ours.sum().item(), bloom.sum().item(),
                                                   rel_tol=1e-6)
        assert (ours - bloom).abs().max().item() <= 1e-7 * bloom.max().item(), n


def test_qkv_concat_is_fuse_qkv_of_the_split_parts():
    import torch

    from megatron_patch.models.weight_rules import QKV, QKV_CONCAT, Dims

    for heads, groups in ((4, 4), (4, 2)):
        dims = Dims(num_layers=1, num_attention_heads=heads, num_query_groups=groups,
                    kv_channels=3, vocab_size=10, padded_vocab_size=10)
        q, k, v = torch.randn(heads * 3, 5), torch.randn(groups * 3, 5), torch.randn(groups * 3, 5)
        packed = torch.cat([q, k, v])
        fused = QKV_CONCAT.to_megatron([packed], dims)
        assert torch.equal(fused, QKV.to_megatron([q, k, v], dims))
        (back,) = QKV_CONCAT.to_hf(fused, dims)
        assert torch.equal(back, packed)
    with pytest.raises(ValueError, match="rows"):
        QKV_CONCAT.to_megatron([torch.zeros(7, 5)], dims)


@pytest.mark.parametrize("config, message", [
    ({"architectures": ["FalconForCausalLM"], "alibi": True}, "alibi"),
    ({"architectures": ["FalconForCausalLM"], "new_decoder_architecture": True,
      "parallel_attn": False}, "parallel_attn"),
    ({"architectures": ["FalconForCausalLM"], "activation": "swish"}, "activation"),
    ({"architectures": ["OPTForCausalLM"], "do_layer_norm_before": False},
     "do_layer_norm_before"),
    ({"architectures": ["OPTForCausalLM"], "word_embed_proj_dim": 32}, "word_embed_proj_dim"),
    ({"architectures": ["BloomForCausalLM"], "apply_residual_connection_post_layernorm": True},
     "apply_residual_connection_post_layernorm"),
    ({"architectures": ["GPTBigCodeForCausalLM"], "scale_attn_weights": False},
     "scale_attn_weights"),
])
def test_unsupported_configs_are_refused_naming_the_key(config, message):
    from megatron_patch.models import family_for

    base = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
            "vocab_size": 1000, "intermediate_size": 96, "ffn_dim": 96, "hidden_act": "silu",
            "max_position_embeddings": 64, "n_layer": 2, "n_head": 4, "n_embd": 64,
            "n_positions": 64}
    cfg = {**base, **config}
    with pytest.raises(ValueError, match=message):
        family_for(cfg).model_args(cfg)


def test_position_encoding_flags():
    from test_training import _args

    def kind(*flags):
        return _args("ckpt", "data", extra=flags).position_embedding_type

    assert kind("--use-alibi-mask") == "alibi"
    assert kind("--position-embedding-type", "learned_absolute") == "learned_absolute"
    assert kind("--use-rotary-position-embeddings") == "rope"
    assert kind() is None  # not given: the checkpoint decides
    with pytest.raises(ValueError, match="conflicting"):
        kind("--use-alibi-mask", "--position-embedding-type", "rope")


# Abridged config.json files of released checkpoints (as published), and what they must become.
RELEASED = {
    "bloom-176b": ({"architectures": ["BloomForCausalLM"], "n_embed": 14336,
                    "num_attention_heads": 112, "n_layer": 70, "vocab_size": 250880,
                    "layer_norm_epsilon": 1e-5, "slow_but_exact": False,
                    "apply_residual_connection_post_layernorm": False},
                   dict(num_attention_heads=112, num_query_groups=112, kv_channels=128,
                        ffn_hidden_size=4 * 14336, position_embedding_type="alibi",
                        embedding_norm=True)),
    "falcon-7b": ({"architectures": ["FalconForCausalLM"], "hidden_size": 4544,
                   "num_attention_heads": 71, "num_hidden_layers": 32, "multi_query": True,
                   "new_decoder_architecture": False, "parallel_attn": True, "alibi": False,
                   "bias": False, "vocab_size": 65024},
                  dict(num_query_groups=1, kv_channels=64, parallel_attention=True,
                       parallel_attention_norms=1, add_bias_linear=False, activation="gelu")),
    "falcon-40b": ({"architectures": ["FalconForCausalLM"], "hidden_size": 8192,
                    "num_attention_heads": 128, "num_hidden_layers": 60, "num_kv_heads": 8,
                    "multi_query": True, "new_decoder_architecture": True,
                    "parallel_attn": True, "alibi": False, "bias": False, "vocab_size": 65024},
                   dict(num_query_groups=8, kv_channels=64, parallel_attention=True,
                        parallel_attention_norms=2)),
    "starcoder": ({"architectures": ["GPTBigCodeForCausalLM"], "n_embd": 6144, "n_head": 48,
                   "n_layer": 40, "n_inner": 24576, "n_positions": 8192, "multi_query": True,
                   "activation_function": "gelu_pytorch_tanh", "vocab_size": 49152,
                   "scale_attn_weights": True},
                  dict(num_query_groups=1, ffn_hidden_size=24576, max_sequence_length=8192,
                       position_embedding_type="learned_absolute", activation="gelu_tanh")),
    "galactica-1.3b": ({"architectures": ["OPTForCausalLM"], "hidden_size": 2048,
                        "num_attention_heads": 32, "num_hidden_layers": 24, "ffn_dim": 8192,
                        "max_position_embeddings": 2048, "activation_function": "gelu",
                        "do_layer_norm_before": True, "word_embed_proj_dim": 2048,
                        "vocab_size": 50000, "tie_word_embeddings": True},
                       dict(position_offset=2, activation="gelu", add_bias_linear=True,
                            share_embeddings_and_output_weights=True)),
    "baichuan-13b": ({"architectures": ["BaichuanForCausalLM"], "hidden_size": 5120,
                      "num_attention_heads": 40, "num_hidden_layers": 40,
                      "intermediate_size": 13696, "vocab_size": 64000, "hidden_act": "silu",
                      "model_max_length": 4096, "rms_norm_eps": 1e-6},
                     dict(position_embedding_type="alibi", kv_channels=128, norm_head=False,
                          share_embeddings_and_output_weights=False)),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configs(name):
    from megatron_patch.models import family_for

    config, expected = RELEASED[name]
    args = family_for(config).model_args(config)
    assert {k: getattr(args, k) for k in expected} == expected


def test_multi_query_kv_head_is_replicated_so_tp_can_split_it():
    from megatron_patch.models import check_layout, family_for

    cfg = {"architectures": ["GPTBigCodeForCausalLM"], "n_layer": 2, "n_embd": 64, "n_head": 4,
           "vocab_size": 1000, "n_positions": 64, "multi_query": True}
    args = family_for(cfg).model_args(cfg)
    assert (args.num_query_groups, args.kv_replicas, args.megatron_query_groups) == (1, 4, 4)
    check_layout(args, 1024, 2, 1)
    check_layout(args, 1024, 4, 1)
    with pytest.raises(ValueError, match="4 identical copies"):
        check_layout(args, 1024, 8, 1)
    # Released configs: StarCoder's 48 heads get 8 groups; Falcon-7B's 71 heads have no
    # factor from 2 to 8, so its one KV head cannot be split: refused, saying why.
    starcoder = RELEASED["starcoder"][0]
    assert family_for(starcoder).model_args(starcoder).megatron_query_groups == 8
    falcon7b = RELEASED["falcon-7b"][0]
    args = family_for(falcon7b).model_args(falcon7b)
    assert args.kv_replicas == 1
    with pytest.raises(ValueError, match="multi-query attention.*TP=1 only"):
        check_layout(args, 65024, 2, 1)
    # Grouped-query models keep their groups.
    falcon40b = RELEASED["falcon-40b"][0]
    assert family_for(falcon40b).model_args(falcon40b).kv_replicas == 1


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


def _pieces_at_tp2() -> dict:
    """In a TP=2 worker: each piece against a computation written out here."""
    import math

    import torch
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module

    from megatron_patch import parallel
    from megatron_patch.models import ModelArgs, transformer_config
    from megatron_patch.models.alibi import AlibiDotProductAttention
    from megatron_patch.models.embedding import Embedding
    from megatron_patch.models.layers import layer_spec

    parallel.initialize(2, 1)
    rank = parallel_state.get_tensor_model_parallel_rank()
    out = {}
    args = ModelArgs(num_layers=1, hidden_size=48, ffn_hidden_size=64, num_attention_heads=6,
                     num_query_groups=6, kv_channels=8, vocab_size=128, max_sequence_length=16,
                     layernorm_epsilon=1e-5, normalization="LayerNorm", activation="gelu",
                     gated_linear_unit=False, add_bias_linear=True)
    config = transformer_config(args)

    # ALiBi: this rank's 3 heads use the slopes of heads 3*rank .. 3*rank+2.
    attn = AlibiDotProductAttention(config, 1, AttnMaskType.causal, "self")
    out["slopes"] = attn.scale_mask_softmax.slopes.tolist()
    s, b, d = 5, 2, 8
    torch.manual_seed(rank)
    q, k, v = (torch.randn(s, b, 3, d) for _ in range(3))
    got = attn(q, k, v, None).view(s, b, 3, d)
    slopes = torch.tensor(SLOPES_6[3 * rank:3 * rank + 3])
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(d)
    scores = scores + slopes[:, None, None] * torch.arange(s)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)
    out["alibi_err"] = (got - want).abs().max().item()

    # Parallel attention + MLP: y = x + attn(norm(x)) + mlp(norm'(x)), one or two norms.
    x = torch.randn(s, b, args.hidden_size)
    torch.distributed.broadcast(x, src=0)
    for norms in (1, 2):
        a = ModelArgs(**{**args.__dict__, "parallel_attention": True,
                         "parallel_attention_norms": norms})
        layer = build_module(layer_spec(False, args=a), config=config, layer_number=1).eval()
        with torch.no_grad():
            for p in layer.parameters():
                p.uniform_(-0.3, 0.3)
            y, _ = layer(x, attention_mask=None)
            h = layer.input_layernorm(x)
            attn_out, attn_bias = layer.self_attention(h, attention_mask=None)
            m = h if norms == 1 else layer.pre_mlp_layernorm(x)
            mlp_out, mlp_bias = layer.mlp(m)
            want = x + ((attn_out + mlp_out) + (attn_bias + mlp_bias))
        names = {n for n, _ in layer.named_parameters()}
        out[f"parallel{norms}_err"] = (y - want).abs().max().item()
        out[f"parallel{norms}_has_mlp_norm"] = any(n.startswith("pre_mlp_layernorm")
                                                   for n in names)

    # Embedding: position p reads row p + offset of a table with `offset` extra rows; the norm
    # follows the embeddings.
    emb = Embedding(config, 128, 16, "learned_absolute", position_offset=2, norm=True).eval()
    tokens = torch.tensor([[3, 70, 5, 127]])
    positions = torch.tensor([[0, 1, 2, 3]])
    with torch.no_grad():
        emb.norm.weight.uniform_(0.5, 1.5)
        got = emb(tokens, positions)  # [s, b, h]
        table = torch.cat([torch.zeros_like(emb.word_embeddings.weight)] * 2)
        lo = rank * emb.word_embeddings.weight.shape[0]
        table[lo:lo + emb.word_embeddings.weight.shape[0]] = emb.word_embeddings.weight
        torch.distributed.all_reduce(table)
        raw = table[tokens] + emb.position_embeddings.weight[positions + 2]
        want = emb.norm(raw.transpose(0, 1))
    # Dropout follows the norm: dropped entries stay exactly zero (a norm after the dropout
    # would move them).
    dropping = ModelArgs(**{**args.__dict__, "hidden_dropout": 0.5})
    emb2 = Embedding(transformer_config(dropping), 128, 16, "learned_absolute", norm=True)
    out["embedding_zeros"] = (emb2.train()(tokens, positions) == 0).float().mean().item()
    out["embedding_rows"] = emb.position_embeddings.weight.shape[0]
    out["embedding_err"] = (got - want).abs().max().item()
    return out


def test_pieces_equal_hand_computations_at_tp2():
    results = harness.run(_pieces_at_tp2, 2)
    for rank, r in enumerate(results):
        assert r["slopes"] == SLOPES_6[3 * rank:3 * rank + 3], r
        # fp32; the reference sums in another order.
        assert r["alibi_err"] <= 1e-6, r
        # The same modules on the same input: a wiring error would be of the order of the
        # outputs (~0.1); 1e-6 leaves room for fp32 summation order only.
        assert r["parallel1_err"] <= 1e-6 and r["parallel2_err"] <= 1e-6, r
        assert not r["parallel1_has_mlp_norm"] and r["parallel2_has_mlp_norm"], r
        assert r["embedding_rows"] == 16 + 2 and r["embedding_err"] <= 1e-6, r
        assert 0.3 < r["embedding_zeros"] < 0.7, r


# Families exercising the pieces: ALiBi + embedding norm (bloom), ALiBi + q;k;v concat
# (baichuan), parallel layers with two and one norms (falcon), learned positions with offset.
TRAINED = ["bloom", "baichuan13b_alibi", "falcon40b_style", "falcon_new_one_norm", "galactica"]
GENERATED = ["bloom", "falcon40b_style", "galactica", "gpt_bigcode_mha", "starcoder"]


@pytest.fixture(scope="module")
def piece_models(tmp_path_factory) -> dict[str, str]:
    root = str(tmp_path_factory.mktemp("pieces"))
    harness.run(_prepare, 1, root, sorted(set(TRAINED) | set(GENERATED)))
    return {name: os.path.join(root, name) for name in set(TRAINED) | set(GENERATED)}


def _train_each(ckpts: dict[str, str], data: str) -> dict[str, list[float]]:
    from megatron_patch.training.loop import Trainer

    curves = {}
    for name, ckpt in ckpts.items():
        # The position-encoding flags users know must agree with the checkpoint.
        flags = ("--use-alibi-mask",) if name in ("bloom", "baichuan13b_alibi") else ()
        trainer = Trainer(_args(ckpt, data, iters=20, tp=2, sp=True, lr=5e-3, extra=flags))
        curves[name] = [s["loss"] for s in trainer.train()]
    try:
        Trainer(_args(ckpts["bloom"], data, extra=("--position-embedding-type", "rope")))
    except ValueError as e:
        curves["refused"] = str(e)
    return curves


def test_pretraining_loss_goes_down_at_tp2(piece_models, tmp_path):
    data = str(tmp_path / "tokens")
    harness.run(_make_dataset, 1, data)
    ckpts = {n: os.path.join(piece_models[n], "mcore") for n in TRAINED}
    curves = harness.run(_train_each, 2, ckpts, data)[0]
    assert "disagrees with the checkpoint" in curves.pop("refused", "")
    for name, losses in curves.items():
        # The data is a few repeated motifs: 20 steps at lr 5e-3 learn most of it.
        assert sum(losses[-5:]) / 5 < losses[0] - 1.0, (name, losses)


def _curves(ckpts: dict[str, str], data: str, **layout) -> dict[str, list[float]]:
    from megatron_patch.training.loop import Trainer

    return {name: [s["loss"] for s in Trainer(_args(ckpt, data, **layout)).train()]
            for name, ckpt in ckpts.items()}


def test_loss_curves_agree_across_layouts(piece_models, tmp_path):
    """The new parameters (embedding norm, per-branch norms, offset position table, tied
    embeddings across pipeline stages, a multi-query KV head replicated 4 times, whose copies
    sit on both TP ranks at TP=2) get the same gradients at every layout: a norm weight whose
    sequence-parallel gradient were not summed over TP would drift at once."""
    data = str(tmp_path / "tokens")
    harness.run(_make_dataset, 1, data)
    ckpts = {n: os.path.join(piece_models[n], "mcore")
             for n in ("bloom", "falcon40b_style", "galactica", "starcoder")}
    reference = harness.run(_curves, 1, ckpts, data)[0]
    layouts = {"tp2_sp": harness.run(_curves, 2, ckpts, data, tp=2, sp=True)[0],
               "pp2": harness.run(_curves, 2, ckpts, data, pp=2)[-1]}
    for layout, curves in layouts.items():
        for name, curve in curves.items():
            # fp32, 10 Adam steps: summation order alone stays below 1e-5 (as for Llama).
            diff = max(abs(a - b) for a, b in zip(curve, reference[name], strict=True))
            assert len(curve) == 10 and diff <= 1e-5, (layout, name, diff)


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
            Trainer(_args(ckpt, data, iters=5, tp=2, sp=True, do=True, lr=5e-3,
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


def test_replicated_kv_copies_stay_identical_in_training(piece_models, tmp_path):
    data = str(tmp_path / "tokens")
    harness.run(_make_dataset, 1, data)
    ckpt = os.path.join(piece_models["starcoder"], "mcore")
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
        trainer = Trainer(_args(ckpt, data, extra=("--clip-grad", "0")))
        return [s["loss"] for s in trainer.train()]


def test_replicated_kv_trains_as_the_original_model(piece_models, tmp_path):
    """Each copy's update is the original KV head's (the sum of the copies' gradients): the
    replicated model (4 copies) follows the unreplicated one's loss curve. Without the sum the
    curves part by ~5e-3 within 10 steps. (Adam would hide a mean instead of the sum: the
    scale of a gradient hardly changes its update.)"""
    data = str(tmp_path / "tokens")
    harness.run(_make_dataset, 1, data)
    root = str(tmp_path / "starcoder")
    shutil.copytree(piece_models["starcoder"], root)
    (replicated,) = harness.run(_curve_with_replicas, 1, root, data, True)
    (original,) = harness.run(_curve_with_replicas, 1, root, data, False)
    diff = max(abs(a - b) for a, b in zip(replicated, original, strict=True))
    # fp32, 10 Adam steps: summation order only (measured 5e-7).
    assert len(original) == 10 and diff <= 1e-5, (diff, replicated, original)


# A random tiny model's EOS may come at any step: decode a fixed number of tokens instead.
MAX_NEW = 12


@pytest.mark.parametrize("name", GENERATED)
def test_greedy_generation_with_kv_cache_matches_transformers(piece_models, name):
    """Left-padded prompts with a KV cache: ALiBi (keys at cached positions), parallel layers,
    learned positions counted from each row's first real token."""
    root = piece_models[name]
    (expected,) = harness.run(_hf_greedy, 1, root, MAX_NEW, None)
    (tp1,) = harness.run(_megatron_greedy, 1, root, 1, MAX_NEW, None)
    tp2 = harness.run(_megatron_greedy, 2, root, 2, MAX_NEW, None)
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
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "10",
        "--lr", "3e-3", "--eval-interval", "1000", "--save", save, "--seed", "5"])
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
def test_models_from_scratch_select_the_architecture(piece_models, tmp_path, flags, arch):
    data = str(tmp_path / "tokens")
    harness.run(_make_dataset, 1, data)
    tokenizer = os.path.join(piece_models["bloom"], "hf")
    (r,) = harness.run(_scratch_train_export_compare, 1, tokenizer, data, str(tmp_path), flags)
    assert r["arch"] == arch and r["losses"][-1] < r["losses"][0], r
    # fp32, same weights: summation order only (as the zoo's 1e-4).
    assert r["max_abs"] <= 1e-4, r
