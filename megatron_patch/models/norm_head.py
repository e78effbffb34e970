"""An output layer whose rows are L2-normalised in every forward (Baichuan2's NormHead).

The checkpoint keeps the raw rows: the normalisation is part of the function, in training as in
inference, so gradients flow through it to the raw weight exactly as in the original model.
Row-wise normalisation is local to each tensor-parallel shard: the vocab-parallel split keeps
every row whole. Padding rows are zero and stay zero (F.normalize divides by max(norm, eps)).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear


class NormHeadLinear(ColumnParallelLinear):
    """ColumnParallelLinear computing x @ normalize(W, rows).T."""

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None):
        weight = self.weight if weight is None else weight
        return super().forward(input_, torch.nn.functional.normalize(weight, dim=-1),
                               runtime_gather_output)

    @classmethod
    def adopt(cls, layer: ColumnParallelLinear) -> NormHeadLinear:
        """Turn a built output layer into a NormHead in place: its parameters, sharding and
        checkpoint keys stay as GPTModel made them (its constructor arguments are GPTModel's
        internals, so the layer is not rebuilt)."""
        # megatron-core internal: a class swap of a built layer (test_megatron_core_contract.py).
        if type(layer) is not ColumnParallelLinear:
            raise TypeError(f"expected megatron's ColumnParallelLinear, got {type(layer)}")
        if layer.weight is None:
            raise ValueError("norm_head needs an output layer with its own weight (untied)")
        layer.__class__ = cls
        # The matmul sees a tensor derived from the parameter, not the parameter: its gradient
        # must reach the parameter through autograd, not be fused into a main_grad buffer.
        layer.gradient_accumulation_fusion = False
        return layer
