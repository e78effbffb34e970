"""HF configs for models built from scratch with Megatron-LM's architecture flags
(`scratch_hf_config`): RoPE builds a Llama, `--use-alibi-mask` (or `--position-embedding-type
alibi`) a BLOOM, `--position-embedding-type learned_absolute` a GPT-BigCode (StarCoder-style)
model; each is exported as a native transformers model.
"""

from __future__ import annotations

import argparse
from typing import Any

from megatron_patch.models.families.llama import LLAMA
from megatron_patch.models.spec import ModelArgs


def _require(ok: bool, what: str, kind: str, problems: list[str]) -> None:
    if not ok:
        problems.append(f"{what} ({kind} models from scratch are BLOOM / GPT-BigCode style)")


def require_size_flags(args: argparse.Namespace) -> None:
    """A model from scratch needs its sizes: refuse flags that leave one out, naming them."""
    missing = [f"--{n.replace('_', '-')}" for n in ("num_layers", "hidden_size",
                                                    "num_attention_heads")
               if getattr(args, n) is None]
    if missing:
        raise ValueError(f"a model from scratch needs {', '.join(missing)}")


def hf_config(args: argparse.Namespace, vocab_size: int) -> dict[str, Any] | None:
    """The config.json for `args`, or None when the flags ask for another position encoding."""
    kind = args.position_embedding_type
    if kind not in ("alibi", "learned_absolute"):
        return None
    problems: list[str] = []
    require_size_flags(args)
    _require(not args.swiglu, "drop --swiglu", kind, problems)
    _require(args.normalization == "LayerNorm", "use --normalization LayerNorm", kind, problems)
    _require(not args.disable_bias_linear, "drop --disable-bias-linear", kind, problems)
    hidden, heads = args.hidden_size, args.num_attention_heads
    groups = args.num_query_groups if args.group_query_attention else heads
    positions = args.max_position_embeddings or args.seq_length
    common = {"vocab_size": vocab_size, "layer_norm_epsilon": args.norm_epsilon,
              "tie_word_embeddings": not args.untie_embeddings_and_output_weights,
              "torch_dtype": "float32"}
    if kind == "alibi":
        _require(groups == heads, "drop --group-query-attention (BLOOM has one KV head per "
                 "query head)", kind, problems)
        _require(args.ffn_hidden_size in (None, 4 * hidden),
                 "drop --ffn-hidden-size (BLOOM's is 4 x hidden size)", kind, problems)
        _require(not args.untie_embeddings_and_output_weights,
                 "drop --untie-embeddings-and-output-weights (BLOOM ties them)", kind, problems)
        config = {"architectures": ["BloomForCausalLM"], "model_type": "bloom",
                  "n_layer": args.num_layers, "hidden_size": hidden, "n_head": heads,
                  "seq_length": positions, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                  "apply_residual_connection_post_layernorm": False, "slow_but_exact": False,
                  **common}
    else:
        _require(groups in (1, heads), "--num-query-groups must be 1 (multi-query) or the "
                 "number of heads", kind, problems)
        config = {"architectures": ["GPTBigCodeForCausalLM"], "model_type": "gpt_bigcode",
                  "n_layer": args.num_layers, "n_embd": hidden, "n_head": heads,
                  "n_inner": args.ffn_hidden_size or 4 * hidden, "n_positions": positions,
                  "multi_query": groups == 1 and heads > 1,
                  # Megatron-LM's GELU without --swiglu is the exact (erf) one.
                  "activation_function": "gelu", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                  "attn_pdrop": 0.0, **common}
    if problems:
        raise ValueError("flags do not describe a supported model: " + "; ".join(problems))
    return config


def scratch_hf_config(args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    """An HF Llama config.json for a model defined by Megatron-LM architecture flags, written
    through the Llama family's two-way config table."""
    other = hf_config(args, vocab_size)  # ALiBi (BLOOM) or learned positions
    if other is not None:
        return other
    llama_like = (args.swiglu and args.normalization == "RMSNorm" and args.disable_bias_linear
                  and args.position_embedding_type == "rope")
    if not llama_like:
        raise ValueError("models built from scratch must be Llama-style for now: pass --swiglu "
                         "--normalization RMSNorm --disable-bias-linear "
                         "--use-rotary-position-embeddings (or, with --normalization LayerNorm "
                         "and biases: --use-alibi-mask for BLOOM-style, "
                         "--position-embedding-type learned_absolute for GPT-BigCode-style)")
    require_size_flags(args)
    heads = args.num_attention_heads
    model_args = ModelArgs(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
        num_attention_heads=heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else heads,
        kv_channels=args.hidden_size // heads, vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings or args.seq_length,
        layernorm_epsilon=args.norm_epsilon,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rope_theta": args.rotary_base, "torch_dtype": "float32",
            **LLAMA.hf_config_updates(model_args)}
