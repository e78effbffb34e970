"""The spec's faster drop-ins compute what the megatron modules they subclass compute.

SDPADotProductAttention vs DotProductAttention: fp32, |delta| <= 1e-6 (same math, different
summation order inside the fused kernel; outputs are O(1)). The Inference*ParallelLinear direct
path runs megatron's own matmul and bias add, so it must be bit-identical; so must
CachedRotarySelfAttention (rotary is per position, whether applied before or after caching).
"""

import harness


def _compare() -> dict:
    import torch
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patch import parallel
    from megatron_patch.models.inference_linear import (
        InferenceColumnParallelLinear,
        InferenceRowParallelLinear,
    )
    from megatron_patch.models.sdpa_attention import SDPADotProductAttention

    parallel.initialize(1, 1)
    torch.manual_seed(0)
    out = {}
    for groups in (4, 2, 1):  # MHA, GQA, MQA
        config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                                   num_query_groups=groups, kv_channels=16,
                                   attention_dropout=0.0)
        ref = DotProductAttention(config, 1, AttnMaskType.causal, "self").eval()
        new = SDPADotProductAttention(config, 1, AttnMaskType.causal, "self").eval()
        b, sq = 3, 7
        q = torch.randn(sq, b, 4, 16)
        k, v = torch.randn(sq, b, groups, 16), torch.randn(sq, b, groups, 16)
        # Left padding of 0, 2 and 6 positions; every query row keeps at least one key.
        pad = torch.arange(sq)[None, :] < torch.tensor([0, 2, 6])[:, None]
        padded = pad[:, None, None, :] | torch.ones(sq, sq, dtype=torch.bool).triu(1)
        rows = ~pad  # compare real query positions only (see sdpa_attention's docstring)
        cases = {
            "causal_no_mask": (q, k, v, None, None),
            "padding_and_causal_mask": (q, k, v, padded, rows),
            "decode_one_query_no_mask": (q[-1:], k, v, None, None),
            "decode_one_query_padding": (q[-1:], k, v, pad[:, None, None, :], None),
        }
        for name, (qq, kk, vv, mask, keep) in cases.items():
            a, c = ref(qq, kk, vv, mask), new(qq, kk, vv, mask)
            if keep is not None:  # [s, b, h] rows of real positions
                a, c = a.transpose(0, 1)[keep], c.transpose(0, 1)[keep]
            out[f"attn_g{groups}_{name}"] = float((a - c).abs().max())
    # Training with attention dropout keeps megatron's path (and its RNG stream).
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                               kv_channels=16, attention_dropout=0.5)
    new = SDPADotProductAttention(config, 1, AttnMaskType.causal, "self").train()
    called = []
    original = DotProductAttention.forward
    DotProductAttention.forward = lambda self, *a, **kw: called.append(1) or original(
        self, *a, **kw)
    try:
        new(q, torch.randn(7, 3, 4, 16), torch.randn(7, 3, 4, 16), None)
    finally:
        DotProductAttention.forward = original
    out["dropout_training_uses_megatron_path"] = called == [1]

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                               add_bias_linear=True)
    init = torch.nn.init.normal_
    x = torch.randn(5, 2, 64)
    for skip_bias in (False, True):
        kwargs = dict(config=config, init_method=init, bias=True, skip_bias_add=skip_bias)
        pairs = [
            (ColumnParallelLinear(64, 96, gather_output=False, **kwargs),
             InferenceColumnParallelLinear(64, 96, gather_output=False, **kwargs)),
            (RowParallelLinear(64, 96, input_is_parallel=True, **kwargs),
             InferenceRowParallelLinear(64, 96, input_is_parallel=True, **kwargs)),
        ]
        for ref, new in pairs:
            new.load_state_dict(ref.state_dict())
            with torch.no_grad():
                (a, ab), (c, cb) = ref(x), new(x)
            same = torch.equal(a, c) and (ab is None) == (cb is None)
            out[f"{type(new).__name__}_skip_bias_{skip_bias}_bit_identical"] = bool(
                same and (ab is None or torch.equal(ab, cb)))
    # Wide weights run in blocks of output features on the CPU (3 blocks here, the last one
    # short), and an adopted layer (GPTModel's output layer) takes the direct path, also with
    # a supplied weight (tied embeddings): bit-identical to the whole matmul, at any number of
    # tokens.
    from megatron_patch.models import inference_linear

    assert inference_linear._CPU_BLOCK < 2500 < 3 * inference_linear._CPU_BLOCK
    head = ColumnParallelLinear(64, 2500, config=config, init_method=init, bias=False)
    tied = torch.randn(2500, 64)
    for tokens in ((1, 1), (1, 4), (7, 3)):
        x = torch.randn(*tokens, 64)
        with torch.no_grad():
            ref = [head(x)[0], head(x, weight=tied)[0]]
            adopted = InferenceColumnParallelLinear.adopt(head)
            new = [adopted(x)[0], adopted(x, weight=tied)[0]]
        head.__class__ = ColumnParallelLinear
        out[f"blockwise_{tokens}_bit_identical"] = all(map(torch.equal, ref, new))
    return out


