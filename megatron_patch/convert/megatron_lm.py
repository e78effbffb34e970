"""Checkpoints written by Megatron-LM (and the classic Pai-Megatron-Patch) as inputs.

Two layouts, both under Megatron-LM's checkpoint root, whose
`latest_checkpointed_iteration.txt` names "release" or the last iteration:

    iter_0000100/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt   legacy (`--ckpt-format torch`):
        one torch.save per tensor-parallel rank TT, pipeline rank PPP (only with PP > 1) and
        expert rank EEE (only with EP > 1), holding `args`, `iteration`, `checkpoint_version`,
        the model chunk's state dict under `model` (`model0`, `model1`, ... with virtual
        pipeline stages), the optimizer, scheduler and RNG states.
    iter_0000100/{common.pt, metadata.json, .metadata, __*.distcp}   `torch_dist`: Megatron-Core's
        dist_checkpointing, `args` in common.pt.

Neither carries Hugging Face files: the architecture comes from `args` (`architecture`), mapped
to a family of the zoo; `--hf-config` and `--tokenizer` supply what `args` cannot say.

Legacy state dicts use Megatron-Core's module names (`--use-mcore-models`, Megatron-LM's default
since 2024): the local spec's (`decoder.layers.0.input_layernorm.weight`) or Transformer Engine's
(`decoder.layers.0.self_attention.linear_qkv.layer_norm_weight`). The rank files are merged into
the unsharded tensors the family mappings describe (`read_legacy`). Megatron-LM's older models
(`--use-legacy-models`, Pai-Megatron-Patch's classic checkpoints: nested
`language_model.encoder.layers.0.self_attention.query_key_value.weight`,
`word_embeddings_for_head`) hold the same tensors in the same layouts and are renamed.

torch_dist checkpoints are read by Megatron-Core's own loader, which reshards them; its keys are
the ones megatron-patch's models save.

Legacy files and common.pt are pickles: `load_pickle` reads them with torch.load(weights_only=True)
and an allow-list, scoped to the call, of the types Megatron-LM stores there. Anything else is
refused, naming the file and the class, before anything is unpickled; `trust_pickle` lifts that
for a file the user trusts. (The DCP `.metadata` of a torch_dist checkpoint is unpickled by
PyTorch DCP inside Megatron-Core's loader, not here.)

Only the model's weights are carried over: optimizer, scheduler and RNG states are not.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import importlib
import io
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from megatron_patch import checkpoint
from megatron_patch.convert import engine, hf_io
from megatron_patch.models.weight_rules import replicate_kv

log = logging.getLogger(__name__)

LEGACY_FILE = "model_optim_rng.pt"
COMMON_FILE = "common.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?")
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


class PickleRefused(ValueError):
    """A pickle that names a type outside the allow-list."""


# ---------------------------------------------------------------------------------------------
# Pickles


def _allowed() -> dict[str, Any]:
    """The globals Megatron-LM's files need beyond what weights_only allows by itself: `args`
    (argparse.Namespace), numpy's RNG state (an ndarray), Transformer Engine's extra states
    (io.BytesIO in older versions)."""
    import numpy as np

    allowed: dict[str, Any] = {"argparse.Namespace": argparse.Namespace,
                               "_io.BytesIO": io.BytesIO, "io.BytesIO": io.BytesIO,
                               "builtins.bytes": bytes, "builtins.bytearray": bytearray,
                               "numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        with contextlib.suppress(ImportError, AttributeError):
            allowed[f"{module}._reconstruct"] = importlib.import_module(module)._reconstruct
            allowed[f"{module}.scalar"] = importlib.import_module(module).scalar
    for dtype in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                  np.uint32, np.uint64, np.float16, np.float32, np.float64):
        cls = type(np.dtype(dtype))
        allowed[f"{cls.__module__}.{cls.__name__}"] = cls
    return allowed


def _megatron_enum(name: str) -> Any:
    """An enum class of megatron.core named `module.Class` (args hold some: AttnBackend,
    ModelType ...), or None. Building an enum member only looks its value up."""
    module, _, attr = name.rpartition(".")
    if not module.startswith("megatron.core."):
        return None
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, enum.Enum) else None


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def pickle_globals(path: str, trust_pickle: bool = False) -> list[Any]:
    """The objects the pickle in `path` names beyond weights_only's own set, each allowed;
    PickleRefused naming the file and every other class. Nothing is unpickled to find them."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    if trust_pickle:
        return [_resolve(n) for n in names]
    allowed = _allowed()
    found, refused = [], []
    for name in names:
        obj = allowed.get(name) or _megatron_enum(name)
        (found if obj is not None else refused).append(obj if obj is not None else name)
    if refused:
        raise PickleRefused(
            f"{path}: refusing to unpickle {', '.join(sorted(set(refused)))}: not a type "
            "Megatron-LM stores in its checkpoints, and unpickling can run code. If you trust "
            "this file, pass --trust-pickle")
    # An array's dtype is rebuilt as an instance of its class (numpy.dtypes.UInt32DType), which
    # weights_only checks although the pickle never names it.
    import numpy as np

    dtype_classes = [v for v in allowed.values() if isinstance(v, type) and issubclass(v, np.dtype)]
    return found + dtype_classes


