"""Declarative weight mappings between Hugging Face and Megatron-Core tensor names.

A family lists `Rule`s: a Megatron-Core name pattern, the HF name pattern(s) it comes from, and
the kind of transform between them. `{layer}` in a pattern stands for the decoder layer index.
Rules describe the unsharded (TP=1, PP=1) model; sharding for any TP/PP/EP is left to
Megatron-Core's own `sharded_state_dict`, so a mapping can never disagree with how megatron
splits a tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Dims:
    """Model sizes the transforms need."""

    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    padded_vocab_size: int


class Transform:
    """Turns the HF tensors of one rule into the Megatron tensor, and back."""

    def to_megatron(self, hf: list[torch.Tensor], dims: Dims) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, megatron: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        raise NotImplementedError


class Copy(Transform):
    def to_megatron(self, hf, dims):
        (tensor,) = hf
        return tensor

    def to_hf(self, megatron, dims):
        return [megatron]


class Vocab(Transform):
    """Embedding / output rows: zero rows pad the vocabulary on import and are dropped on export."""

    def to_megatron(self, hf, dims):
        (tensor,) = hf
        extra = dims.padded_vocab_size - tensor.shape[0]
        if extra < 0:
            raise ValueError(
                f"{tensor.shape[0]} vocabulary rows exceed the padded size {dims.padded_vocab_size}"
            )
        if extra == 0:
            return tensor
        return torch.cat([tensor, tensor.new_zeros((extra, *tensor.shape[1:]))])

    def to_hf(self, megatron, dims):
        return [megatron[: dims.vocab_size]]


class FuseQKV(Transform):
    """Separate q, k, v -> Megatron's fused linear_qkv, grouped per KV group.

    Megatron lays the fused output dimension out as, for each query group, that group's query
    heads followed by its key head and its value head, so that a contiguous TP split keeps whole
    groups together. Works for weights (2-D) and biases (1-D).
    """

    def to_megatron(self, hf, dims):
        q, k, v = hf
        groups, d = dims.num_query_groups, dims.kv_channels
        heads_per_group = dims.num_attention_heads // groups
        rest = q.shape[1:]
        q = q.reshape(groups, heads_per_group * d, *rest)
        k = k.reshape(groups, d, *rest)
        v = v.reshape(groups, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def to_hf(self, megatron, dims):
        groups, d = dims.num_query_groups, dims.kv_channels
        heads_per_group = dims.num_attention_heads // groups
        rest = megatron.shape[1:]
        grouped = megatron.reshape(groups, (heads_per_group + 2) * d, *rest)
        q, k, v = grouped.split([heads_per_group * d, d, d], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


class QKVConcat(FuseQKV):
    """One HF tensor holding [q; k; v] stacked along dim 0 (Baichuan's W_pack) -> Megatron's
    per-group fused linear_qkv, and back. Weights and biases."""

    def to_megatron(self, hf, dims):
        (packed,) = hf
        d = dims.kv_channels
        sizes = [dims.num_attention_heads * d, dims.num_query_groups * d,
                 dims.num_query_groups * d]
        if packed.shape[0] != sum(sizes):
            raise ValueError(f"fused q;k;v has {packed.shape[0]} rows, expected {sum(sizes)}")
        return super().to_megatron(list(packed.split(sizes, dim=0)), dims)

    def to_hf(self, megatron, dims):
        return [torch.cat(super().to_hf(megatron, dims), dim=0)]


class Concat(Transform):
    """Several HF tensors stacked along dim 0 (e.g. SwiGLU [gate; up] into linear_fc1)."""

    def to_megatron(self, hf, dims):
        return torch.cat(hf, dim=0)

    def to_hf(self, megatron, dims):
        raise NotImplementedError("Concat needs the part sizes; use GateUp or a sized subclass")


class GateUp(Concat):
    """SwiGLU: gate and up projections fused as [gate; up] in linear_fc1."""

    def to_hf(self, megatron, dims):
        gate, up = megatron.chunk(2, dim=0)
        return [gate.contiguous(), up.contiguous()]


TRANSFORMS: dict[str, Transform] = {
    "copy": Copy(),
    "vocab": Vocab(),
    "qkv": FuseQKV(),
    "gate_up": GateUp(),
    "qkv_concat": QKVConcat(),
}


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...] | str
    kind: str = "copy"
    # Whether the rule applies to a given HF config (e.g. an untied lm_head).
    when: Callable[[dict[str, Any]], bool] | None = None

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)


@dataclass(frozen=True)
class Binding:
    """A rule made concrete for one layer: these HF tensors <-> this Megatron tensor."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform


def bind(rules: tuple[Rule, ...], hf_config: dict[str, Any], num_layers: int) -> list[Binding]:
    bindings = []
    for rule in rules:
        if rule.kind not in TRANSFORMS:
            raise ValueError(f"rule for {rule.megatron}: unknown transform kind {rule.kind!r}")
        if rule.when is not None and not rule.when(hf_config):
            continue
        layers = range(num_layers) if "{layer}" in rule.megatron else [None]
        for layer in layers:
            fmt = {} if layer is None else {"layer": layer}
            bindings.append(
                Binding(
                    megatron=rule.megatron.format(**fmt),
                    hf=tuple(name.format(**fmt) for name in rule.hf_names()),
                    transform=TRANSFORMS[rule.kind],
                )
            )
    return bindings
