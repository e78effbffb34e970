"""HF directory <-> Megatron-Core checkpoint, for every registered family."""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import torch
from tqdm import tqdm

from megatron_patch import checkpoint, parallel
from megatron_patch.convert import engine, hf_io
from megatron_patch.convert.mapping import Dims, bind
from megatron_patch.models import (
    build_model,
    family_for,
    load_hf_config,
    pad_vocab_size,
    transformer_config,
)
from megatron_patch.models.spec import ModelArgs

log = logging.getLogger(__name__)


def _dims(args: ModelArgs, padded_vocab_size: int) -> Dims:
    return Dims(num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
                num_query_groups=args.num_query_groups, kv_channels=args.kv_channels,
                vocab_size=args.vocab_size, padded_vocab_size=padded_vocab_size)


def hf_expected_shapes(hf_config: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes save_pretrained would write, where transformers knows the architecture
    natively (None for remote-code models). Built on the meta device: no memory is used."""
    import transformers

    arch = (hf_config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch or "", None)
    if cls is None:
        return None
    config_cls = transformers.AutoConfig.for_model(hf_config["model_type"]).__class__
    config = config_cls.from_dict(hf_config)
    with torch.device("meta"):
        model = cls(config)
    shapes, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # tied weights are saved once
            continue
        seen.add(id(tensor))
        shapes[name] = tuple(tensor.shape)
    return shapes


def _single_process_model(args: ModelArgs, hf_config: dict[str, Any], dtype: torch.dtype,
                          padded_vocab_size: int):
    """An unsharded model whose parameters act as the schema (names, shapes) of the checkpoint."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise RuntimeError("conversion runs in a single process; do not start it with torchrun")
    parallel.initialize(1, 1)
    config = transformer_config(args, params_dtype=dtype, perform_initialization=False)
    return build_model(args, config, hf_config, padded_vocab_size=padded_vocab_size)


def _source_dtype(reader: hf_io.HFCheckpointReader, names: list[str]) -> torch.dtype:
    dtypes = {reader.dtype(n) for n in names if reader.dtype(n).is_floating_point}
    if len(dtypes) != 1:
        raise ValueError(f"{reader.path}: tensors have several dtypes {sorted(map(str, dtypes))}; "
                         "pass params_dtype to choose one")
    return dtypes.pop()


def _progress(total_bytes: int, desc: str) -> tqdm:
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, mininterval=1.0)


def hf_to_megatron(hf_dir: str, out_dir: str, *, make_vocab_size_divisible_by: int = 128,
                   tensor_model_parallel_size: int = 1, extra_vocab_size: int = 0,
                   params_dtype: torch.dtype | None = None) -> checkpoint.CheckpointMeta:
    """Convert an HF model directory into a Megatron-Core checkpoint that loads at any TP/PP."""
    hf_config = load_hf_config(hf_dir)
    family = family_for(hf_config)
    args = family.model_args(hf_config)
    padded = pad_vocab_size(args.vocab_size + extra_vocab_size,
                            make_vocab_size_divisible_by * tensor_model_parallel_size)
    reader = hf_io.HFCheckpointReader(hf_dir)
    bindings = bind(family.weights, hf_config, args.num_layers)
    hf_names = reader.names()
    # Name accounting on the HF side first: it needs no model.
    engine.check_names(bindings, source=hf_names,
                       target=[b.megatron for b in bindings], direction="hf->megatron",
                       ignore=family.hf_ignore)
    expected_hf = hf_expected_shapes(hf_config)
    if expected_hf is not None:
        engine.check_shapes({n: reader.shape(n) for n in hf_names}, expected_hf, hf_dir)
    dtype = params_dtype or _source_dtype(reader, [n for b in bindings for n in b.hf])

    model = _single_process_model(args, hf_config, dtype, padded)
    params = {n: p for n, p in model.state_dict(keep_vars=True).items()
              if not n.endswith("_extra_state")}
    engine.check_names(bindings, source=hf_names, target=params, direction="hf->megatron",
                       ignore=family.hf_ignore)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    total = sum(p.numel() * dtype.itemsize for p in params.values())
    with _progress(total, "hf->megatron") as bar:
        for name, tensor in engine.hf_to_megatron(bindings, _dims(args, padded), reader.read,
                                                  shapes):
            params[name].data = tensor.to(dtype)
            bar.update(tensor.numel() * dtype.itemsize)
    reader.close()

    os.makedirs(out_dir, exist_ok=True)
    hf_io.copy_non_weight_files(hf_dir, os.path.join(out_dir, checkpoint.HF_DIR))
    meta = checkpoint.CheckpointMeta(
        architecture=hf_config["architectures"][0], vocab_size=args.vocab_size,
        padded_vocab_size=padded, dtype=str(dtype).removeprefix("torch."),
    )
    checkpoint.write_meta(out_dir, meta)
    checkpoint.save(out_dir, "release", checkpoint.model_state(model))
    log.info("wrote %s (padded vocab %d, %s)", out_dir, padded, meta.dtype)
    return meta


def megatron_to_hf(ckpt_dir: str, out_dir: str, *, max_shard_size: int | str = "5GB",
                   iteration: int | str | None = None) -> list[str]:
    """Export a Megatron-Core checkpoint (any iteration, any layout it was saved at) to HF."""
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    meta = checkpoint.read_meta(ckpt_dir)
    hf_config = load_hf_config(os.path.join(ckpt_dir, checkpoint.HF_DIR))
    family = family_for(hf_config)
    args = family.model_args(hf_config)
    model = _single_process_model(args, hf_config, meta.torch_dtype, meta.padded_vocab_size)
    checkpoint.load_model(ckpt_dir, model, iteration)
    state = {n: t for n, t in model.state_dict().items() if not n.endswith("_extra_state")}

    bindings = bind(family.weights, hf_config, args.num_layers)
    expected_hf = hf_expected_shapes(hf_config)
    target = expected_hf if expected_hf is not None else [n for b in bindings for n in b.hf]
    engine.check_names(bindings, source=state, target=target, direction="megatron->hf")

    staging = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    hf_io.copy_non_weight_files(os.path.join(ckpt_dir, checkpoint.HF_DIR), staging)
    _ensure_generation_config(staging, hf_config)
    total = sum(t.numel() * meta.torch_dtype.itemsize for t in state.values())
    tensors = engine.megatron_to_hf(bindings, _dims(args, meta.padded_vocab_size),
                                    state.__getitem__, expected_hf)
    with _progress(total, "megatron->hf") as bar:
        files = hf_io.write_safetensors_shards(
            staging, ((n, t.to(meta.torch_dtype)) for n, t in tensors), max_shard_size, bar
        )
    if os.path.exists(out_dir):
        os.rmdir(out_dir)
    os.replace(staging, out_dir)
    return files


def _ensure_generation_config(out_dir: str, hf_config: dict[str, Any]) -> None:
    """save_pretrained writes generation_config.json; derive it from config.json if absent."""
    path = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(path):
        return
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if hf_config.get(k) is not None}
    with open(path, "w") as f:
        json.dump(generation, f, indent=2)
        f.write("\n")
