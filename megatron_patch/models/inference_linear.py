"""Megatron-Core's tensor-parallel linear layers with a direct path for gradient-free TP=1 calls.

Every ColumnParallelLinear / RowParallelLinear call goes through two autograd Functions (the
tensor-parallel region copy or reduce, and the linear with gradient-accumulation fusion), each
resolving process groups (RowParallelLinear also issues a deprecation warning per call). With
autograd off and a tensor-parallel group of one rank, all of that computes `input @ weight.T`
(+ bias), which is what these subclasses then call directly: the same torch.matmul and bias add
that megatron's Functions run, so results are bit-identical. Any other call (training, TP > 1,
deferred embedding wgrad, CPU offloading) is megatron's own forward. Parameters, checkpoint keys
and sharding are the parent's.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_pg_size


def _direct(layer: torch.nn.Module) -> bool:
    return (not torch.is_grad_enabled() and layer._single_rank
            and not layer.config.defer_embedding_wgrad_compute
            and layer.config._cpu_offloading_context is None)


def _linear(layer: torch.nn.Module, input_: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What megatron's linear Functions compute for one rank: the same matmul, then the bias
    added (or handed back, with skip_bias_add)."""
    output = torch.matmul(input_, layer.weight.t())
    if layer.skip_bias_add:
        return output, layer.bias
    if layer.bias is not None:
        output = output + layer.bias
    return output, None


class InferenceColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear; gradient-free TP=1 calls skip the autograd wrappers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._single_rank = get_pg_size(self.tp_group) == 1

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if weight is not None or self.weight is None or not _direct(self):
            return super().forward(input_, weight, runtime_gather_output)
        return _linear(self, input_)


class InferenceRowParallelLinear(RowParallelLinear):
    """RowParallelLinear; gradient-free TP=1 calls skip the autograd wrappers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._single_rank = get_pg_size(self.tp_group) == 1

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.explicit_expert_comm or not _direct(self):
            return super().forward(input_)
        return _linear(self, input_)