def load_pickle(path: str, trust_pickle: bool = False, mmap: bool = False) -> Any:
    """torch.load of a Megatron-LM file: weights_only with the allow-list (`pickle_globals`),
    or a plain load with `trust_pickle`. `mmap`: tensors stay in the file until read."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    with torch.serialization.safe_globals(pickle_globals(path)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # weights_only refuses with UnpicklingError (and others)
            raise PickleRefused(f"{path}: not loadable as plain weights ({str(e)[:300]}); if "
                                "you trust this file, pass --trust-pickle") from e


# ---------------------------------------------------------------------------------------------
# Locating


def _iteration_name(iteration: int | str) -> str:
    return os.path.basename(checkpoint.iteration_dir("", iteration))


def _layout(path: str) -> str | None:
    if os.path.isfile(os.path.join(path, COMMON_FILE)) and os.path.isfile(
            os.path.join(path, "metadata.json")):
        return "torch_dist"
    if os.path.isdir(path) and any(_RANK_DIR.fullmatch(n) for n in os.listdir(path)):
        return "legacy"
    return None


def locate(path: str, iteration: int | str | None = None) -> tuple[str, str]:
    """(iteration directory, "legacy" or "torch_dist") of a Megatron-LM checkpoint root (its
    tracker file names the iteration unless `iteration` is given) or iteration directory."""
    if os.path.isfile(os.path.join(path, checkpoint.META)):
        raise ValueError(f"{path} is a megatron-patch checkpoint, not a Megatron-LM one")
    if iteration is None and (layout := _layout(path)) is not None:
        return path, layout
    if iteration is None:
        iteration = checkpoint.latest_iteration(path)
    elif iteration != "release":
        iteration = int(iteration)
    iter_dir = os.path.join(path, _iteration_name(iteration))
    if not os.path.isdir(iter_dir):
        raise FileNotFoundError(f"{iter_dir} not found")
    layout = _layout(iter_dir)
    if layout is None:
        raise FileNotFoundError(f"{iter_dir}: neither mp_rank_* directories (legacy) nor "
                                f"{COMMON_FILE} and metadata.json (torch_dist)")
    return iter_dir, layout


def is_megatron_lm_checkpoint(path: str) -> bool:
    """Whether `path` is a Megatron-LM checkpoint root or iteration directory."""
    try:
        locate(path)
    except (ValueError, FileNotFoundError):
        return False
    return True


def _rank_dirs(iter_dir: str) -> dict[str, tuple[int, ...]]:
    return {n: tuple(int(g) for g in m.groups() if g is not None)
            for n in os.listdir(iter_dir) if (m := _RANK_DIR.fullmatch(n))}


def read_args(iter_dir: str, layout: str, trust_pickle: bool = False) -> tuple[
        argparse.Namespace, str]:
    """The `args` Namespace Megatron-LM saved, and the file it came from."""
    if layout == "torch_dist":
        path = os.path.join(iter_dir, COMMON_FILE)
    else:
        # Rank 0's file: mp_rank_00, mp_rank_00_000 or mp_rank_00_000_000, whichever exists.
        first = sorted(n for n, ranks in _rank_dirs(iter_dir).items() if not any(ranks))
        if not first:
            raise FileNotFoundError(f"{iter_dir}: no rank 0 directory (mp_rank_00...)")
        path = os.path.join(iter_dir, first[0], LEGACY_FILE)
    state = load_pickle(path, trust_pickle, mmap=layout == "legacy")
    args = state.get("args") if isinstance(state, dict) else None
    if not isinstance(args, argparse.Namespace):
        raise ValueError(f"{path}: no Megatron-LM `args` in it (saved with --no-save-args?)")
    return args, path


# ---------------------------------------------------------------------------------------------
# Architecture from args


def _get(args: argparse.Namespace, *names: str, default: Any = None) -> Any:
    """The first of `names` (current, then older spellings) that args has and is not None."""
    for name in names:
        if getattr(args, name, None) is not None:
            return getattr(args, name)
    return default


def _rope(args: argparse.Namespace) -> dict[str, Any]:
    """The HF rope parameters of args' rotary embedding: `rotary_base`, and with
    `use_rope_scaling` Llama 3.1's scaling with Megatron-Core's fixed constants."""
    params: dict[str, Any] = {"rope_theta": float(_get(args, "rotary_base", default=10000)),
                              "rope_type": "default"}
    if getattr(args, "use_rope_scaling", False):
        params.update(rope_type="llama3", factor=float(_get(args, "rope_scaling_factor",
                                                            default=8.0)),
                      low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
    return params


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What `args` says about the architecture, normalised over Megatron-LM versions."""
    heads = args.num_attention_heads
    bias = _get(args, "add_bias_linear", default=not getattr(args, "disable_bias_linear", False))
    position = _get(args, "position_embedding_type",
                    default="rope" if getattr(args, "use_rotary_position_embeddings", False)
                    else "learned_absolute")
    swiglu = bool(getattr(args, "swiglu", False))
    if swiglu:
        activation = "silu"
    elif getattr(args, "openai_gelu", False):
        activation = "gelu_tanh"
    else:
        # Megatron-Core's fused bias+GELU (the default with biases) computes GELU's tanh
        # approximation, unfused it is the exact one: export what the model computed.
        fused = bias and _get(args, "bias_gelu_fusion", default=True)
        activation = "gelu_tanh" if fused else "gelu"
    return {
        "num_layers": args.num_layers, "hidden_size": args.hidden_size,
        "num_attention_heads": heads,
        "ffn_hidden_size": _get(args, "ffn_hidden_size", default=4 * args.hidden_size),
        "num_query_groups": (args.num_query_groups if getattr(args, "group_query_attention",
                                                               False) else heads),
        "kv_channels": _get(args, "kv_channels", default=args.hidden_size // heads),
        "normalization": _get(args, "normalization", default="LayerNorm"),
        "layernorm_epsilon": _get(args, "norm_epsilon", "layernorm_epsilon", default=1e-5),
        "gated_linear_unit": swiglu, "activation": activation, "add_bias_linear": bool(bias),
        # Megatron-Core gives linear_qkv a bias with either flag.
        "add_qkv_bias": bool(bias or getattr(args, "add_qkv_bias", False)),
        "position_embedding_type": position,
        "share_embeddings_and_output_weights": not getattr(
            args, "untie_embeddings_and_output_weights", False),
        "max_sequence_length": _get(args, "max_position_embeddings", "seq_length"),
        "rope": _rope(args),
        "num_moe_experts": getattr(args, "num_experts", None) or None,
        "moe_router_topk": _get(args, "moe_router_topk", default=2),
        "moe_ffn_hidden_size": _get(args, "moe_ffn_hidden_size", "ffn_hidden_size"),
    }


# args that change the function the model computes in ways no family of the zoo has: the value
# each must have (a predicate), and what it means.
_UNSUPPORTED = {
    # Mixture of experts: Mixtral's routing (softmax over the top-k logits) in every layer.
    "moe_shared_expert_intermediate_size": (lambda v: not v, "shared experts"),
    "moe_router_pre_softmax": (lambda v: not v, "softmax before the top-k"),
    "moe_router_score_function": (lambda v: v in (None, "softmax"), "router score function"),
    "moe_router_topk_scaling_factor": (lambda v: v in (None, 1, 1.0), "scaled router weights"),
    "moe_router_num_groups": (lambda v: not v, "group-limited routing"),
    "moe_router_enable_expert_bias": (lambda v: not v, "expert bias in the router"),
    "moe_layer_freq": (lambda v: v in (None, 1) or (isinstance(v, list) and set(v) == {1}),
                       "dense layers between MoE layers"),
    "moe_use_legacy_grouped_gemm": (lambda v: not v, "legacy GroupedMLP weights"),
    "apply_residual_connection_post_layernorm": (lambda v: not v, "post-LN residuals"),
    "apply_layernorm_1p": (lambda v: not v, "zero-centred LayerNorm weights"),
    "layernorm_zero_centered_gamma": (lambda v: not v, "zero-centred LayerNorm weights"),
    "qk_layernorm": (lambda v: not v, "query/key LayerNorm"),
    "squared_relu": (lambda v: not v, "squared ReLU"),
    "rotary_interleaved": (lambda v: not v, "interleaved rotary pairs"),
    "rotary_percent": (lambda v: v in (None, 1.0), "partial rotary embeddings"),
    "rotary_seq_len_interpolation_factor": (lambda v: v in (None, 1, 1.0),
                                            "rotary position interpolation"),
    "multi_latent_attention": (lambda v: not v, "multi-latent attention"),
    "mtp_num_layers": (lambda v: not v, "multi-token prediction layers"),
    "hybrid_override_pattern": (lambda v: not v, "hybrid (Mamba) layers"),
    "hybrid_layer_pattern": (lambda v: not v, "hybrid (Mamba) layers"),
    "window_size": (lambda v: v is None, "sliding-window attention"),
    "heterogeneous_layers_config_path": (lambda v: v is None, "heterogeneous layers"),
}


def _refuse_unsupported(args: argparse.Namespace, source: str) -> None:
    problems = [f"{name}={getattr(args, name)!r} ({what})"
                for name, (ok, what) in _UNSUPPORTED.items()
                if hasattr(args, name) and not ok(getattr(args, name))]
    if problems:
        raise ValueError(f"{source}: args name an architecture no family supports: "
                         + "; ".join(problems))


def derived_hf_config(args: argparse.Namespace, vocab_size: int, source: str) -> dict[str, Any]:
    """A config.json for the checkpoint's architecture: Llama (Qwen2 with q/k/v biases only)
    for RoPE + RMSNorm + SwiGLU, GPT-BigCode for learned positions + LayerNorm + biases."""
    from megatron_patch.models.scratch import scratch_hf_config

    s = _settings(args)
    # The flags Megatron-LM's own command line would carry, for the from-scratch config tables.
    flags = argparse.Namespace(
        num_layers=s["num_layers"], hidden_size=s["hidden_size"],
        num_attention_heads=s["num_attention_heads"], ffn_hidden_size=s["ffn_hidden_size"],
        group_query_attention=s["num_query_groups"] != s["num_attention_heads"],
        num_query_groups=s["num_query_groups"], swiglu=s["gated_linear_unit"],
        normalization=s["normalization"], disable_bias_linear=not s["add_bias_linear"],
        position_embedding_type=s["position_embedding_type"],
        max_position_embeddings=s["max_sequence_length"], seq_length=s["max_sequence_length"],
        norm_epsilon=s["layernorm_epsilon"], rotary_base=s["rope"]["rope_theta"],
        untie_embeddings_and_output_weights=not s["share_embeddings_and_output_weights"])
    try:
        config = scratch_hf_config(flags, vocab_size)
    except ValueError as e:
        raise ValueError(f"{source}: args (swiglu={s['gated_linear_unit']}, normalization="
                         f"{s['normalization']!r}, add_bias_linear={s['add_bias_linear']}, "
                         f"position_embedding_type={s['position_embedding_type']!r}) map to no "
                         f"supported family: {e}") from None
    if config["model_type"] == "llama" and s["num_moe_experts"]:
        if s["add_qkv_bias"]:
            raise ValueError(f"{source}: args add_qkv_bias=True with num_experts: no family "
                             "supports it")
        config.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                      num_local_experts=s["num_moe_experts"],
                      num_experts_per_tok=s["moe_router_topk"],
                      intermediate_size=s["moe_ffn_hidden_size"],
                      router_aux_loss_coef=_get(args, "moe_aux_loss_coeff", default=0.0))
        config["head_dim"] = s["kv_channels"]
    elif s["num_moe_experts"]:
        raise ValueError(f"{source}: args num_experts={s['num_moe_experts']} with a model other "
                         "than Llama-style (RoPE, RMSNorm, SwiGLU, no biases): no family "
                         "supports it")
    elif config["model_type"] == "llama":
        if s["add_qkv_bias"]:
            config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
        config["head_dim"] = s["kv_channels"]
    if config["model_type"] != "gpt_bigcode" and s["rope"]["rope_type"] != "default":
        config["rope_scaling"] = {k: v for k, v in s["rope"].items() if k != "rope_theta"}
    elif config["model_type"] == "gpt_bigcode":
        config["activation_function"] = {"gelu": "gelu",
                                         "gelu_tanh": "gelu_pytorch_tanh"}[s["activation"]]
    return config


