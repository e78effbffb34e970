"""Megatron-LM's legacy checkpoints (`--ckpt-format torch`): one model_optim_rng.pt per
tensor-, pipeline- and expert-parallel rank, merged into the unsharded tensors the family
mappings describe, under Megatron-Core's local-spec names (Transformer Engine's and the legacy
models' names are renamed)."""

from __future__ import annotations

import argparse
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch

from megatron_patch.convert.megatron_lm.architecture import get_arg
from megatron_patch.convert.megatron_lm.locate import LEGACY_FILE
from megatron_patch.convert.megatron_lm.pickles import load_pickle

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def rank_files(iter_dir: str, args: argparse.Namespace) -> dict[tuple[int, int, int], str]:
    """(tp rank, pp rank, expert rank) -> the rank's model_optim_rng.pt, as Megatron-LM names
    them for the args' TP/PP/EP sizes; FileNotFoundError naming the first one missing."""
    tp = get_arg(args, "tensor_model_parallel_size", default=1)
    pp = get_arg(args, "pipeline_model_parallel_size", default=1)
    ep = get_arg(args, "expert_model_parallel_size", default=1)
    files = {}
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (
                    f"_{e:03d}" if ep > 1 else "")
                path = os.path.join(iter_dir, name, LEGACY_FILE)
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"{path} is missing (args: tensor_model_parallel_size={tp}, "
                        f"pipeline_model_parallel_size={pp}, expert_model_parallel_size={ep})")
                files[(t, p, e)] = path
    return files


# Megatron-Core's names for Transformer Engine's fused norm + linear -> the local spec's norms.
_TE_NAMES = (
    (".self_attention.linear_qkv.layer_norm_", ".input_layernorm."),
    (".mlp.linear_fc1.layer_norm_", ".pre_mlp_layernorm."),
)
# Megatron-LM's legacy models (`--use-legacy-models`; Pai-Megatron-Patch's classic checkpoints):
# the same tensors in the same layouts (checkpoint_version 3: q/k/v per group, SwiGLU's
# [gate; up] per rank) under other names, nested in dicts.
_LEGACY_NAMES = (
    (r"language_model\.embedding\.(word|position)_embeddings\.", r"embedding.\1_embeddings."),
    (r"language_model\.(?:encoder|transformer)\.layers\.(\d+)\.", r"decoder.layers.\1."),
    (r"language_model\.(?:encoder|transformer)\.final_(?:norm|layernorm)\.",
     "decoder.final_layernorm."),
    (r"language_model\.output_layer\.", "output_layer."),
    # The last pipeline stage's copy of the tied embedding.
    (r"word_embeddings_for_head\.", "output_layer."),
)
_LEGACY_LAYER_NAMES = (
    (r"input_(?:norm|layernorm)\.", "input_layernorm."),
    (r"self_attention\.query_key_value\.", "self_attention.linear_qkv."),
    (r"self_attention\.dense\.", "self_attention.linear_proj."),
    (r"post_attention_(?:norm|layernorm)\.", "pre_mlp_layernorm."),
    (r"mlp\.dense_h_to_4h\.", "mlp.linear_fc1."),
    (r"mlp\.dense_4h_to_h\.", "mlp.linear_fc2."),
)
# An expert's tensors: SequentialMLP's local_experts.J.linear_fc1.weight, or Transformer
# Engine's grouped linear_fc1.weightJ; J counts the experts of this expert-parallel rank.
_EXPERT = re.compile(r"(.*\.mlp\.experts\.)(?:local_experts\.(\d+)\.(\w+)\.(\w+)"
                     r"|(\w+)\.(weight|bias)(\d+))")
_SPLIT_ROWS = re.compile(r"(embedding\.word_embeddings|output_layer)\.weight"
                         r"|.*\.(linear_qkv|linear_fc1)\.(weight|bias)")
_SPLIT_COLUMNS = re.compile(r".*\.(linear_proj|linear_fc2)\.weight")


def _local_name(name: str) -> str:
    """A Megatron-Core (TE or local spec) or legacy-model name -> the local spec's."""
    for te, local in _TE_NAMES:
        name = name.replace(te, local)
    for pattern, replacement in _LEGACY_NAMES:
        renamed = re.sub("^" + pattern, replacement, name)
        if renamed != name and renamed.startswith("decoder.layers."):
            layer, rest = renamed[len("decoder.layers."):].split(".", 1)
            for old, new in _LEGACY_LAYER_NAMES:
                rest = re.sub("^" + old, new, rest)
            return f"decoder.layers.{layer}.{rest}"
        if renamed != name:
            return renamed
    return name


