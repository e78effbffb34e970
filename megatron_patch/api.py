"""The public Python API: Megatron-Core models of Hugging Face families for your own training code.

    from megatron_patch import api

    api.initialize_parallel(tensor_model_parallel_size=2)    # or let Megatron-LM do it
    model = api.build_model("path/to/hf_model")              # [GPTModel], one per virtual stage
    api.load_hf_weights(model, "path/to/hf_model")           # in memory, at any layout
    ...                                                      # your training loop
    api.save_checkpoint(model, "ckpt", iteration=100)        # Megatron-LM checkpoint layout
    for name, tensor in api.export_hf_weights(model): ...    # HF names, one tensor at a time
    api.save_hf_pretrained(model, "out_hf")                  # a save_pretrained directory

Everything named in `__all__` is the supported API; the modules behind it are internal and may
move. Models are built for the parallel layout Megatron-Core's `parallel_state` holds (set it up
with `initialize_parallel`, or let Megatron-LM's trainer do it), and every function that reads or
writes weights is collective: call it on every rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_patch import checkpoint
from megatron_patch import models as _models
from megatron_patch.convert import hf_io
from megatron_patch.forward import masked_vocab_parallel_cross_entropy as vocab_parallel_loss
from megatron_patch.parallel import destroy as destroy_parallel
from megatron_patch.parallel import initialize as initialize_parallel

# Function-level imports: models.layers, convert.live and convert.hf_megatron import
# megatron.core (seconds); the functions that need them import them, so importing the API
# (and `megatron_patch`'s lazy names) does not.

__all__ = [
    "HF_CONFIG_ENV", "ModelInfo", "add_megatron_lm_args", "build_model", "destroy_parallel",
    "export_hf_weights", "from_checkpoint", "initialize_parallel", "layer_spec",
    "load_hf_config", "load_hf_weights", "model_info", "model_provider", "save_checkpoint",
    "save_hf_pretrained", "supported_architectures", "transformer_config", "vocab_parallel_loss",
]

# Where `model_provider` finds the HF model when Megatron-LM's args have no --hf-config.
HF_CONFIG_ENV = "MEGATRON_PATCH_HF_CONFIG"

supported_architectures = _models.supported_architectures


@dataclass(frozen=True)
class ModelInfo:
    """What a built model is: the HF config it comes from (and its directory, when there is one,
    whose tokenizer files an HF export copies) and its embedding rows (vocabulary padded)."""

    hf_config: dict[str, Any]
    padded_vocab_size: int
    hf_dir: str | None = None

    @property
    def vocab_size(self) -> int:
        return _models.family_for(self.hf_config).model_args(self.hf_config).vocab_size


def load_hf_config(hf: str | dict[str, Any]) -> dict[str, Any]:
    """An HF config.json as a dict: from a model directory (or a converted checkpoint, which
    carries its HF files), or a dict given as it is."""
    return dict(hf) if isinstance(hf, dict) else _models.load_hf_config(hf)


def _layout() -> tuple[int, int, int | None, int]:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("Megatron-Core's parallel state is not initialised: call "
                           "api.initialize_parallel(...) first (Megatron-LM's trainer does it)")
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_virtual_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size())


def transformer_config(hf: str | dict[str, Any], *, params_dtype: torch.dtype = torch.float32,
                       sequence_parallel: bool = False, **overrides: Any):
    """The family's Megatron-Core TransformerConfig at the current parallel layout; `overrides`
    are TransformerConfig fields (recompute_granularity=..., init_method_std=...)."""
    hf_config = load_hf_config(hf)
    args = _models.family_for(hf_config).model_args(hf_config)
    vpp = _layout()[2]
    if vpp and vpp > 1:
        overrides.setdefault("virtual_pipeline_model_parallel_size", vpp)
    return _models.transformer_config(args, params_dtype=params_dtype,
                                      sequence_parallel=sequence_parallel, **overrides)


def layer_spec(hf: str | dict[str, Any], config, *, vp_stage: int | None = None,
               transformer_impl: str = "auto"):
    """The family's decoder block spec (a Megatron-Core TransformerBlockSubmodules) for
    `config`: "local" (torch) layers, "transformer_engine", or "auto" (TE where it runs)."""
    from megatron_patch.models.layers import block_spec

    hf_config = load_hf_config(hf)
    args = _models.family_for(hf_config).model_args(hf_config)
    return block_spec(config, args.qk_layernorm, vp_stage, transformer_impl, args)


def build_model(hf: str | dict[str, Any], *, params_dtype: torch.dtype = torch.float32,
                sequence_parallel: bool = False, make_vocab_size_divisible_by: int = 128,
                padded_vocab_size: int | None = None, transformer_impl: str = "auto",
                pre_process: bool | None = None, post_process: bool | None = None,
                vp_stages: list[int] | None = None, **config_overrides: Any) -> list:
    """This rank's Megatron-Core GPTModel chunks of an HF family member (from its directory or
    config dict), randomly initialised, for the current TP/PP/EP layout: one chunk per virtual
    pipeline stage (one without virtual stages). Load weights with `load_hf_weights`.

    The vocabulary is padded to a multiple of make_vocab_size_divisible_by x TP, as Megatron-LM
    does, unless `padded_vocab_size` fixes it. `config_overrides` go to the TransformerConfig.
    """
    hf_config = load_hf_config(hf)
    args = _models.family_for(hf_config).model_args(hf_config)
    tp, pp, vpp, ep = _layout()
    padded = padded_vocab_size or _models.pad_vocab_size(args.vocab_size,
                                                         make_vocab_size_divisible_by * tp)
    if vpp and vpp > 1:
        config_overrides.setdefault("virtual_pipeline_model_parallel_size", vpp)
    if vp_stages is None:
        vp_stages = list(range(vpp)) if vpp and vpp > 1 else [None]
    chunks = _models.build_stages(
        hf_config, padded, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
        transformer_impl=transformer_impl, vp_stages=vp_stages, pre_process=pre_process,
        post_process=post_process, **config_overrides).chunks
    hf_dir = hf if isinstance(hf, str) else None
    if hf_dir is not None and not os.path.isfile(os.path.join(hf_dir, "config.json")):
        hf_dir = os.path.join(hf_dir, checkpoint.HF_DIR)  # a converted checkpoint's HF files
    info = ModelInfo(hf_config, padded, hf_dir)
    for chunk in chunks:
        chunk.megatron_patch_info = info
    return chunks


def _chunks(model) -> list[torch.nn.Module]:
    """The GPTModel chunks of a model, a list of them, or wrappers (DDP, Float16Module)."""
    found = []
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        while not hasattr(chunk, "megatron_patch_info") and hasattr(chunk, "module"):
            chunk = chunk.module
        found.append(chunk)
    return found


def model_info(model) -> ModelInfo:
    """The ModelInfo a model (or its chunks, or a wrapper of it) was built with."""
    infos = [getattr(c, "megatron_patch_info", None) for c in _chunks(model)]
    if not infos or None in infos:
        raise ValueError("this model was not built by megatron_patch.api (build_model, "
                         "from_checkpoint or model_provider): it has no megatron_patch_info")
    return infos[0]


def load_hf_weights(model, hf_dir: str) -> None:
    """Load an HF model directory's weights (safetensors, or pytorch_model*.bin) into a live
    model at whatever layout it was built for, one HF tensor at a time, with no checkpoint
    written. Every model tensor must come from the directory and every HF tensor must be used
    (or refused by name). Collective: call it on every rank."""
    from megatron_patch.convert import live

    info = model_info(model)
    live.load_hf_weights(_chunks(model), info.hf_config, hf_dir, info.padded_vocab_size)


def export_hf_weights(model, *, dtype: torch.dtype | None = None) -> Iterator[
        tuple[str, torch.Tensor]]:
    """(HF tensor name, tensor) for every tensor of the HF checkpoint of this model, one at a
    time in save_pretrained's order, each gathered across TP/PP/EP only when it is yielded (so
    memory holds one tensor), on the model's device. A generator: every rank must iterate it
    to the end, and every rank receives every tensor (push it to an inference engine, write
    it, or drop it)."""
    from megatron_patch.convert import live

    info = model_info(model)
    for name, tensor in live.export_hf_weights(_chunks(model), info.hf_config,
                                               info.padded_vocab_size):
        yield name, tensor if dtype is None else tensor.to(dtype)


def save_hf_pretrained(model, out_dir: str, *, max_shard_size: int | str = "5GB",
                       dtype: torch.dtype | None = None) -> list[str]:
    """Write the model as a save_pretrained directory (safetensors shards, config.json, and the
    tokenizer and other non-weight files of the HF directory it was built from). Rank 0 writes;
    every rank must call it. Returns the weight files written."""
    from megatron_patch.convert.hf_megatron import ensure_generation_config

    info = model_info(model)
    distributed = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    # Refused (out_dir is not empty) on every rank before any collective starts.
    refusal: list[str | None] = [None]
    if rank == 0:
        try:
            hf_io.check_output_dir(out_dir)
        except FileExistsError as e:
            refusal = [str(e)]
    if distributed:
        torch.distributed.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise FileExistsError(refusal[0])
    tensors = export_hf_weights(model, dtype=dtype)
    files: list[str] = []
    if rank != 0:
        for _ in tensors:
            pass
    else:
        # Built in OUT.partial and moved into place in one rename (hf_io.staged).
        with hf_io.staged(out_dir) as staging:
            _write_hf_files(info, staging)
            ensure_generation_config(staging, info.hf_config)
            files = hf_io.write_safetensors_shards(
                staging, ((n, t.cpu()) for n, t in tensors), max_shard_size)
    if distributed:
        torch.distributed.barrier()
    return files


def _write_hf_files(info: ModelInfo, out_dir: str) -> None:
    """The HF directory's files other than weights (config, tokenizer, remote code), or, for
    a model built from a config dict, its config.json."""
    os.makedirs(out_dir, exist_ok=True)
    if info.hf_dir is not None:
        hf_io.copy_non_weight_files(info.hf_dir, out_dir)
    if not os.path.isfile(os.path.join(out_dir, "config.json")):
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(info.hf_config, f, indent=2)
            f.write("\n")


def from_checkpoint(ckpt_dir: str, *, sequence_parallel: bool = False,
                    params_dtype: torch.dtype | None = None, **config_overrides: Any):
    """Build this rank's model for the current layout and load one of our checkpoints (a
    converted model, or one `save_checkpoint` or the trainer wrote). Returns
    (model, CheckpointMeta)."""
    model, meta = _models.from_checkpoint(ckpt_dir, sequence_parallel=sequence_parallel,
                                          params_dtype=params_dtype, **config_overrides)
    model.megatron_patch_info = ModelInfo(
        _models.load_hf_config(os.path.join(ckpt_dir, checkpoint.HF_DIR)),
        meta.padded_vocab_size, os.path.join(ckpt_dir, checkpoint.HF_DIR))
    return model, meta


def save_checkpoint(model, ckpt_dir: str, iteration: int | str = "release") -> str:
    """Save the model's weights as a Megatron-LM checkpoint directory (torch_dist; loads at any
    layout with `from_checkpoint`, `megatron-patch export`, or `--load` of our trainer), with
    the HF files and metadata export needs. Collective. Returns the iteration directory."""
    info = model_info(model)
    chunks = _chunks(model)
    if (torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
        _write_hf_files(info, os.path.join(ckpt_dir, checkpoint.HF_DIR))
        dtype = str(next(chunks[0].parameters()).dtype).removeprefix("torch.")
        checkpoint.write_meta(ckpt_dir, checkpoint.CheckpointMeta(
            info.hf_config["architectures"][0], info.vocab_size, info.padded_vocab_size, dtype))
    # Megatron-LM's layout: 'model', or 'model0', 'model1', ... for virtual pipeline chunks.
    if len(chunks) == 1:
        state = {"model": chunks[0].sharded_state_dict()}
    else:
        state = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    state["checkpoint_version"] = 3.0
    return checkpoint.save(ckpt_dir, iteration, state)


# ---- Megatron-LM integration ------------------------------------------------------------------
def add_megatron_lm_args(parser):
    """An `extra_args_provider` for Megatron-LM's `pretrain`: adds --hf-config (an HF model
    directory: which family, and its sizes, `model_provider` builds)."""
    group = parser.add_argument_group(title="megatron-patch")
    group.add_argument("--hf-config", type=str, default=None,
                       help=f"HF model directory (config.json) of the model to build; default "
                            f"${HF_CONFIG_ENV}")
    return parser


def _megatron_lm_args():
    from megatron.training import get_args

    return get_args()


# Megatron-LM flags that must agree with the HF config, where they are given.
_MATCHING_ARGS = (("num_layers", "num_layers"), ("hidden_size", "hidden_size"),
                  ("num_attention_heads", "num_attention_heads"),
                  ("ffn_hidden_size", "ffn_hidden_size"))


def model_provider(pre_process: bool = True, post_process: bool = True,
                   vp_stage: int | None = None, config=None, pg_collection=None):
    """Megatron-LM's `model_provider` for `pretrain(...)`: the GPTModel of a zoo family for this
    (virtual) pipeline stage, as `pretrain_gpt.py`'s provider is called.

    The HF model comes from `--hf-config` (add it with `extra_args_provider=
    add_megatron_lm_args`), else the MEGATRON_PATCH_HF_CONFIG environment variable. From
    Megatron-LM's args it takes what is not the model's: params_dtype (--bf16/--fp16),
    --sequence-parallel, --transformer-impl and the padded vocabulary size (from the tokenizer
    and --make-vocab-size-divisible-by). The TransformerConfig Megatron-LM passes as `config`
    is replaced by the family's (it cannot know, say, ALiBi or a family's norms); model sizes
    given on Megatron-LM's command line must agree with the HF config. The model is built on
    Megatron-Core's global parallel state (what Megatron-LM's default `pg_collection` holds);
    `config` and `pg_collection` are accepted for the signature and not used.
    """
    args = _megatron_lm_args()
    hf = getattr(args, "hf_config", None) or os.environ.get(HF_CONFIG_ENV)
    if not hf:
        raise ValueError(f"model_provider needs the HF model: pass --hf-config (extra_args_"
                         f"provider=megatron_patch.api.add_megatron_lm_args) or set "
                         f"{HF_CONFIG_ENV}")
    hf_config = load_hf_config(hf)
    model_args = _models.family_for(hf_config).model_args(hf_config)
    wrong = [f"--{flag.replace('_', '-')} {getattr(args, flag)} (the HF config says "
             f"{getattr(model_args, field)})" for flag, field in _MATCHING_ARGS
             if getattr(args, flag, None) is not None
             and getattr(args, flag) != getattr(model_args, field)]
    if wrong:
        raise ValueError(f"Megatron-LM's model flags disagree with {hf}: " + "; ".join(wrong))
    padded = getattr(args, "padded_vocab_size", None)
    if padded is not None and padded < model_args.vocab_size:
        raise ValueError(f"the tokenizer's padded vocabulary ({padded}) is smaller than the "
                         f"model's ({model_args.vocab_size})")
    (model,) = build_model(
        hf, params_dtype=getattr(args, "params_dtype", torch.float32),
        sequence_parallel=bool(getattr(args, "sequence_parallel", False)),
        make_vocab_size_divisible_by=getattr(args, "make_vocab_size_divisible_by", 128),
        padded_vocab_size=padded, transformer_impl=getattr(args, "transformer_impl", "auto"),
        pre_process=pre_process, post_process=post_process, vp_stages=[vp_stage])
    return model
