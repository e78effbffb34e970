"""Training with replicated KV heads (ModelArgs.kv_replicas > 1, multi-query models).

The Megatron model holds each HF KV head as `kv_replicas` identical copies (spec.kv_replicas).
The original model's gradient for a KV head is the sum of its copies' gradients, so after the
gradients are reduced over data parallel ranks every copy is given that sum: all copies then
take the same optimizer step and stay bit-identical, and export (which checks them) keeps one.
Copies of one head may sit on several tensor parallel ranks, so the sum runs over the TP group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_patch.models.spec import ModelArgs


def _qkv_params(model_chunks: list[torch.nn.Module]) -> Iterator[torch.nn.Parameter]:
    """linear_qkv weights and biases, in the same order on every rank of a TP group."""
    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            if name.endswith("self_attention.linear_qkv"):
                # Only these two: a Transformer Engine linear_qkv also holds the input norm.
                for attr in ("weight", "bias"):
                    p = getattr(module, attr, None)
                    # (Transformer Engine may hold an empty bias when there is none.)
                    if isinstance(p, torch.nn.Parameter) and p.numel():
                        yield p


def _kv_rows(tensor: torch.Tensor, args: ModelArgs, combine: Callable[[torch.Tensor],
             torch.Tensor]) -> None:
    """Replace, in place, the key/value rows of this rank's shard of a fused linear_qkv
    tensor by `combine` of all copies of their KV head (given as [groups, copies, 2, d, ...])."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    groups, copies, d = args.num_query_groups, args.kv_replicas, args.kv_channels
    local_groups = groups * copies // tp
    per_copy = args.num_attention_heads // (groups * copies)
    rest = tensor.shape[1:]
    local = tensor.view(local_groups, per_copy + 2, d, *rest)[:, per_copy:]
    full = local.new_zeros(groups * copies, 2, d, *rest)
    full[rank * local_groups:(rank + 1) * local_groups] = local
    if tp > 1:
        # Zeros elsewhere: the sum over ranks is exact, the gathered copies themselves.
        torch.distributed.all_reduce(full, group=parallel_state.get_tensor_model_parallel_group())
    combined = combine(full.view(groups, copies, 2, d, *rest))
    everywhere = combined.unsqueeze(1).expand(groups, copies, 2, d, *rest)
    local.copy_(everywhere.reshape(groups * copies, 2, d, *rest)[
        rank * local_groups:(rank + 1) * local_groups])


def sum_copy_grads(model_chunks: list[torch.nn.Module], args: ModelArgs) -> None:
    """Give every copy of a KV head the sum of all copies' gradients (DDP's main_grad where
    there is one)."""
    for p in _qkv_params(model_chunks):
        grad = getattr(p, "main_grad", None)
        grad = p.grad if grad is None else grad
        if grad is not None:
            _kv_rows(grad, args, lambda copies: copies.sum(dim=1))


@torch.no_grad()
def tie_copies(model_chunks: list[torch.nn.Module], args: ModelArgs) -> None:
    """Make a freshly initialised model's KV copies identical (each takes its first copy)."""
    if args.kv_replicas > 1:
        for p in _qkv_params(model_chunks):
            _kv_rows(p.data, args, lambda copies: copies[:, 0])


def finalize_model_grads_func(finalize: Callable[..., Any], args: ModelArgs,
                              use_distributed_optimizer: bool,
                              data_parallel_size: int) -> Callable[..., Any]:
    """Megatron-Core's `finalize_model_grads` (for config.finalize_model_grads_func), followed
    by the sum over KV copies once the gradients are reduced over data parallel ranks.

    Summing after the reduction keeps the copies bit-identical whatever order the reduction
    adds in. The distributed optimizer leaves each DP rank only its shard of the reduced
    gradients, so with it (and DP > 1) replicated KV heads are refused.
    """
    if args.kv_replicas == 1:
        return finalize
    if use_distributed_optimizer and data_parallel_size > 1:
        raise ValueError(
            f"--use-distributed-optimizer with data parallel size {data_parallel_size}: this "
            f"model's KV head is built as {args.kv_replicas} copies (multi-query attention), "
            "whose gradients are summed after the data parallel reduction, which the "
            "distributed optimizer shards; drop --use-distributed-optimizer")

    def wrapped(model: list[torch.nn.Module], *a: Any, **kw: Any) -> Any:
        out = finalize(model, *a, **kw)
        sum_copy_grads(model, args)
        return out

    return wrapped
