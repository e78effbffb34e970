"""HF directory <-> Megatron-Core checkpoint, for every registered family."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
from tqdm import tqdm

from megatron_patch import checkpoint, parallel
from megatron_patch.convert import distcp, engine, fast_path, fp8, hf_io, mxfp4
from megatron_patch.convert.file_regions import FileRegions
from megatron_patch.convert.saved_parts import (
    concatenates,
    fill_parts,
    is_whole,
    parameters,
    region,
    saved_state,
    views_are_pieces,
)
from megatron_patch.models import build_stages, family_for, load_hf_config, pad_vocab_size
from megatron_patch.models.spec import ModelArgs
from megatron_patch.models.weight_rules import Binding, Dims, bind

log = logging.getLogger(__name__)


def model_dims(args: ModelArgs, padded_vocab_size: int) -> Dims:
    return Dims(num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
                num_query_groups=args.num_query_groups, kv_channels=args.kv_channels,
                vocab_size=args.vocab_size, padded_vocab_size=padded_vocab_size,
                kv_replicas=args.kv_replicas)


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
    state = model.state_dict(keep_vars=True)
    # transformers 5 fuses some weights in memory (MoE experts into one 3-D tensor) and
    # save_pretrained splits them back into the checkpoint's names: expect those. (Only where
    # such a tensor exists: building transformers' conversion table takes ~0.2 s.)
    if any(t.dim() > 2 for t in state.values()):
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    shapes, seen = {}, set()
    for name, tensor in state.items():
        if id(tensor) in seen:  # tied weights are saved once
            continue
        seen.add(id(tensor))
        shapes[name] = tuple(tensor.shape)
    return shapes


def check_hf_source(reader: hf_io.HFCheckpointReader, hf_config: dict[str, Any],
                    bindings: list[Binding], ignore: tuple[str, ...]) -> None:
    """Name accounting on the HF side (it needs no model), and the shapes transformers expects."""
    hf_names = reader.names()
    engine.check_names(bindings, source=hf_names, target=[b.megatron for b in bindings],
                       direction="hf->megatron", ignore=ignore)
    expected_hf = hf_expected_shapes(hf_config)
    if expected_hf is not None:
        engine.check_shapes({n: reader.shape(n) for n in hf_names}, expected_hf, reader.path)


def single_process_model(hf_config: dict[str, Any], dtype: torch.dtype,
                          padded_vocab_size: int, args: ModelArgs | None = None):
    """An unsharded model whose parameters act as the schema (names, shapes) of the checkpoint."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise RuntimeError("conversion runs in a single process; do not start it with torchrun")
    parallel.initialize(1, 1)
    # The local implementation's parameter names are what the weight mappings describe.
    (model,) = build_stages(hf_config, padded_vocab_size, params_dtype=dtype,
                            transformer_impl="local", args=args,
                            perform_initialization=False).chunks
    return model


# Megatron-Core keeps these in fp32 whatever the model's dtype (the router's expert bias, so that
# its updates from the expert loads are not rounded away); DeepSeek-V3's HF checkpoints store its
# e_score_correction_bias in fp32 beside bf16 weights likewise. They are converted, saved and
# exported in fp32, and do not decide the checkpoint's dtype.
FP32_TENSORS = ("router.expert_bias",)


def _source_dtype(reader: hf_io.HFCheckpointReader, bindings: list[Binding]) -> torch.dtype:
    """The one floating dtype of the checkpoint's weights (FP32_TENSORS aside)."""
    names = [n for b in bindings if not b.megatron.endswith(FP32_TENSORS) for n in b.hf]
    dtypes = {reader.dtype(n) for n in names if reader.dtype(n).is_floating_point}
    if len(dtypes) != 1:
        raise ValueError(f"{reader.path}: tensors have several dtypes {sorted(map(str, dtypes))}; "
                         "pass params_dtype to choose one")
    return dtypes.pop()


@contextlib.contextmanager
def progress_bar(total_bytes: int, desc: str) -> Iterator[tqdm]:
    """A byte progress bar that ends at 100% of what was written: `total_bytes` is an estimate
    (export drops the padded vocabulary rows it counts)."""
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, mininterval=1.0) as bar:
        yield bar
        bar.total = bar.n


