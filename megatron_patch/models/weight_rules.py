"""Declarative weight mappings between Hugging Face and Megatron-Core tensor names.

This is how a family describes its weights (the language of `models/families/`); the conversion
engine (`convert/`) applies it. A family lists `Rule`s: a Megatron-Core name pattern, the HF name
pattern(s) it comes from, and the named transform between them (`COPY`, `VOCAB`, `QKV`, ...).
`{layer}` in a pattern stands for the decoder layer index and `{expert}` for the (global) expert
index of a mixture-of-experts layer. Where an HF tensor holds every expert of a layer stacked
along dim 0 (GPT-OSS's fused experts), the rule's transform is a `StackedExperts` and `{expert}`
appears on the Megatron side only: each expert's binding maps its slice. Rules describe the
unsharded (TP=1, PP=1) model; sharding for any TP/PP/EP is left to Megatron-Core's own
`sharded_state_dict`, so a mapping can never disagree with how megatron splits a tensor.
"""

from __future__ import annotations

import dataclasses
import itertools
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
    # Copies of each HF KV head in Megatron's fused linear_qkv (ModelArgs.kv_replicas);
    # num_query_groups above is the HF count.
    kv_replicas: int = 1


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)


def replicate_kv(fused: torch.Tensor, dims: Dims) -> torch.Tensor:
    """Megatron's per-group fused qkv with the HF group count -> the same with every KV head
    copied `kv_replicas` times, each copy serving a contiguous share of its group's query heads
    (so the model computes the same function)."""
    r = dims.kv_replicas
    if r == 1:
        return fused
    groups, d = dims.num_query_groups, dims.kv_channels
    per_group = dims.num_attention_heads // groups
    rest = fused.shape[1:]
    x = fused.reshape(groups, per_group + 2, d, *rest)
    q = x[:, :per_group].reshape(groups, r, per_group // r, d, *rest)
    kv = x[:, per_group:].unsqueeze(1).expand(groups, r, 2, d, *rest)
    return torch.cat([q, kv], dim=2).reshape(-1, *rest)


def merge_kv(fused: torch.Tensor, dims: Dims) -> torch.Tensor:
    """The inverse of `replicate_kv`, refusing (ValueError) unless all copies of each KV head
    are bit-identical: a copy that differs would otherwise be dropped silently."""
    r = dims.kv_replicas
    if r == 1:
        return fused
    groups, d = dims.num_query_groups, dims.kv_channels
    per_copy = dims.num_attention_heads // (groups * r)
    rest = fused.shape[1:]
    x = fused.reshape(groups, r, per_copy + 2, d, *rest)
    kv = x[:, :, per_copy:]
    for copy in range(1, r):
        if not _same_bits(kv[:, copy], kv[:, 0]):
            # (Export may hand raw bytes here, whose difference means nothing.)
            diff = (f"max |diff| {(kv[:, copy].double() - kv[:, 0].double()).abs().max():.3g}"
                    if kv.dtype.is_floating_point else "not bit-identical")
            raise ValueError(f"the {r} copies of each KV head differ (copy {copy} vs 0: "
                             f"{diff}); exporting one would drop the others")
    q = x[:, :, :per_copy].reshape(groups, r * per_copy, d, *rest)
    return torch.cat([q, kv[:, 0]], dim=1).reshape(-1, *rest)


class Transform:
    """Turns the HF tensors of one rule into the Megatron tensor, and back. Transforms keep
    trailing dimensions they do not name as they find them (export runs them on byte views).
    Most only move whole rows (dim 0) and add zero rows, which the conversion fast path
    (convert/fast_path.py, `row_origins`) detects by running them on row numbers; the others
    (`Transposed`) give it no row numbers back and are computed."""

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
        return replicate_kv(torch.cat([q, k, v], dim=1).reshape(-1, *rest), dims)

    def to_hf(self, megatron, dims):
        megatron = merge_kv(megatron, dims)
        groups, d = dims.num_query_groups, dims.kv_channels
        heads_per_group = dims.num_attention_heads // groups
        rest = megatron.shape[1:]
        grouped = megatron.reshape(groups, (heads_per_group + 2) * d, *rest)
        q, k, v = grouped.split([heads_per_group * d, d, d], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


class ConcatQKV(Transform):
    """One HF tensor holding [all query heads; all key heads; all value heads] (Qwen v1 c_attn,
    Baichuan W_pack, ChatGLM query_key_value) <-> Megatron's per-group fused linear_qkv.
    Works for weights and biases, with any number of KV groups (GQA/MQA)."""

    def _sizes(self, dims: Dims) -> list[int]:
        d = dims.kv_channels
        return [dims.num_attention_heads * d, dims.num_query_groups * d,
                dims.num_query_groups * d]

    def to_megatron(self, hf, dims):
        (fused,) = hf
        sizes = self._sizes(dims)
        if fused.shape[0] != sum(sizes):
            raise ValueError(f"fused q;k;v has {fused.shape[0]} rows, expected {sum(sizes)} "
                             f"(q {sizes[0]}, k {sizes[1]}, v {sizes[2]})")
        return FuseQKV().to_megatron(list(fused.split(sizes, dim=0)), dims)

    def to_hf(self, megatron, dims):
        return [torch.cat(FuseQKV().to_hf(megatron, dims), dim=0)]


class GroupedQKV(Transform):
    """An HF fused qkv already in Megatron's per-group layout for the HF group count
    (GPT-BigCode c_attn, Falcon query_key_value): copied, with KV heads replicated as needed."""

    def to_megatron(self, hf, dims):
        (tensor,) = hf
        return replicate_kv(tensor, dims)

    def to_hf(self, megatron, dims):
        return [merge_kv(megatron, dims)]


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


class InterleavedGateUp(Transform):
    """SwiGLU's gate and up rows interleaved (gate 0, up 0, gate 1, up 1, ...: GPT-OSS's fused
    experts) <-> Megatron's [gate; up] in linear_fc1."""

    def to_megatron(self, hf, dims):
        (tensor,) = hf
        return torch.cat([tensor[0::2], tensor[1::2]])

    def to_hf(self, megatron, dims):
        gate, up = megatron.chunk(2, dim=0)
        return [torch.stack([gate, up], dim=1).reshape(megatron.shape)]


class Transposed(Transform):
    """An HF weight stored as x @ W ([in, out], GPT-OSS's experts) <-> Megatron's [out, in]
    linear weight, with `inner` applied to the [out, in] form."""

    def __init__(self, inner: Transform | None = None) -> None:
        self.inner = inner or Copy()

    def to_megatron(self, hf, dims):
        return self.inner.to_megatron([t.transpose(0, 1) for t in hf], dims).contiguous()

    def to_hf(self, megatron, dims):
        return [t.transpose(0, 1).contiguous() for t in self.inner.to_hf(megatron, dims)]


class StackedExperts(Transform):
    """A rule's HF tensors hold every expert of the layer stacked along dim 0 ([experts, ...]);
    `inner` maps one expert's slice to that expert's Megatron tensor. `bind` makes one binding
    per expert (Binding.expert); the engine slices on import and stacks the experts' slices
    again on export."""

    def __init__(self, inner: Transform) -> None:
        self.inner = inner

    def to_megatron(self, hf, dims):
        raise TypeError("StackedExperts is bound per expert: apply its `inner` to a slice")

    to_hf = to_megatron


# The transforms a family's rules name.
COPY = Copy()
VOCAB = Vocab()
QKV = FuseQKV()  # separate q, k, v
QKV_CONCAT = ConcatQKV()  # one HF tensor [all q; all k; all v]
QKV_GROUPED = GroupedQKV()  # one HF tensor already grouped per KV group
GATE_UP = GateUp()  # separate gate and up projections
# Experts stacked in one HF tensor per layer (GPT-OSS): x @ W weights [E, in, out], gate and up
# interleaved in the fused one; biases [E, out].
STACKED_GATE_UP = StackedExperts(Transposed(InterleavedGateUp()))
STACKED_GATE_UP_BIAS = StackedExperts(InterleavedGateUp())
STACKED_DOWN = StackedExperts(Transposed())
STACKED_DOWN_BIAS = StackedExperts(COPY)


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...] | str
    transform: Transform = COPY
    # Whether the rule applies to a given HF config (e.g. an untied lm_head).
    when: Callable[[dict[str, Any]], bool] | None = None
    # Of a `{layer}` rule: whether it applies to layer i of a given HF config (dense and
    # mixture-of-experts MLPs in one model).
    on_layer: Callable[[dict[str, Any], int], bool] | None = None

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)