def check_args_match(args: argparse.Namespace, hf_config: dict[str, Any], source: str,
                     config_source: str) -> None:
    """Refuse an HF config whose model differs from the one `args` describe, naming the arg."""
    from megatron_patch.models import family_for
    from megatron_patch.models.rope import rope_parameters

    model_args = family_for(hf_config).model_args(hf_config)
    s = _settings(args)
    checked = ["num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
               "kv_channels", "normalization", "gated_linear_unit", "add_bias_linear",
               "add_qkv_bias", "share_embeddings_and_output_weights", "activation",
               "position_embedding_type", "num_moe_experts"]
    # A mixture of experts has no dense MLP: its experts' size is what counts.
    checked += (["moe_router_topk", "moe_ffn_hidden_size"] if s["num_moe_experts"]
                else ["ffn_hidden_size"])
    if s["position_embedding_type"] == "learned_absolute":
        checked.append("max_sequence_length")
    wrong = [f"{name}: args {s[name]!r}, config {getattr(model_args, name)!r}"
             for name in checked if s[name] != getattr(model_args, name)]
    if s["position_embedding_type"] == "rope":
        family = family_for(hf_config)
        rope = (family.rope_parameters or rope_parameters)(hf_config)
        ours = {k: float(v) if isinstance(v, int | float) else v for k, v in rope.items()
                if k in s["rope"]}
        if ours != s["rope"] or set(rope) - set(s["rope"]) - {"type"}:
            wrong.append(f"rotary_base / use_rope_scaling: args {s['rope']}, config {rope}")
    if abs(s["layernorm_epsilon"] - model_args.layernorm_epsilon) > 1e-12:
        wrong.append(f"norm_epsilon: args {s['layernorm_epsilon']!r}, config "
                     f"{model_args.layernorm_epsilon!r}")
    if wrong:
        raise ValueError(f"{config_source} does not describe the model of {source}: "
                         + "; ".join(wrong))


