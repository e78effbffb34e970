"""LoRA adapters on Megatron-Core's tensor-parallel linears, computed as peft computes them:
`y = W x + scale * B (A dropout(x))`, scale = alpha / r (rsLoRA: alpha / sqrt(r)).

An adapted linear keeps its class's forward, parameters and checkpoint keys, and gains
`lora_A` of shape [P, r, in] (one A per adapted HF part of the linear: q, k, v of a fused
linear_qkv) and `lora_B` of shape [out, r], one row per output row of the linear. Row j of B
serves the part that owns row j (`lora_mask` [P, out], one-hot), so for each HF projection p
the adapter is exactly peft's: A_p and B restricted to p's rows. Rows of parts that are not
adapted stay zero (no gradient reaches them).

Tensor parallelism (Megatron's sharding of the base weight, applied to the adapter):
- column-parallel (output rows split): A whole on every rank, B split by rows like the weight.
  z = A x is the same on every rank; the gradient of z sums the ranks' partial B^T dy, so z
  passes `copy_to_tensor_model_parallel_region` (backward all-reduce). With sequence
  parallelism x is this rank's slice of the sequence: z is computed on the slice and
  all-gathered (backward reduce-scatter), and A, whose gradient then covers this slice's
  tokens only, is tagged `sequence_parallel` so `finalize_model_grads` sums it over TP.
- row-parallel (input columns split): A split by columns like the weight, B whole. A x is a
  partial sum per rank, reduced exactly where the base output is (all-reduce, or
  reduce-scatter with sequence parallelism, which also tags B `sequence_parallel`).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_patch.lora.targets import COLUMN, ROW, Site


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter hyperparameters, with peft's meanings."""

    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ("all-linear",)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"--lora-rank {self.rank}: the LoRA rank must be a positive integer")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"--lora-alpha {self.alpha}: must be a finite number > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout {self.dropout}: must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("--lora-target-modules: give at least one module name")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRALinear:
    """Mixed into the class of an adapted ColumnParallelLinear / RowParallelLinear (see
    `adopt`); its forward adds the adapter's output to the base linear's."""

    lora_A: torch.nn.Parameter
    lora_B: torch.nn.Parameter
    lora_mask: torch.Tensor
    lora_enabled = True  # `disabled` turns it off: the base linear alone

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        if not self.lora_enabled:
            return output, bias
        return output + self.lora_delta(input_).to(output.dtype), bias

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.lora_dropout == 0.0:
            return x
        if self.lora_tp > 1 and (self.lora_kind == ROW or self.sequence_parallel):
            from megatron.core import tensor_parallel

            # Each rank holds other input columns (row-parallel) or other tokens (sequence
            # parallelism): independent masks, from megatron's tensor-parallel RNG. A column-
            # parallel input without it is the same on every rank, and so is its mask.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return torch.nn.functional.dropout(x, self.lora_dropout, True)
        return torch.nn.functional.dropout(x, self.lora_dropout, True)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings

        x = self._dropped(x).to(self.lora_A.dtype)
        parts, rank, inputs = self.lora_A.shape
        z = x @ self.lora_A.reshape(parts * rank, inputs).t()
        communicate = self.lora_tp > 1 and not self.explicit_expert_comm
        if self.lora_kind == COLUMN:
            if communicate and self.sequence_parallel:
                z = mappings.gather_from_sequence_parallel_region(z, True, group=self.tp_group)
            elif communicate:
                z = mappings.copy_to_tensor_model_parallel_region(z, group=self.tp_group)
        elif communicate and self.sequence_parallel:
            z = mappings.reduce_scatter_to_sequence_parallel_region(z, group=self.tp_group)
        elif communicate:
            z = mappings.reduce_from_tensor_model_parallel_region(z, group=self.tp_group)
        if parts == 1 and self.lora_whole:
            return (z @ self.lora_B.t()) * self.lora_scale
        per_part = z.unflatten(-1, (parts, rank)) @ self.lora_B.t()  # [..., P, out]
        return (per_part * self.lora_mask).sum(-2) * self.lora_scale

    def lora_weight_delta(self) -> torch.Tensor:
        """scale * (B A) per part, as one [out, in] matrix of this rank's shard."""
        delta = sum((self.lora_mask[p, :, None] * self.lora_B) @ self.lora_A[p]
                    for p in range(self.lora_A.shape[0]))
        return delta * self.lora_scale

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for name in ("lora_A", "lora_B"):  # the parent took them for replicated tensors
            state.pop(prefix + name)
        axis = {"lora_B": 0} if self.lora_kind == COLUMN else {"lora_A": 2}
        adapter = make_sharded_tensors_for_checkpoint(
            {"lora_A": self.lora_A, "lora_B": self.lora_B}, prefix, axis, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if self.lora_swiglu:  # stored as [gate; up] whole, whatever the TP (as the weight)
            key = prefix + "lora_B"
            adapter[key] = apply_swiglu_sharded_factory(
                adapter[key], sharded_offsets,
                (metadata or {}).get("singleton_local_shards", False))
        state.update(adapter)
        return state


_CLASSES: dict[type, type] = {}


def _adapted_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRALinear, cls), {})
    return _CLASSES[cls]