def on_layers(rules: tuple[Rule, ...],
              on_layer: Callable[[dict[str, Any], int], bool]) -> tuple[Rule, ...]:
    """`rules` applying only to the layers `on_layer` accepts (see Rule.on_layer)."""
    return tuple(dataclasses.replace(r, on_layer=on_layer) for r in rules)


@dataclass(frozen=True)
class Binding:
    """A rule made concrete for one layer: these HF tensors <-> this Megatron tensor."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform
    # Of a StackedExperts rule: this expert's slice (dim 0) of the HF tensors, of num_experts.
    expert: int | None = None
    num_experts: int = 0


def bind(rules: tuple[Rule, ...], hf_config: dict[str, Any], num_layers: int,
         num_experts: int | None = None) -> list[Binding]:
    """Expand each applicable rule over its placeholders: `{layer}` over the decoder layers
    (those `on_layer` accepts), `{expert}` over all `num_experts` experts (every one of them:
    none may be left behind). A StackedExperts rule has `{expert}` on the Megatron side only:
    each expert's binding takes its slice of the stacked HF tensors, by the inner transform."""
    ranges = {"layer": range(num_layers), "expert": range(num_experts or 0)}
    bindings = []
    for rule in rules:
        if not isinstance(rule.transform, Transform):
            raise ValueError(f"rule for {rule.megatron}: {rule.transform!r} is not a transform "
                             "(models/weight_rules.py: COPY, VOCAB, QKV, QKV_CONCAT, ...)")
        if rule.when is not None and not rule.when(hf_config):
            continue
        keys = [k for k in ranges if "{" + k + "}" in rule.megatron]
        stacked = isinstance(rule.transform, StackedExperts)
        if stacked and "expert" not in keys:
            raise ValueError(f"rule {rule.megatron}: stacked experts need an {{expert}} "
                             "placeholder on the Megatron side")
        for name in rule.hf_names():
            if unmatched := [k for k in ranges if ("{" + k + "}" in name)
                             != (k in keys and not (stacked and k == "expert"))]:
                raise ValueError(f"rule {rule.megatron} <- {name}: placeholders {unmatched} "
                                 "appear on one side only")
        if rule.on_layer is not None and "layer" not in keys:
            raise ValueError(f"rule {rule.megatron} has on_layer but no {{layer}} placeholder")
        if "expert" in keys and not num_experts:
            raise ValueError(f"rule {rule.megatron} has an {{expert}} placeholder, but the model "
                             "has no experts")
        for values in itertools.product(*(ranges[k] for k in keys)):
            fmt = dict(zip(keys, values, strict=True))
            if rule.on_layer is not None and not rule.on_layer(hf_config, fmt["layer"]):
                continue
            bindings.append(
                Binding(
                    megatron=rule.megatron.format(**fmt),
                    hf=tuple(name.format(**fmt) for name in rule.hf_names()),
                    transform=rule.transform.inner if stacked else rule.transform,
                    expert=fmt["expert"] if stacked else None,
                    num_experts=num_experts or 0 if stacked else 0,
                )
            )
    return bindings