def _flat(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """A legacy model's nested state dict ({'language_model': {'embedding': ...}}) as dotted
    names; a Megatron-Core one is flat already."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _chunks(state: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """The model chunks of one rank file: `model`, or `model0`, `model1`, ... (virtual
    pipeline stages), in order."""
    if "model" in state:
        return [state["model"]]
    keys = sorted((k for k in state if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
    if not keys:
        raise ValueError(f"{path}: no `model` state (keys: {sorted(state)})")
    return [state[k] for k in keys]


def _global_expert(name: str, first_expert: int) -> str:
    """An expert tensor's name with the global expert number, SequentialMLP's spelling."""
    m = _EXPERT.fullmatch(name)
    if m is None:
        return name
    prefix, local, linear, param, te_linear, te_param, te_local = m.groups()
    if local is None:
        local, linear, param = te_local, te_linear, te_param
    return f"{prefix}local_experts.{first_expert + int(local)}.{linear}.{param}"


def _rank_weights(path: str, trust_pickle: bool, first_expert: int = 0) -> list[
        dict[str, torch.Tensor]]:
    """Each model chunk of a rank file as {local-spec name: tensor} (extra states dropped),
    its experts numbered from `first_expert`. Names the local spec does not have are left as
    they are, for the model check to name."""
    chunks = []
    for chunk in _chunks(load_pickle(path, trust_pickle, mmap=True), path):
        weights = {}
        for name, value in _flat(chunk):
            if name.endswith("_extra_state"):
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{path}: model entry {name} is a {type(value).__name__}, "
                                 "not a tensor")
            weights[_global_expert(_local_name(name), first_expert)] = value
        chunks.append(weights)
    return chunks


def _merge(name: str, parts: list[tuple[str, torch.Tensor]], gated: bool) -> torch.Tensor:
    """One tensor from its TP ranks' parts (file, tensor), along its parallel dimension."""
    shapes = {tuple(t.shape) for _, t in parts}
    if len(shapes) != 1:
        listed = ", ".join(f"{path}: {tuple(t.shape)}" for path, t in parts)
        raise ValueError(f"tensor {name} has different shapes across tensor-parallel ranks "
                         f"({listed})")
    tensors = [t for _, t in parts]
    if len(tensors) == 1:
        return tensors[0]
    if _SPLIT_COLUMNS.fullmatch(name):
        return torch.cat(tensors, dim=1)
    if not _SPLIT_ROWS.fullmatch(name):
        return tensors[0]  # replicated (norms, row-parallel biases, positions)
    if gated and ".linear_fc1." in name:
        # SwiGLU: each rank holds [its gate rows; its up rows].
        halves = [t.chunk(2, dim=0) for t in tensors]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    # Fused q/k/v: each rank holds whole query groups, in order, so rank order is group order.
    return torch.cat(tensors, dim=0)


def read_legacy(iter_dir: str, args: argparse.Namespace, trust_pickle: bool = False) -> dict[
        str, torch.Tensor]:
    """The unsharded weights of a legacy checkpoint, by Megatron-Core local-spec name, layers
    and experts numbered globally. Tensors of TP=1 files stay mapped from the files until
    read."""
    files = rank_files(iter_dir, args)
    tp, pp, ep = (max(key[i] for key in files) + 1 for i in range(3))
    if ep > 1 or getattr(args, "num_experts", None):
        etp = get_arg(args, "expert_tensor_parallel_size", default=tp)
        if etp != tp:
            raise ValueError(f"{iter_dir}: args expert_tensor_parallel_size={etp} differs from "
                             f"tensor_model_parallel_size={tp}: not supported")
    local_experts = (getattr(args, "num_experts", None) or ep) // ep
    # by_stage[(chunk, pp rank)][expert rank] = [(file, weights) for each tp rank, in order]
    by_stage: dict[tuple[int, int], dict[int, list[tuple[str, dict[str, torch.Tensor]]]]] = (
        defaultdict(lambda: defaultdict(list)))
    for (_, p, e), path in sorted(files.items()):
        for v, weights in enumerate(_rank_weights(path, trust_pickle, e * local_experts)):
            by_stage[(v, p)][e].append((path, weights))
    vpp = max(v for v, _ in by_stage) + 1
    merged: dict[str, torch.Tensor] = {}
    offset = 0
    gated = bool(getattr(args, "swiglu", False))
    # Megatron-LM gives global model chunk v * PP + p the layers after those of the chunks
    # before it (also with uneven first/last stages).
    for v in range(vpp):
        for p in range(pp):
            layers: list[int] = []
            for e in range(ep):
                ranks = by_stage.get((v, p), {}).get(e, [])
                if len(ranks) != tp:
                    raise ValueError(f"{iter_dir}: model chunk {v} of pipeline rank {p} is in "
                                     f"{len(ranks)} of the {tp} tensor-parallel rank files")
                names = set(ranks[0][1])
                for path, weights in ranks[1:]:
                    if diff := names ^ set(weights):
                        raise ValueError(f"{path} and {ranks[0][0]} hold different tensors: "
                                         f"{sorted(diff)[:10]}")
                if e == 0:
                    layers = sorted({int(m.group(1)) for n in names
                                     if (m := _LAYER.fullmatch(n))})
                    if layers != list(range(len(layers))):
                        raise ValueError(f"{ranks[0][0]}: decoder layers {layers} are not "
                                         "numbered 0, 1, ... within the stage")
                for name in sorted(names):
                    if e > 0 and not _EXPERT.fullmatch(name):
                        continue  # the same on every expert-parallel rank: taken from rank 0
                    m = _LAYER.fullmatch(name)
                    full = f"decoder.layers.{offset + int(m.group(1))}.{m.group(2)}" if m else name
                    if full in merged:
                        raise ValueError(f"{ranks[0][0]}: {name} is also in another pipeline "
                                         "or expert-parallel rank's file")
                    merged[full] = _merge(full, [(path, w[name]) for path, w in ranks], gated)
            offset += len(layers)
    if offset != args.num_layers:
        raise ValueError(f"{iter_dir}: the rank files hold {offset} decoder layers, args "
                         f"num_layers={args.num_layers}")
    return merged