def test_fast_modules_match_megatron():
    (r,) = harness.run(_compare, 1)
    for name, value in r.items():
        if name.startswith("attn_"):
            assert value <= 1e-6, (name, value)
        else:
            assert value is True, (name, r)


def _generate_with_and_without_cached_rotary() -> dict:
    """Greedy generation from one GLM-style model (rotary on half of each head, interleaved
    pairs, 2 KV groups): with keys rotated before caching, and with megatron's SelfAttention
    (which re-rotates the whole cache); also the prefill+decode logits of both."""
    import torch
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.transformer.attention import SelfAttention

    from megatron_patch import parallel
    from megatron_patch.generation import generate
    from megatron_patch.models import build_model, transformer_config
    from megatron_patch.models.cached_rotary import CachedRotarySelfAttention
    from megatron_patch.models.spec import ModelArgs

    parallel.initialize(1, 1)
    args = ModelArgs(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                     num_query_groups=2, kv_channels=16, vocab_size=300,
                     max_sequence_length=128, layernorm_epsilon=1e-5, rotary_percent=0.5,
                     rotary_interleaved=True)
    hf_config = {"architectures": ["LlamaForCausalLM"], "rope_theta": 10000.0}
    torch.manual_seed(0)
    model = build_model(args, transformer_config(args), hf_config).eval()
    attention = [layer.self_attention for layer in model.decoder.layers]
    assert all(type(a) is CachedRotarySelfAttention for a in attention)
    prompts = [[5, 17, 99], [1, 200, 42, 7, 8, 250, 13]]
    out = {}
    for name, cls in (("cached", CachedRotarySelfAttention), ("megatron", SelfAttention)):
        for a in attention:
            a.__class__ = cls
        out[name] = generate(model, prompts, max_new_tokens=10, vocab_size=300,
                             eos_token_ids=[-1], pad_token_id=0)
        context = StaticInferenceContext(1, 16)
        logits = []
        with torch.inference_mode():
            tokens = torch.tensor([prompts[1]])
            for step in range(3):
                query = tokens if step == 0 else tokens[:, -1:]
                length = tokens.shape[1]
                positions = torch.arange(length - query.shape[1], length)[None]
                step_logits = model(query, positions, None, inference_context=context,
                                    runtime_gather_output=True)
                context.sequence_len_offset += query.shape[1]
                logits.append(step_logits[:, -1])
                tokens = torch.cat([tokens, step_logits[:, -1].argmax(-1, keepdim=True)], 1)
        out[name + "_logits"] = torch.cat(logits)
    return {"same_tokens": out["cached"] == out["megatron"],
            "same_logits": torch.equal(out["cached_logits"], out["megatron_logits"])}


def test_keys_rotated_before_caching_change_nothing():
    """Rotation is per position: rotating each new key once before it enters the KV cache must
    give bit-identical logits to megatron's re-rotation of the whole cache at every step."""
    (result,) = harness.run(_generate_with_and_without_cached_rotary, 1)
    assert result == {"same_tokens": True, "same_logits": True}, result