def hf_to_megatron(hf_dir: str, out_dir: str, *, make_vocab_size_divisible_by: int = 128,
                   tensor_model_parallel_size: int = 1, extra_vocab_size: int = 0,
                   params_dtype: torch.dtype | None = None) -> checkpoint.CheckpointMeta:
    """Convert an HF model directory into a Megatron-Core checkpoint that loads at any TP/PP.
    out_dir must not exist or be empty; it appears only once complete."""
    hf_io.check_output_dir(out_dir)
    hf_config = load_hf_config(hf_dir)
    family = family_for(hf_config)
    args = family.model_args(hf_config)
    padded = pad_vocab_size(args.vocab_size + extra_vocab_size,
                            make_vocab_size_divisible_by * tensor_model_parallel_size)
    reader = hf_io.HFCheckpointReader(hf_dir)
    reader.check_finite(reader.names())
    quant = fp8.quantization(hf_config, hf_dir)
    if quant is not None:
        # Read dequantised; the converted checkpoint (and its config) is unquantised.
        reader = (mxfp4.DequantizingReader(reader) if quant["quant_method"] == "mxfp4"
                  else fp8.DequantizingReader(reader, quant))
        hf_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    bindings = bind(family.weights, hf_config, args.num_layers, args.num_moe_experts)
    hf_names = reader.names()
    raw_names = reader.raw_names() if quant is not None else hf_names
    kept = family.kept_names(hf_config, raw_names)
    ignore = family.hf_ignore + tuple(re.escape(n) for n in kept)
    check_hf_source(reader, hf_config, bindings, ignore)
    dtype = params_dtype or _source_dtype(reader, bindings)

    model = single_process_model(hf_config, dtype, padded)
    params = parameters(model)
    engine.check_names(bindings, source=hf_names, target=params, direction="hf->megatron",
                       ignore=ignore)
    state = _converted_state(model, params, bindings, reader, model_dims(args, padded), dtype)
    meta = checkpoint.CheckpointMeta(
        architecture=hf_config["architectures"][0], vocab_size=args.vocab_size,
        padded_vocab_size=padded, dtype=str(dtype).removeprefix("torch."),
    )
    _write_checkpoint(out_dir, hf_dir, state, meta, reader, kept,
                      hf_config if quant is not None else None)
    log.info("wrote %s (padded vocab %d, %s)", out_dir, padded, meta.dtype)
    return meta


def _converted_state(model, params: dict[str, torch.Tensor], bindings: list[Binding],
                     reader: hf_io.HFCheckpointReader, dims: Dims,
                     dtype: torch.dtype) -> dict[str, Any]:
    """The model's sharded state dict for saving, each ShardedTensor given its converted tensor
    (read from `reader` through `bindings`)."""
    # The checkpoint is written from `state`'s ShardedTensors, not from the model: each is given
    # its converted tensor below, while the model's own parameters stay as allocated, never
    # touched (so they take no memory). Memory-mapped input tensors go to the writer uncopied.
    state, parts = saved_state(model, params)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    direct: list[Binding] = []
    rest: list[Binding] = []
    for b in bindings:
        pieces = [reader.shape(n) for n in b.hf]
        views = [sh.data for sh in parts[b.megatron]]
        (direct if views_are_pieces(b, pieces, params[b.megatron], views) else rest).append(b)
    with progress_bar(total, "hf->megatron") as bar:
        # Inputs that are exactly the parts a parameter is saved in are saved as they are, never
        # concatenated (and then cut apart again by Megatron-Core's writer).
        for b in direct:
            for sh, name in zip(parts[b.megatron], b.hf, strict=True):
                sh.data = reader.read(name).to(params[b.megatron].dtype)
                bar.update(sh.data.numel() * sh.data.element_size())
        # Parameters saved whole take their rows from the input files as they are written.
        whole = {n for n, pieces in parts.items() if len(pieces) == 1 and params[n].dtype == dtype
                 and is_whole(pieces[0].data, params[n])}
        gather = fast_path.gather_from_files(reader.regions, dtype, "hf->megatron", whole)
        for name, tensor in engine.hf_to_megatron(rest, dims, reader.read, shapes,
                                                  gather):
            fill_parts(parts[name], params[name], tensor.to(params[name].dtype))
            bar.update(tensor.numel() * params[name].element_size())

    return state