def _tokenizer_info(tokenizer_dir: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    info = {"vocab_size": len(tok)}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok, key, None) is not None:
            info[key] = getattr(tok, key)
    return info


def architecture(args: argparse.Namespace, source: str, hf_config_path: str | None = None,
                 tokenizer_dir: str | None = None) -> dict[str, Any]:
    """The HF config.json of the checkpoint's model: `hf_config_path` (a config.json or a
    directory holding one) checked against `args`, else derived from `args`, with the
    vocabulary size of `tokenizer_dir` (else the padded size: nothing is dropped)."""
    from megatron_patch.models import load_hf_config

    _refuse_unsupported(args, source)
    padded = getattr(args, "padded_vocab_size", None)
    if not padded:
        raise ValueError(f"{source}: args have no padded_vocab_size")
    if hf_config_path is not None:
        if os.path.isdir(hf_config_path):
            hf_config = load_hf_config(hf_config_path)
        else:
            with open(hf_config_path) as f:
                hf_config = json.load(f)
        check_args_match(args, hf_config, source, hf_config_path)
    else:
        info = _tokenizer_info(tokenizer_dir) if tokenizer_dir else {"vocab_size": padded}
        hf_config = derived_hf_config(args, info["vocab_size"], source)
        hf_config.update(info)
        check_args_match(args, hf_config, source, "the derived config")
    if hf_config["vocab_size"] > padded:
        raise ValueError(f"{source}: the vocabulary ({hf_config['vocab_size']}) is larger than "
                         f"the checkpoint's padded_vocab_size {padded}")
    return hf_config


