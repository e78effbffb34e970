"""A Megatron-LM checkpoint loaded into a single-process Megatron-Core model (`load`), and the
commands built on it: `convert megatron-to-hf` (`export_to_hf`) and `convert import-megatron`
(`import_megatron`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from megatron_patch import checkpoint
from megatron_patch.convert import engine, hf_io
from megatron_patch.convert.megatron_lm.architecture import architecture, dtype_of
from megatron_patch.convert.megatron_lm.legacy import read_legacy
from megatron_patch.convert.megatron_lm.locate import COMMON_FILE, iteration_of, locate, read_args
from megatron_patch.convert.megatron_lm.pickles import pickle_globals
from megatron_patch.models import family_for
from megatron_patch.models.weight_rules import replicate_kv

# Function-level imports: convert.hf_megatron, convert.saved_parts and convert.distcp import
# megatron.core; reading a Megatron-LM checkpoint's arguments (locate, architecture) does not
# need it.

log = logging.getLogger(__name__)


def load(src: str, *, iteration: int | str | None = None, hf_config_path: str | None = None,
         tokenizer_dir: str | None = None, trust_pickle: bool = False) -> tuple[
             Any, dict[str, Any], int, torch.dtype]:
    """A single-process Megatron-Core model holding the checkpoint's weights:
    (model, HF config, padded vocabulary size, dtype)."""
    from megatron_patch.convert.hf_megatron import model_dims, single_process_model
    from megatron_patch.convert.saved_parts import parameters

    iter_dir, layout = locate(src, iteration)
    args, args_file = read_args(iter_dir, layout, trust_pickle)
    hf_config = architecture(args, args_file, hf_config_path, tokenizer_dir)
    model_args = family_for(hf_config).model_args(hf_config)
    padded = args.padded_vocab_size
    log.info("%s: %s checkpoint, %s", iter_dir, layout, hf_config["architectures"][0])

    if layout == "torch_dist":
        dtype = dtype_of(args)
        # Megatron-LM's model has one KV group where this one holds copies of it (multi-query).
        model = single_process_model(hf_config, dtype, padded,
                                      args=replace(model_args, kv_replicas=1))
        common = os.path.join(iter_dir, COMMON_FILE)
        # Megatron-Core's loader reads common.pt with torch.load's weights_only default; the
        # allow-list checked above applies to that call only.
        with torch.serialization.safe_globals(pickle_globals(common, trust_pickle)):
            checkpoint.load_model(os.path.dirname(os.path.abspath(iter_dir)), model,
                                  iteration_of(iter_dir))
        if model_args.kv_replicas == 1:
            return model, hf_config, padded, dtype
        weights = {n: p.detach() for n, p in parameters(model).items()}
    else:
        weights, dtype = _legacy_weights(iter_dir, args, model_args, trust_pickle)
    if model_args.kv_replicas > 1:
        # Megatron-LM's one KV group -> this model's identical copies (weight_rules.replicate_kv).
        for name in [n for n in weights if ".linear_qkv." in n]:
            weights[name] = replicate_kv(weights[name], model_dims(model_args, padded))
    model = single_process_model(hf_config, dtype, padded)
    params = parameters(model)
    missing, unknown = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unknown:
        raise ValueError(f"{iter_dir}: the rank files do not hold this model's tensors: missing "
                         f"{missing[:10]}, unexpected {unknown[:10]}")
    engine.check_shapes({n: tuple(t.shape) for n, t in weights.items()},
                        {n: tuple(p.shape) for n, p in params.items()}, iter_dir)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    return model, hf_config, padded, dtype


def _legacy_weights(iter_dir: str, args: argparse.Namespace, model_args,
                    trust_pickle: bool) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """The merged weights of a legacy checkpoint (the tied head's copy dropped) and their
    one floating-point dtype."""
    weights = read_legacy(iter_dir, args, trust_pickle)
    if model_args.share_embeddings_and_output_weights and "output_layer.weight" in weights:
        # The last pipeline stage's copy of the tied embedding (kept equal by Megatron-LM).
        head = weights.pop("output_layer.weight")
        if not torch.equal(head, weights["embedding.word_embeddings.weight"]):
            log.warning("%s: the last stage's copy of the tied embedding differs from the "
                        "first stage's; the first stage's is kept", iter_dir)
    dtypes = {t.dtype for t in weights.values() if t.dtype.is_floating_point}
    if len(dtypes) != 1:
        raise ValueError(f"{iter_dir}: weights have several dtypes "
                         f"{sorted(map(str, dtypes))}")
    return weights, dtypes.pop()


def _write_hf_files(out_dir: str, hf_config: dict[str, Any], dtype: torch.dtype,
                    tokenizer_dir: str | None) -> None:
    """config.json (with the dtype), the tokenizer's files and generation_config.json."""
    from megatron_patch.convert.hf_megatron import ensure_generation_config

    os.makedirs(out_dir, exist_ok=True)
    if tokenizer_dir:
        hf_io.copy_non_weight_files(tokenizer_dir, out_dir)
    config = dict(hf_config, torch_dtype=str(dtype).removeprefix("torch."))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    ensure_generation_config(out_dir, config)


def _hf_tensors(model, hf_config: dict[str, Any], padded: int) -> Iterator[
        tuple[str, torch.Tensor]]:
    from megatron_patch.convert.hf_megatron import export_bindings, model_dims
    from megatron_patch.convert.saved_parts import parameters

    family = family_for(hf_config)
    args = family.model_args(hf_config)
    params = parameters(model)
    bindings, expected = export_bindings(family, args, hf_config, params)
    return engine.megatron_to_hf(bindings, model_dims(args, padded), lambda n: params[n].detach(),
                                 expected)


def export_to_hf(src: str, out_dir: str, *, iteration: int | str | None = None,
                 hf_config_path: str | None = None, tokenizer_dir: str | None = None,
                 trust_pickle: bool = False, max_shard_size: int | str = "5GB") -> list[str]:
    """A Megatron-LM checkpoint -> an HF model directory."""
    from megatron_patch.convert.hf_megatron import progress_bar

    hf_io.check_output_dir(out_dir)
    model, hf_config, padded, dtype = load(src, iteration=iteration,
                                           hf_config_path=hf_config_path,
                                           tokenizer_dir=tokenizer_dir, trust_pickle=trust_pickle)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    with hf_io.staged(out_dir) as staging:
        _write_hf_files(staging, hf_config, dtype, tokenizer_dir)
        with progress_bar(total, "megatron-lm->hf") as bar:
            files = hf_io.write_safetensors_shards(
                staging, _hf_tensors(model, hf_config, padded), max_shard_size, bar)
    return files


def import_megatron(src: str, out_dir: str, *, iteration: int | str | None = None,
                    hf_config_path: str | None = None, tokenizer_dir: str | None = None,
                    trust_pickle: bool = False) -> checkpoint.CheckpointMeta:
    """A Megatron-LM checkpoint -> a megatron-patch checkpoint (`release`: training from it
    starts fresh from its weights). Optimizer, scheduler and RNG states are not carried over."""
    from megatron_patch.convert import distcp

    hf_io.check_output_dir(out_dir)
    if tokenizer_dir is None:
        log.warning("no --tokenizer: %s will hold no tokenizer files, which training and "
                    "generation need (pass --tokenizer-model to them)", out_dir)
    model, hf_config, padded, dtype = load(src, iteration=iteration,
                                           hf_config_path=hf_config_path,
                                           tokenizer_dir=tokenizer_dir, trust_pickle=trust_pickle)
    meta = checkpoint.CheckpointMeta(architecture=hf_config["architectures"][0],
                                     vocab_size=hf_config["vocab_size"], padded_vocab_size=padded,
                                     dtype=str(dtype).removeprefix("torch."))
    # As hf-to-megatron: weights first, everything in the staging directory, one rename.
    with hf_io.staged(out_dir) as staging:
        checkpoint.save(staging, "release", checkpoint.model_state(model),
                        sharded_strategy=distcp.UnsyncedSave())
        _write_hf_files(os.path.join(staging, checkpoint.HF_DIR), hf_config, dtype,
                        tokenizer_dir)
        checkpoint.write_meta(staging, meta)
    return meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`convert` options for Megatron-LM inputs."""
    parser.add_argument("--hf-config", help="Megatron-LM input: an HF config.json (or a "
                        "directory holding one) for the model, e.g. the original model's; it "
                        "must agree with the checkpoint's args (default: derived from them)")
    parser.add_argument("--tokenizer", help="Megatron-LM input: an HF tokenizer directory, "
                        "copied into the output; its length is the vocabulary size unless "
                        "--hf-config gives one")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="Megatron-LM input: load its pickles (model_optim_rng.pt, "
                        "common.pt) even if they hold types outside the allow-list (this can "
                        "run code from the file)")


def run(args: argparse.Namespace) -> int:
    """`convert megatron-to-hf` of a Megatron-LM checkpoint, or `convert import-megatron`."""
    options = dict(iteration=args.iteration, hf_config_path=args.hf_config,
                   tokenizer_dir=args.tokenizer, trust_pickle=args.trust_pickle)
    if args.direction == "import-megatron":
        meta = import_megatron(args.src, args.dst, **options)
        print(f"{args.dst}: {meta.architecture}, vocab {meta.vocab_size} (padded "
              f"{meta.padded_vocab_size}), {meta.dtype}; optimizer state not carried over")
    else:
        files = export_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, **options)
        print(f"{args.dst}: {len(files)} safetensors file(s)")
    return 0
