"""The pieces Megatron-Core lacks (models/alibi.py, parallel_layer.py, embedding.py, the
qkv_concat transform), each on its own against a computation written out here."""

from __future__ import annotations

import harness
import pytest

# fp32: the hand computations sum in another order than the modules.
HAND_ATOL = 1e-6


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
    out.update(_gemma_pieces(config, rank))
    return out


def _gemma_pieces(config, rank: int) -> dict:
    """Gemma's soft-capping (models/gemma.py) on this TP rank's 3 heads / vocabulary columns:
    cap * tanh(x / cap) of the attention scores (before the causal mask) and of the logits."""
    import math

    import torch
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.models.gemma import SoftcapDotProductAttention, SoftcapOutputLinear
    from megatron_patch.models.inference_linear import InferenceColumnParallelLinear

    cap, out = 0.5, {}  # a cap below the scores' spread, so capping changes the result
    attn = SoftcapDotProductAttention(config, 1, AttnMaskType.causal, "self", softcap=cap)
    s, b, d = 5, 2, 8
    torch.manual_seed(10 + rank)
    q, k, v = (torch.randn(s, b, 3, d) for _ in range(3))
    got = attn(q, k, v, None).view(s, b, 3, d)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    for name, hand in (("capped", cap * torch.tanh(scores / cap)), ("uncapped", scores)):
        want = torch.einsum("bhqk,kbhd->qbhd", hand.masked_fill(causal, float("-inf")).softmax(-1),
                            v)
        out[f"softcap_attn_{name}_err"] = (got - want).abs().max().item()

    head = InferenceColumnParallelLinear(48, 20, config=config, init_method=torch.nn.init.normal_,
                                         bias=False, gather_output=False)
    SoftcapOutputLinear.adopt(head, cap)
    x = torch.randn(s, b, 48)
    with torch.no_grad():
        logits, _ = head(x)
        want = cap * torch.tanh(x @ head.weight.t() / cap)
    out["softcap_logits_err"] = (logits - want).abs().max().item()
    out["softcap_logits_max"] = logits.abs().max().item()
    return out


def test_pieces_equal_hand_computations_at_tp2():
    results = harness.run(_pieces_at_tp2, 2)
    for rank, r in enumerate(results):
        assert r["slopes"] == SLOPES_6[3 * rank:3 * rank + 3], r
        assert r["alibi_err"] <= HAND_ATOL, r
        # The same modules on the same input: a wiring error would be of the order of the
        # outputs (~0.1); HAND_ATOL leaves room for fp32 summation order only.
        assert r["parallel1_err"] <= HAND_ATOL and r["parallel2_err"] <= HAND_ATOL, r
        assert not r["parallel1_has_mlp_norm"] and r["parallel2_has_mlp_norm"], r
        assert r["embedding_rows"] == 16 + 2 and r["embedding_err"] <= HAND_ATOL, r
        assert 0.3 < r["embedding_zeros"] < 0.7, r
        # Soft-capping: the hand computation with the cap, and not without it (the check could
        # not tell a missing cap otherwise); the capped logits stay within the cap.
        assert r["softcap_attn_capped_err"] <= HAND_ATOL < r["softcap_attn_uncapped_err"], r
        assert r["softcap_logits_err"] <= HAND_ATOL and r["softcap_logits_max"] <= 0.5, r


def test_each_activation_computes_what_transformers_computes_for_its_names():
    """models/activations.py: every HF name a config may hold (and silu, quick_gelu, which
    families fix in `constants`) maps to a function equal to transformers' own for that name.
    fp32, |delta| <= 1e-5: gelu_new / gelu_fast are other float formulas of GELU's tanh
    approximation (~2e-7 apart on [-6, 6]), while exact GELU and the approximation differ by
    ~5e-4 there, so the tolerance still tells them apart (checked below)."""
    import torch
    from transformers.activations import ACT2FN

    from megatron_patch.models.activations import ACTIVATIONS, BY_HF_NAME

    x = torch.linspace(-6, 6, 1001)
    pairs = {**BY_HF_NAME, "silu": "silu", "quick_gelu": "quick_gelu"}
    assert set(pairs.values()) == set(ACTIVATIONS), "an activation no HF name checks"
    for hf_name, name in pairs.items():
        delta = float((ACTIVATIONS[name].function(x) - ACT2FN[hf_name](x)).abs().max())
        assert delta <= 1e-5, f"{hf_name} -> {name}: |delta| {delta}"
    exact_vs_tanh = float((ACTIVATIONS["gelu"].function(x)
                           - ACTIVATIONS["gelu_tanh"].function(x)).abs().max())
    assert exact_vs_tanh > 1e-5, "the tolerance cannot tell exact GELU from its approximation"