def _dtype(args: argparse.Namespace) -> torch.dtype:
    if isinstance(getattr(args, "params_dtype", None), torch.dtype):
        return args.params_dtype
    if getattr(args, "bf16", False):
        return torch.bfloat16
    return torch.float16 if getattr(args, "fp16", False) else torch.float32


# ---------------------------------------------------------------------------------------------
# Legacy rank files


def rank_files(iter_dir: str, args: argparse.Namespace) -> dict[tuple[int, int, int], str]:
    """(tp rank, pp rank, expert rank) -> the rank's model_optim_rng.pt, as Megatron-LM names
    them for the args' TP/PP/EP sizes; FileNotFoundError naming the first one missing."""
    tp = _get(args, "tensor_model_parallel_size", default=1)
    pp = _get(args, "pipeline_model_parallel_size", default=1)
    ep = _get(args, "expert_model_parallel_size", default=1)
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
        etp = _get(args, "expert_tensor_parallel_size", default=tp)
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


# ---------------------------------------------------------------------------------------------
# Loading into a model


def load(src: str, *, iteration: int | str | None = None, hf_config_path: str | None = None,
         tokenizer_dir: str | None = None, trust_pickle: bool = False) -> tuple[
             Any, dict[str, Any], int, torch.dtype]:
    """A single-process Megatron-Core model holding the checkpoint's weights:
    (model, HF config, padded vocabulary size, dtype)."""
    from megatron_patch.convert.hf_megatron import _dims, _parameters, _single_process_model
    from megatron_patch.models import family_for

    iter_dir, layout = locate(src, iteration)
    args, args_file = read_args(iter_dir, layout, trust_pickle)
    hf_config = architecture(args, args_file, hf_config_path, tokenizer_dir)
    model_args = family_for(hf_config).model_args(hf_config)
    padded = args.padded_vocab_size
    log.info("%s: %s checkpoint, %s", iter_dir, layout, hf_config["architectures"][0])

    if layout == "torch_dist":
        dtype = _dtype(args)
        # Megatron-LM's model has one KV group where this one holds copies of it (multi-query).
        model = _single_process_model(hf_config, dtype, padded,
                                      args=replace(model_args, kv_replicas=1))
        common = os.path.join(iter_dir, COMMON_FILE)
        # Megatron-Core's loader reads common.pt with torch.load's weights_only default; the
        # allow-list checked above applies to that call only.
        with torch.serialization.safe_globals(pickle_globals(common, trust_pickle)):
            checkpoint.load_model(os.path.dirname(os.path.abspath(iter_dir)), model,
                                  _iteration_of(iter_dir))
        if model_args.kv_replicas == 1:
            return model, hf_config, padded, dtype
        weights = {n: p.detach() for n, p in _parameters(model).items()}
    else:
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
        dtype = dtypes.pop()
    if model_args.kv_replicas > 1:
        # Megatron-LM's one KV group -> this model's identical copies (weight_rules.replicate_kv).
        for name in [n for n in weights if ".linear_qkv." in n]:
            weights[name] = replicate_kv(weights[name], _dims(model_args, padded))
    model = _single_process_model(hf_config, dtype, padded)
    params = _parameters(model)
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


