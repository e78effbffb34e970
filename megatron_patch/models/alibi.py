"""ALiBi (Press et al., "Train Short, Test Long"): a per-head linear bias on attention scores.

Megatron-Core has no ALiBi. `AlibiDotProductAttention` is Megatron-Core's local
`DotProductAttention` with the bias added to the scaled scores before the masked softmax; it
is plugged in as the `core_attention` submodule of a layer spec (models/layers.py).

The bias of head h for key position j is `slope_h * j` (BLOOM and Baichuan both add it this way):
it differs from the paper's `-slope_h * (i - j)` by a constant per query row, which the softmax
ignores. Hence the query position never enters: with a KV cache the keys are the cached positions
0..k-1, and left padding only shifts every key of a row by the same amount.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The slopes of all heads, float32 [num_heads].

    For n heads, n a power of two: the geometric sequence starting at and with ratio
    2^(-8/n). Otherwise, with p the largest power of two below n: the p slopes of p heads,
    followed by the first n - p odd-indexed (1st, 3rd, 5th, ...) slopes of 2p heads.
    """
    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one head, got {num_heads}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(p)
    if p != num_heads:
        slopes += power_of_two(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, key_length: int, device: torch.device) -> torch.Tensor:
    """[1, heads, 1, key_length] float32: slope_h * j for key position j."""
    positions = torch.arange(key_length, device=device, dtype=torch.float32)
    return (slopes.to(device)[:, None] * positions)[None, :, None, :]


class _BiasedSoftmax(torch.nn.Module):
    """Adds the ALiBi bias to scaled scores [b, heads, sq, sk], then Megatron's masked softmax."""

    def __init__(self, softmax: torch.nn.Module, slopes: torch.Tensor) -> None:
        super().__init__()
        self.softmax = softmax
        # The fused CUDA kernels take no additive bias.
        self.softmax.scaled_masked_softmax_fusion = False
        # A plain attribute, not a buffer: a bf16/fp16 model cast must not round the slopes.
        self.slopes = slopes

    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None,
                softmax_offset: torch.Tensor | None = None) -> torch.Tensor:
        bias = alibi_bias(self.slopes, scores.shape[-1], scores.device)
        # Megatron's softmax upcasts to fp32 when told to, and casts the probabilities back;
        # adding the bias in fp32 first keeps large position * slope products exact.
        scores = scores.float() + bias if self.softmax.softmax_in_fp32 else scores + bias.to(
            scores.dtype)
        return self.softmax(scores, mask, softmax_offset)


class AlibiDotProductAttention(DotProductAttention):
    """Megatron-Core's DotProductAttention with ALiBi. Under tensor parallelism each rank holds
    a contiguous block of heads (`num_attention_heads_per_partition` of them, in head order) and
    uses those heads' slopes."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args,
                 **kwargs) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        if self.config.apply_query_key_layer_scaling:
            raise ValueError("ALiBi with apply_query_key_layer_scaling is not supported: the "
                             "softmax would rescale the bias too")
        local = self.num_attention_heads_per_partition
        rank = self.tp_group.rank() if self.tp_group is not None else 0
        slopes = alibi_slopes(config.num_attention_heads)[rank * local:(rank + 1) * local]
        self.scale_mask_softmax = _BiasedSoftmax(self.scale_mask_softmax, slopes)