def _write_checkpoint(out_dir: str, hf_dir: str, state: dict[str, Any],
                      meta: checkpoint.CheckpointMeta, reader: hf_io.HFCheckpointReader,
                      kept: list[str], dequantised_config: dict[str, Any] | None) -> None:
    """The converted checkpoint, built in a staging directory (weights first) that appears in
    one rename: `state`, the HF files of `hf_dir` (the config without its quantisation where
    `dequantised_config` is given), the HF tensors `kept` beside it, our meta. Closes `reader`."""
    # Everything is built in the staging directory, weights first, and appears in one rename.
    with hf_io.staged(out_dir) as staging:
        staged_hf = os.path.join(staging, checkpoint.HF_DIR)
        # Input tensors that go out unchanged are copied from the input files (file_regions).
        try:
            checkpoint.save(staging, "release", state,
                            sharded_strategy=distcp.UnsyncedSave(regions=reader.regions))
            hf_io.copy_non_weight_files(hf_dir, staged_hf)
            if kept:
                from safetensors.torch import save_file

                log.info("keeping %d HF tensors the Megatron model does not hold in %s/%s",
                         len(kept), checkpoint.HF_DIR, hf_io.UNCONVERTED)
                read_raw = reader.read_raw if dequantised_config is not None else reader.read
                save_file({n: read_raw(n).contiguous() for n in kept},
                          os.path.join(staged_hf, hf_io.UNCONVERTED), metadata={"format": "pt"})
        finally:
            reader.close()
        if dequantised_config is not None:
            with open(os.path.join(staged_hf, "config.json"), "w") as f:
                json.dump(dequantised_config, f, indent=2)
        checkpoint.write_meta(staging, meta)


def megatron_to_hf(ckpt_dir: str, out_dir: str, *, max_shard_size: int | str = "5GB",
                   iteration: int | str | None = None) -> list[str]:
    """Export a Megatron-Core checkpoint (any iteration, any layout it was saved at) to HF.

    max_shard_size: the largest safetensors file, in decimal units as transformers reads it
    ("5GB" is 5 * 10**9 bytes). The default "5GB" is transformers 4.x's save_pretrained
    default; 5.x's is "50GB", which keeps models up to ~25B fp16 parameters in one file.
    """
    hf_io.check_output_dir(out_dir)
    # Its pickles are verified before anything reads them.
    stored_dir = checkpoint.existing_iteration_dir(ckpt_dir, iteration)
    meta = checkpoint.read_meta(ckpt_dir)
    hf_config = load_hf_config(os.path.join(ckpt_dir, checkpoint.HF_DIR))
    family = family_for(hf_config)
    args = family.model_args(hf_config)
    dims = model_dims(args, meta.padded_vocab_size)
    dtype = meta.torch_dtype
    model = single_process_model(hf_config, dtype, meta.padded_vocab_size)
    params = parameters(model)

    bindings, expected_hf = export_bindings(family, args, hf_config, params)

    stored = distcp.MappedCheckpoint(stored_dir)
    mapped = _mapped_parts(stored, model, params)
    if mapped is not None:
        tensors = _export_mapped(bindings, dims, params, mapped, expected_hf, stored.regions)
    else:  # stored in other pieces (another TP/PP): Megatron-Core reassembles them
        checkpoint.load_model(ckpt_dir, model, iteration)
        tensors = engine.megatron_to_hf(bindings, dims, lambda n: params[n].detach(), expected_hf)

    with hf_io.staged(out_dir) as staging:
        hf_io.copy_non_weight_files(os.path.join(ckpt_dir, checkpoint.HF_DIR), staging)
        ensure_generation_config(staging, hf_config)
        unconverted = os.path.join(staging, hf_io.UNCONVERTED)
        if os.path.isfile(unconverted):
            from safetensors.torch import load_file

            # Written back into the weights as they came (not trained: Megatron-Core never held
            # them); the file itself is not part of an HF model directory.
            tensors = itertools.chain(tensors, load_file(unconverted).items())
            os.remove(unconverted)
        total = sum(p.numel() * p.element_size() for p in params.values())
        with progress_bar(total, "megatron->hf") as bar:
            with stored.regions:  # stored chunks go out unchanged: copied from the files
                files = hf_io.write_safetensors_shards(staging, tensors, max_shard_size, bar,
                                                       regions=stored.regions)
    return files


def export_bindings(family, args: ModelArgs, hf_config: dict[str, Any],
                    params: dict[str, torch.Tensor]) -> tuple[
                        list[Binding], dict[str, tuple[int, ...]] | None]:
    """The export's bindings, checked by name against the model's parameters and the HF
    tensors transformers expects, in save_pretrained's order; and those expected shapes."""
    bindings = bind(family.weights, hf_config, args.num_layers, args.num_moe_experts)
    expected_hf = hf_expected_shapes(hf_config)
    target = expected_hf if expected_hf is not None else [n for b in bindings for n in b.hf]
    engine.check_names(bindings, source=params, target=target, direction="megatron->hf")
    return in_save_order(bindings, None if expected_hf is None else list(expected_hf)), (
        expected_hf)