def _iteration_of(iter_dir: str) -> int | str:
    name = os.path.basename(os.path.normpath(iter_dir))
    if name == "release":
        return name
    if not re.fullmatch(r"iter_\d{7,}", name):
        raise ValueError(f"{iter_dir}: a Megatron-LM iteration directory is named release or "
                         "iter_NNNNNNN")
    return int(name[5:])


# ---------------------------------------------------------------------------------------------
# Commands


def _write_hf_files(out_dir: str, hf_config: dict[str, Any], dtype: torch.dtype,
                    tokenizer_dir: str | None) -> None:
    """config.json (with the dtype), the tokenizer's files and generation_config.json."""
    from megatron_patch.convert.hf_megatron import _ensure_generation_config

    os.makedirs(out_dir, exist_ok=True)
    if tokenizer_dir:
        hf_io.copy_non_weight_files(tokenizer_dir, out_dir)
    config = dict(hf_config, torch_dtype=str(dtype).removeprefix("torch."))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    _ensure_generation_config(out_dir, config)


def _hf_tensors(model, hf_config: dict[str, Any], padded: int) -> Iterator[
        tuple[str, torch.Tensor]]:
    from megatron_patch.convert.hf_megatron import _dims, _parameters, export_bindings
    from megatron_patch.models import family_for

    family = family_for(hf_config)
    args = family.model_args(hf_config)
    params = _parameters(model)
    bindings, expected = export_bindings(family, args, hf_config, params)
    return engine.megatron_to_hf(bindings, _dims(args, padded), lambda n: params[n].detach(),
                                 expected)


def export_to_hf(src: str, out_dir: str, *, iteration: int | str | None = None,
                 hf_config_path: str | None = None, tokenizer_dir: str | None = None,
                 trust_pickle: bool = False, max_shard_size: int | str = "5GB") -> list[str]:
    """A Megatron-LM checkpoint -> an HF model directory."""
    from megatron_patch.convert.hf_megatron import _progress

    hf_io.check_output_dir(out_dir)
    model, hf_config, padded, dtype = load(src, iteration=iteration,
                                           hf_config_path=hf_config_path,
                                           tokenizer_dir=tokenizer_dir, trust_pickle=trust_pickle)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    with hf_io.staged(out_dir) as staging:
        _write_hf_files(staging, hf_config, dtype, tokenizer_dir)
        with _progress(total, "megatron-lm->hf") as bar:
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