def _seed(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) + seed * 1_000_003) % 2**63


def local_rows(site: Site) -> torch.Tensor:
    """The rows of the whole output (TP=1 numbering) that this rank's shard of the linear
    holds: all of them (row-parallel), a contiguous block, or a block of each of the gate and
    up halves (a gated linear_fc1, as Megatron splits it)."""
    from megatron.core.utils import get_pg_rank, get_pg_size

    module = site.module
    out = module.weight.shape[0]
    if site.kind == ROW:
        return torch.arange(out)
    tp_rank = get_pg_rank(module.tp_group)
    if not site.swiglu:
        return torch.arange(tp_rank * out, (tp_rank + 1) * out)
    half, local_half = out * get_pg_size(module.tp_group) // 2, out // 2
    block = torch.arange(tp_rank * local_half, (tp_rank + 1) * local_half)
    return torch.cat([block, half + block])


def local_columns(site: Site) -> slice:
    """This rank's input columns of the linear (all of them for column-parallel)."""
    from megatron.core.utils import get_pg_rank

    inputs = site.module.weight.shape[1]
    if site.kind == COLUMN:
        return slice(0, inputs)
    start = get_pg_rank(site.module.tp_group) * inputs
    return slice(start, start + inputs)


def adopt(site: Site, parts: tuple[int, ...], config: LoRAConfig, seed: int) -> None:
    """Give one linear its adapter in place: A initialised as peft does (Kaiming-uniform,
    a = sqrt(5), over the whole input width, from a generator seeded by the linear's global
    name, so every layout starts from the same adapter), B zero."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    from megatron.core.utils import get_pg_size

    module = site.module
    weight = module.weight
    if module.explicit_expert_comm and get_pg_size(module.tp_group) > 1:
        raise ValueError(f"{site.name}: LoRA on experts split over tensor-parallel ranks is not "
                         "supported; leave the experts' linears out of --lora-target-modules or "
                         "train at TP=1 (expert parallelism is fine)")
    tp = get_pg_size(module.tp_group)
    rows, columns = local_rows(site), local_columns(site)
    in_whole = weight.shape[1] * (tp if site.kind == ROW else 1)
    gen = torch.Generator().manual_seed(_seed(site.name, seed))
    bound = 1.0 / math.sqrt(in_whole)
    a_whole = torch.empty(len(parts), config.rank, in_whole).uniform_(-bound, bound,
                                                                        generator=gen)
    lora_a = torch.nn.Parameter(a_whole[:, :, columns].to(weight.dtype).to(weight.device))
    lora_b = torch.nn.Parameter(weight.new_zeros(weight.shape[0], config.rank))
    owner = torch.empty(sum(len(r) for r in site.rows), dtype=torch.long)
    for i, r in enumerate(site.rows):
        owner[r] = i
    mask = torch.stack([owner[rows] == p for p in parts]).to(weight.dtype).to(weight.device)

    # megatron-core internal: the class of a built layer is swapped for a subclass (as
    # models/inference_linear.py's adopt does), keeping its parameters and checkpoint keys.
    module.__class__ = _adapted_class(type(module))
    module.lora_A, module.lora_B = lora_a, lora_b
    module.register_buffer("lora_mask", mask, persistent=False)
    module.lora_kind, module.lora_tp, module.lora_swiglu = site.kind, tp, site.swiglu
    module.lora_scale, module.lora_dropout = config.scale, config.dropout
    module.lora_whole = bool(mask.all())
    module.lora_site, module.lora_parts = site, parts
    sharded, replicated = (lora_b, lora_a) if site.kind == COLUMN else (lora_a, lora_b)
    set_tensor_model_parallel_attributes(sharded, True, 0 if site.kind == COLUMN else 2, 1)
    replicated.sequence_parallel = module.sequence_parallel
    for param in (lora_a, lora_b):
        # Expert parameters are reduced over the expert data-parallel group (megatron's DDP).
        param.allreduce = getattr(weight, "allreduce", True)


def adapted(model) -> list[LoRALinear]:
    """The adapted linears of a model chunk (or of a wrapper of it), in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def disabled(model) -> Iterator[None]:
    """The base model for the duration, every adapter of `model` off (peft's
    `disable_adapter`): a LoRA run's frozen base serves as a reference model without a copy."""
    modules = adapted(model)
    for module in modules:
        module.lora_enabled = False
    try:
        yield
    finally:
        for module in modules:
            del module.lora_enabled  # the class's default again


def remove(module: LoRALinear) -> None:
    """Take the adapter off (after merging it, or to drop it): the layer's class, parameters
    and checkpoint keys are the base layer's again."""
    base = next(c for c in type(module).__mro__[1:]
                if c is not LoRALinear and not issubclass(c, LoRALinear))
    del module.lora_A, module.lora_B, module.lora_mask
    module.__class__ = base


def merge(model) -> None:
    """Add each adapter into its base weight (W += scale * B A per part), then remove it."""
    with torch.no_grad():
        for module in adapted(model):
            module.weight.add_(module.lora_weight_delta().to(module.weight.dtype))
            remove(module)
