"""Megatron-Core's tensor-parallel linear layers with a direct path for TP=1 calls.

Every ColumnParallelLinear / RowParallelLinear call goes through two autograd Functions (the
tensor-parallel region copy or reduce, and the linear with gradient-accumulation fusion), each
resolving process groups (RowParallelLinear also issues a deprecation warning per call). With a
tensor-parallel group of one rank, all of that computes `input @ weight.T` (+ bias), which is
what these subclasses then call directly: the same torch.matmul and bias add that megatron's
Functions run, so forward results are bit-identical. In training, torch's own autograd of that
matmul computes the gradients megatron's Function computes (grad_output @ weight and
grad_output.T @ input, rounding aside) without the Function's contiguous copies of grad_output
and input (benchmarks/train_bench.py); the weight gradient lands in `param.grad`, where
megatron's DDP hooks add it into the gradient buffer, as they do for megatron's Function when
gradient-accumulation fusion is off (always, here). Any other call (TP > 1, gradient-
accumulation fusion, deferred embedding wgrad, CPU offloading) is megatron's own forward.
Parameters, checkpoint keys and sharding are the parent's.

Wide fp32 matmuls on the CPU run in blocks of output features (see `_CPU_BLOCK`): each output
feature is one dot product over the input features, whose summation order the BLAS kernel takes
from the input features, not from how many output features sit beside it, so the blocks give
the whole matmul's bits (checked here for weights up to 151936 x 4096 and 1 to 600 tokens;
tests/test_fast_modules.py checks it wherever the suite runs), and run faster on a few tokens.
GPTModel's output layer is built by GPTModel itself, not from the layer spec: `adopt` gives it
the same direct path.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_pg_size

# Output features per block of a CPU fp32 matmul. MKL's sgemm on a few rows (a decode step's
# batch) against a weight of many thousand rows runs well below memory bandwidth; measured on
# the (AMD EPYC, MKL 2024.2) development box, 1 thread, weights not in cache, 4 tokens:
# 32000 x 512 (an LM head): 11.7 ms whole, 8.5 ms in blocks of 1024 rows;
# 32000 x 4096: 108 -> 55 ms; 11008 x 4096: 30 -> 19 ms; 2688 x 512: 0.59 -> 0.55 ms.
# One token (a matrix-vector product) gains nothing and loses a little, so it stays whole;
# 512 tokens are within noise either way. Other CPUs / BLAS builds are unmeasured.
_CPU_BLOCK = 1024


def _direct(layer: torch.nn.Module) -> bool:
    return (layer._single_rank and not layer.config.gradient_accumulation_fusion
            and not layer.config.defer_embedding_wgrad_compute
            # megatron-core internal: a private config field (test_megatron_core_contract.py).
            and layer.config._cpu_offloading_context is None)


def _matmul(input_: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`torch.matmul(input_, weight.t())`, blockwise over output features where that is
    faster (wide fp32 weights on the CPU, more than one token) and bit-identical."""
    rows = weight.shape[0]
    if (rows <= _CPU_BLOCK or torch.is_grad_enabled() or input_.device.type != "cpu"
            or weight.dtype != torch.float32
            or input_.dtype != torch.float32 or input_.numel() < 2 * input_.shape[-1]):
        return torch.matmul(input_, weight.t())
    output = input_.new_empty(*input_.shape[:-1], rows)
    for start in range(0, rows, _CPU_BLOCK):
        block = weight[start:start + _CPU_BLOCK]
        torch.matmul(input_, block.t(), out=output[..., start:start + block.shape[0]])
    return output


def _linear(layer: torch.nn.Module, input_: torch.Tensor, weight: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What megatron's linear Functions compute for one rank: the same matmul, then the bias
    added (or handed back, with skip_bias_add)."""
    output = _matmul(input_, weight)
    if layer.skip_bias_add:
        return output, layer.bias
    if layer.bias is not None:
        output = output + layer.bias
    return output, None


class InferenceColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear; TP=1 calls skip megatron's autograd wrappers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._single_rank = get_pg_size(self.tp_group) == 1

    @classmethod
    def adopt(cls, layer: ColumnParallelLinear) -> InferenceColumnParallelLinear:
        """Give a built ColumnParallelLinear (GPTModel's output layer) the direct path in place:
        parameters, sharding and checkpoint keys stay as built (its constructor arguments are
        GPTModel's internals, so it is not rebuilt)."""
        # megatron-core internal: a class swap of a built layer (test_megatron_core_contract.py).
        if type(layer) is not ColumnParallelLinear:
            raise TypeError(f"expected megatron's ColumnParallelLinear, got {type(layer)}")
        layer.__class__ = cls
        layer._single_rank = get_pg_size(layer.tp_group) == 1
        return layer

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # A supplied weight (tied output embeddings) is used as megatron uses it; a weight of
        # the wrong shape goes to megatron, which raises.
        given = weight if weight is not None else self.weight
        if (given is None or not _direct(self)
                or given.shape != (self.output_size_per_partition, self.input_size)):
            return super().forward(input_, weight, runtime_gather_output)
        return _linear(self, input_, given)


class InferenceRowParallelLinear(RowParallelLinear):
    """RowParallelLinear; TP=1 calls skip megatron's autograd wrappers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._single_rank = get_pg_size(self.tp_group) == 1

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.explicit_expert_comm or not _direct(self):
            return super().forward(input_)
        return _linear(self, input_, self.weight)
