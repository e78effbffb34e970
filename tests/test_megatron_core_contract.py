"""The megatron-core contract: every place megatron-patch relies on a megatron-core (or torch)
internal, checked against the installed version. When megatron-core changes one, its test here
fails naming the touch point and the file of ours that relies on it; docs/architecture.md holds
the same table with the reason each exists.

These checks read signatures and module attributes only (no process group), so they run in the
test process in well under a second.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class TouchPoint:
    name: str  # the internal, as megatron-core spells it
    used_by: str  # our file that relies on it
    check: Callable[[], str | None]  # None when the internal is as we rely on it, else what changed


def _params(fn: Callable) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def _adjust_key_value_for_inference() -> str | None:
    from megatron.core.transformer.attention import SelfAttention

    method = getattr(SelfAttention, "_adjust_key_value_for_inference", None)
    if method is None:
        return "SelfAttention has no _adjust_key_value_for_inference"
    expected = ["inference_context", "query", "key", "value", "rotary_pos_emb"]
    if _params(method)[:5] != expected:
        return f"its parameters begin {_params(method)[:5]}, not {expected}"
    return None


def _cpu_offloading_context() -> str | None:
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = TransformerConfig.__dataclass_fields__
    if "_cpu_offloading_context" not in fields:
        return "TransformerConfig has no _cpu_offloading_context field"
    if fields["_cpu_offloading_context"].default is not None:
        return "its default is no longer None (offloading off)"
    return None


def _te_general_gemm() -> str | None:
    from megatron.core.transformer.moe import moe_utils

    if "te_general_gemm" not in inspect.getsource(moe_utils):
        return "moe_utils no longer refers to te_general_gemm: the None stand-in can go"
    return None


def _rng_state_functions() -> str | None:
    import ast

    from megatron.core.tensor_parallel import random as mcore_random

    # cpu_mode has replaced the functions in this process: read the originals' signatures.
    tree = ast.parse(inspect.getsource(mcore_random))
    found = {node.name: [a.arg for a in node.args.args] for node in ast.walk(tree)
             if isinstance(node, ast.FunctionDef)}
    expected = {"_get_cuda_rng_state": ["device", "clone", "graph_safe"],
                "_set_cuda_rng_state": ["new_state", "device", "graph_safe"]}
    changed = {name: found.get(name) for name, args in expected.items() if found.get(name) != args}
    return f"signatures changed: {changed}, expected {expected}" if changed else None


def _results_queue() -> str | None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):
        return "filesystem_async has no module-level _results_queue"
    getter = getattr(filesystem_async, "_get_write_results_queue", None)
    if getter is None or "_results_queue is None" not in inspect.getsource(getter):
        return ("_get_write_results_queue no longer creates the queue only when "
                "_results_queue is None")
    return None


def _column_parallel_linear_class_swap() -> str | None:
    from megatron.core.tensor_parallel import ColumnParallelLinear

    expected = ["input_", "weight", "runtime_gather_output"]
    if _params(ColumnParallelLinear.forward) != expected:
        return f"forward's parameters are {_params(ColumnParallelLinear.forward)}, not {expected}"
    if "__slots__" in vars(ColumnParallelLinear):
        return "ColumnParallelLinear has __slots__: a built layer's class cannot be swapped"
    return None


def _have_apex_or_te() -> str | None:
    from megatron.core.optimizer import distrib_optimizer

    if not isinstance(getattr(distrib_optimizer, "HAVE_APEX_OR_TE", None), bool):
        return "distrib_optimizer.HAVE_APEX_OR_TE is gone (which Adam the optimizer runs on)"
    return None


def _gpt_model_attributes() -> str | None:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt import GPTModel

    source = inspect.getsource(GPTModel.__init__)
    missing = [a for a in ("self.embedding", "self.rotary_pos_emb", "self.output_layer")
               if a not in source]
    if "self.inv_freq" not in inspect.getsource(RotaryEmbedding.__init__):
        missing.append("RotaryEmbedding.inv_freq")
    return f"GPTModel no longer builds {missing}" if missing else None


def _scale_mask_softmax() -> str | None:
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if "self.scale_mask_softmax = FusedScaleMaskSoftmax(" not in inspect.getsource(
            DotProductAttention.__init__):
        return "DotProductAttention no longer builds self.scale_mask_softmax"
    source = inspect.getsource(FusedScaleMaskSoftmax.__init__)
    missing = [a for a in ("self.window_size", "self.scale") if a not in source]
    return f"FusedScaleMaskSoftmax no longer sets {missing}" if missing else None


def _parameter_tags() -> str | None:
    import importlib

    from megatron.core.distributed import distributed_data_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.mlp import MLP

    problems = []
    if "'allreduce'" not in inspect.getsource(distributed_data_parallel):
        problems.append("DDP no longer tells expert parameters by their `allreduce` tag")
    # (The package's name finalize_model_grads is the function, not the module.)
    finalize = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    if "sequence_parallel" not in inspect.getsource(
            finalize._allreduce_non_tensor_model_parallel_grads):
        problems.append("finalize_model_grads no longer sums `sequence_parallel` gradients")
    if "output += output_bias" not in inspect.getsource(MLP.forward):
        problems.append("the expert MLP no longer adds its bias in place (the copy can go)")
    init = inspect.getsource(DotProductAttention.__init__)
    if "softmax_offset" not in init:
        problems.append("DotProductAttention has no softmax_offset")
    if "set_tensor_model_parallel_attributes" in init:
        problems.append("DotProductAttention tags softmax_offset itself (ours would fail)")
    return "; ".join(problems) or None


def _torch_device_constructors() -> str | None:
    import torch.utils._device

    if not callable(getattr(torch.utils._device, "_device_constructors", None)):
        return "torch.utils._device._device_constructors is gone"
    return None


def _parallel_linear_communication() -> str | None:
    """lora/layers.py joins an adapter's output where megatron's linears communicate: a
    column-parallel linear's output is this rank's rows of the whole input's product; a
    row-parallel one reduces (all-reduce, or reduce-scatter with sequence parallelism) before
    adding its bias, and experts communicate outside (explicit_expert_comm)."""
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer import mlp

    row = inspect.getsource(layers.RowParallelLinear.forward)
    column = inspect.getsource(layers.ColumnParallelLinear.forward)
    wanted = {"RowParallelLinear.forward": (row, ("explicit_expert_comm",
                                                  "reduce_scatter_to_sequence_parallel_region",
                                                  "reduce_from_tensor_model_parallel_region")),
              "ColumnParallelLinear.forward": (column, ("explicit_expert_comm",
                                                        "sequence_parallel"))}
    for where, (source, names) in wanted.items():
        if missing := [n for n in names if n not in source]:
            return f"{where} no longer refers to {missing}"
    if not callable(getattr(mlp, "apply_swiglu_sharded_factory", None)):
        return "mlp.apply_swiglu_sharded_factory is gone (fc1's adapter B is saved as gate/up)"
    return None


def _mla_rotary_key_gradient() -> str | None:
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    source = inspect.getsource(MLASelfAttention.get_query_key_value_tensors)
    if "gather_from_tensor_model_parallel_region(kv_combined)" not in source:
        return ("the ColumnParallelLinear key-value down projection's output is no longer "
                "gathered as it was: check whether SharedRopeKeyGrad is still needed")
    reductions = ("copy_to_tensor_model_parallel_region(k_pos_emb",
                  "reduce_from_tensor_model_parallel_region(k_pos_emb")
    if any(r in source for r in reductions):
        return "k_pos_emb's gradient is now summed over TP by megatron-core: remove ours"
    return None


def _ddp_gradient_buffers() -> str | None:
    from megatron.core.distributed import DistributedDataParallel, param_and_grad_buffer

    init = inspect.getsource(DistributedDataParallel.__init__)
    missing = [a for a in ("self.buffers", "self.expert_parallel_buffers") if a not in init]
    if missing:
        return f"DistributedDataParallel no longer sets {missing}"
    if "self.grad_data = " not in inspect.getsource(param_and_grad_buffer._ParamAndGradBuffer):
        return "_ParamAndGradBuffer no longer has grad_data"
    return None


TOUCH_POINTS = [
    TouchPoint("SelfAttention._adjust_key_value_for_inference", "models/cached_rotary.py",
               _adjust_key_value_for_inference),
    TouchPoint("TransformerConfig._cpu_offloading_context", "models/inference_linear.py",
               _cpu_offloading_context),
    TouchPoint("moe_utils.te_general_gemm", "models/layers.py", _te_general_gemm),
    TouchPoint("tensor_parallel.random._get/_set_cuda_rng_state", "cpu_mode.py",
               _rng_state_functions),
    TouchPoint("filesystem_async._results_queue", "cpu_mode.py", _results_queue),
    TouchPoint("ColumnParallelLinear (class swapped in place by adopt)",
               "models/norm_head.py, models/inference_linear.py, models/gemma.py",
               _column_parallel_linear_class_swap),
    TouchPoint("DotProductAttention.scale_mask_softmax (wrapped; its window_size read and cleared)",
               "models/gemma.py, models/sdpa_attention.py", _scale_mask_softmax),
    TouchPoint("distrib_optimizer.HAVE_APEX_OR_TE", "training/optim_state.py", _have_apex_or_te),
    TouchPoint("GPTModel.embedding / rotary_pos_emb.inv_freq / output_layer, replaced after "
               "construction", "models/build.py, models/embedding.py", _gpt_model_attributes),
    TouchPoint("torch.utils._device._device_constructors (torch)", "cpu_mode.py",
               _torch_device_constructors),
    TouchPoint("param.allreduce/sequence_parallel/tensor_model_parallel (tags set on biased "
               "experts' linears and on learnable softmax offsets)",
               "models/layers.py, models/sdpa_attention.py", _parameter_tags),
    TouchPoint("MLASelfAttention.get_query_key_value_tensors (its rotary key gradient at TP > 1)",
               "models/sdpa_attention.py", _mla_rotary_key_gradient),
    TouchPoint("DistributedDataParallel.buffers/expert_parallel_buffers (their grad_data read)",
               "training/finite_check.py", _ddp_gradient_buffers),
    TouchPoint("ColumnParallelLinear/RowParallelLinear (class swapped in place by LoRA's adopt; "
               "their communication points)", "lora/layers.py", _parallel_linear_communication),
]


@pytest.mark.parametrize("point", TOUCH_POINTS, ids=lambda p: p.name.split(" ")[0])
def test_megatron_core_internal_is_as_relied_on(point: TouchPoint):
    problem = point.check()
    assert problem is None, (f"megatron-core changed {point.name}, which {point.used_by} relies "
                             f"on: {problem} (see docs/architecture.md, 'megatron-core contract')")


def test_the_table_in_the_docs_lists_every_touch_point():
    import os

    docs = os.path.join(os.path.dirname(__file__), "..", "docs", "architecture.md")
    with open(docs, encoding="utf-8") as f:
        text = f.read()
    missing = [p.name for p in TOUCH_POINTS if f"`{p.name.split(' ')[0]}`" not in text]
    assert not missing, f"docs/architecture.md's touch-point table lacks {missing}"