def _mapped_parts(stored: distcp.MappedCheckpoint, model, params: dict[str, torch.Tensor]
                  ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None:
    """For each parameter, (view of the parameter, its bytes in the mapped checkpoint) for every
    piece it is saved in, where every piece is stored whole; else None."""
    mapped: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, pieces in saved_state(model, params)[1].items():
        mapped[name] = []
        for sh in pieces:
            if sh.flattened_range is not None:
                return None
            sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            data = stored.chunk_bytes(sh.key, tuple(sh.global_offset), sizes, params[name].dtype)
            if data is None:
                return None
            mapped[name].append((sh.data, data.view(*sh.data.shape, sh.data.element_size())))
    return mapped


def _export_mapped(bindings: list[Binding], dims: Dims, params: dict[str, torch.Tensor],
                   mapped: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
                   expected_hf: dict[str, tuple[int, ...]] | None,
                   regions: FileRegions) -> Iterator[
                       tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every binding, computed on the mapped checkpoint's bytes (see
    distcp: the transforms only rearrange whole elements); a tensor that is a stored piece as
    it is, or a block of rows of one, is never copied, and one whose rows move (q, k and v
    out of the fused qkv) is gathered from the file as it is written (`regions`)."""
    gather = fast_path.gather_from_files(regions, torch.uint8, "megatron->hf")
    stacks = engine.ExpertStacks()
    for b in bindings:
        param, pieces = params[b.megatron], mapped[b.megatron]
        # Bytes: each element one row of element_size() bytes (its own dtype: FP32_TENSORS).
        byte_shapes = {n: (*expected_hf[n], param.element_size())
                       for n in b.hf if expected_hf and n in expected_hf}
        views = [view for view, _ in pieces]
        hf_shapes = [tuple(t.shape) for t in b.transform.to_hf(param.to("meta"), dims)] if (
            concatenates(b)) else []
        if views_are_pieces(b, hf_shapes, param, views):
            engine.check_shapes(dict(zip(b.hf, hf_shapes, strict=True)), expected_hf or {},
                                b.megatron)
            outputs = zip(b.hf, (data for _, data in pieces), strict=True)
        else:
            whole = _whole_bytes(param, pieces)
            outputs = engine.megatron_to_hf([b], dims, lambda _, whole=whole: whole, byte_shapes,
                                            gather, stacks)
        for name, data in outputs:
            # Viewed as its dtype for the writer only, which copies raw bytes (no alignment).
            yield name, data.contiguous().view(param.dtype).squeeze(-1)
    stacks.check_complete()


def _whole_bytes(param: torch.Tensor, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> (
        torch.Tensor):
    """The bytes of a whole parameter (shape + (element size,)) from the pieces it is saved
    in: the piece itself where there is one, else the pieces put in their places."""
    size = param.element_size()
    if len(pieces) == 1 and is_whole(pieces[0][0], param):
        return pieces[0][1]
    if not param.is_contiguous():
        raise engine.ConversionError("a parameter saved in pieces must be contiguous")
    whole = torch.empty(*param.shape, size, dtype=torch.uint8)
    for view, data in pieces:
        region(whole, param, view).copy_(data)
    return whole


def _natural_key(name: str) -> tuple:
    """'model.layers.10.x' sorts after 'model.layers.9.x'. (re.split with a group alternates
    text and digits, so equal positions always hold the same type.)"""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name)))


def in_save_order(bindings: list[Binding], hf_order: list[str] | None) -> list[Binding]:
    """The bindings in the order save_pretrained writes their tensors, so that each shard holds
    whole layers: by the first place any of a binding's HF names has in `hf_order` (the HF
    model's state-dict order, where transformers knows the model), else by layer, naturally."""
    if hf_order is None:
        return sorted(bindings, key=lambda b: min(_natural_key(n) for n in b.hf))
    position = {name: i for i, name in enumerate(hf_order)}
    return sorted(bindings, key=lambda b: min(position[n] for n in b.hf))


def ensure_generation_config(out_dir: str, hf_config: dict[str, Any]) -> None:
    """save_pretrained writes generation_config.json; derive it from config.json if absent."""
    path = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(path):
        return
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if hf_config.get(k) is not None}
    with open(path, "w") as f:
        json.dump(generation, f, indent=2)
        f.write("\n")
