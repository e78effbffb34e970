"""The architecture of a Megatron-LM checkpoint, from the `args` it was saved with: an HF
config.json derived from them, or a given one checked against them; what no family supports is
refused naming the arg."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from megatron_patch.models import family_for, load_hf_config
from megatron_patch.models.rope import rope_parameters
from megatron_patch.models.scratch import scratch_hf_config


def get_arg(args: argparse.Namespace, *names: str, default: Any = None) -> Any:
    """The first of `names` (current, then older spellings) that args has and is not None."""
    for name in names:
        if getattr(args, name, None) is not None:
            return getattr(args, name)
    return default


def _rope(args: argparse.Namespace) -> dict[str, Any]:
    """The HF rope parameters of args' rotary embedding: `rotary_base`, and with
    `use_rope_scaling` Llama 3.1's scaling with Megatron-Core's fixed constants."""
    params: dict[str, Any] = {"rope_theta": float(get_arg(args, "rotary_base", default=10000)),
                              "rope_type": "default"}
    if getattr(args, "use_rope_scaling", False):
        params.update(rope_type="llama3", factor=float(get_arg(args, "rope_scaling_factor",
                                                            default=8.0)),
                      low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
    return params


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What `args` says about the architecture, normalised over Megatron-LM versions."""
    heads = args.num_attention_heads
    bias = get_arg(args, "add_bias_linear", default=not getattr(args, "disable_bias_linear", False))
    position = get_arg(args, "position_embedding_type",
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
        fused = bias and get_arg(args, "bias_gelu_fusion", default=True)
        activation = "gelu_tanh" if fused else "gelu"
    return {
        "num_layers": args.num_layers, "hidden_size": args.hidden_size,
        "num_attention_heads": heads,
        "ffn_hidden_size": get_arg(args, "ffn_hidden_size", default=4 * args.hidden_size),
        "num_query_groups": (args.num_query_groups if getattr(args, "group_query_attention",
                                                               False) else heads),
        "kv_channels": get_arg(args, "kv_channels", default=args.hidden_size // heads),
        "normalization": get_arg(args, "normalization", default="LayerNorm"),
        "layernorm_epsilon": get_arg(args, "norm_epsilon", "layernorm_epsilon", default=1e-5),
        "gated_linear_unit": swiglu, "activation": activation, "add_bias_linear": bool(bias),
        # Megatron-Core gives linear_qkv a bias with either flag.
        "add_qkv_bias": bool(bias or getattr(args, "add_qkv_bias", False)),
        "position_embedding_type": position,
        "share_embeddings_and_output_weights": not getattr(
            args, "untie_embeddings_and_output_weights", False),
        "max_sequence_length": get_arg(args, "max_position_embeddings", "seq_length"),
        "rope": _rope(args),
        "num_moe_experts": getattr(args, "num_experts", None) or None,
        "moe_router_topk": get_arg(args, "moe_router_topk", default=2),
        "moe_ffn_hidden_size": get_arg(args, "moe_ffn_hidden_size", "ffn_hidden_size"),
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
                      router_aux_loss_coef=get_arg(args, "moe_aux_loss_coeff", default=0.0))
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
    wrong += _beyond_args(model_args)
    if wrong:
        raise ValueError(f"{config_source} does not describe the model of {source}: "
                         + "; ".join(wrong))


# ModelArgs fields a config may set freely: the vocabulary (checked against padded_vocab_size),
# the context length (RoPE models), dropout and the MoE loss weight (training only), and what
# check_args_match compares itself.
_FREE_FIELDS = {"vocab_size", "max_sequence_length", "attention_dropout", "hidden_dropout",
                "moe_aux_loss_coeff", "kv_replicas", "num_layers", "hidden_size",
                "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                "layernorm_epsilon", "normalization", "activation", "gated_linear_unit",
                "add_bias_linear", "add_qkv_bias", "share_embeddings_and_output_weights",
                "position_embedding_type", "num_moe_experts", "moe_router_topk",
                "moe_ffn_hidden_size"}


def _beyond_args(model_args: Any) -> list[str]:
    """Every other field (sliding windows, soft-capping, softmax scale, query/key norms, MLA,
    router variants ...) shapes the model in a way `args` either cannot express or
    _refuse_unsupported refused: the checkpoint's model has the default, and a config that
    sets another value describes a different model."""
    from dataclasses import fields

    wrong = []
    for field in fields(model_args):
        if field.name in _FREE_FIELDS:
            continue
        value = getattr(model_args, field.name)
        if value != field.default:
            wrong.append(f"{field.name}: args cannot express it (the checkpoint's model has "
                         f"{field.default!r}), config {value!r}")
    return wrong


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


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    if isinstance(getattr(args, "params_dtype", None), torch.dtype):
        return args.params_dtype
    if getattr(args, "bf16", False):
        return torch.bfloat16
    return torch.float16 if getattr(args, "fp16", False) else torch.float32
