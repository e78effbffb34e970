"""NormHead (Baichuan2): the output layer normalises its rows in the forward, in training too,
so the raw weight's gradient flows through the normalisation. Checked at TP=2 (each rank holds
whole rows of the vocab-parallel split) against a single-process autograd reference.
Tolerance 1e-6: fp32, the same operations on tiny tensors (only summation order differs)."""

import harness

HIDDEN, VOCAB = 16, 10


def _check(tp: int) -> dict[str, float]:
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megatron_patch import parallel
    from megatron_patch.models import ModelArgs, transformer_config
    from megatron_patch.models.norm_head import NormHeadLinear

    parallel.initialize(tp, 1)
    rank = parallel_state.get_tensor_model_parallel_rank()
    args = ModelArgs(num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=32, num_attention_heads=2,
                     num_query_groups=2, kv_channels=8, vocab_size=VOCAB,
                     max_sequence_length=8, layernorm_epsilon=1e-5, norm_head=True)
    layer = ColumnParallelLinear(HIDDEN, VOCAB, config=transformer_config(args),
                                 init_method=torch.nn.init.zeros_, bias=False,
                                 gather_output=False)
    NormHeadLinear.adopt(layer)

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 3  # row norms far from 1
    x = torch.randn(3, 2, HIDDEN, generator=gen)
    grad_out = torch.randn(3, 2, VOCAB, generator=gen)
    rows = slice(rank * VOCAB // tp, (rank + 1) * VOCAB // tp)
    with torch.no_grad():
        layer.weight.copy_(weight[rows])

    x_mc = x.clone().requires_grad_()
    out, _ = layer(x_mc)
    (out * grad_out[..., rows]).sum().backward()
    full_out = gather_from_tensor_model_parallel_region(out.detach())

    w_ref, x_ref = weight.clone().requires_grad_(), x.clone().requires_grad_()
    ref = torch.nn.functional.linear(x_ref, torch.nn.functional.normalize(w_ref))
    (ref * grad_out).sum().backward()
    return {"out": (full_out - ref.detach()).abs().max().item(),
            "weight_grad": (layer.weight.grad - w_ref.grad[rows]).abs().max().item(),
            "input_grad": (x_mc.grad - x_ref.grad).abs().max().item()}


def test_norm_head_forward_and_gradients_match_the_reference_at_tp2():
    for report in harness.run(_check, 2, 2):
        assert all(v <= 1e-6 for v in report.values()), report
