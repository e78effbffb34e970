"""Baichuan and Baichuan2 (remote code). Which variant a config describes:

- `BaiChuanForCausalLM` is Baichuan-7B: RoPE.
- `BaichuanForCausalLM` is Baichuan-13B, Baichuan2-7B or Baichuan2-13B. Their configs do not
  say which position encoding they use; the released models are told apart by size, as other
  loaders do: hidden_size 4096 (the 7B models) uses RoPE, any other size ALiBi. Baichuan2 (vocab
  125696) normalises its output-layer rows (NormHead).

A config may state both explicitly, and tiny test models do: `"position_embedding_type":
"rope" | "alibi"` and `"norm_head": true | false` override the inference above.
"""

from __future__ import annotations

from typing import Any

from megatron_patch.models.families.llama import LLAMA_CONFIG, LLAMA_REQUIRES, LLAMA_WEIGHTS
from megatron_patch.models.registry import register
from megatron_patch.models.spec import ConfigField, FamilySpec
from megatron_patch.models.weight_rules import QKV_CONCAT, Rule

BAICHUAN2_VOCAB_SIZE = 125696


def uses_alibi(hf_config: dict[str, Any]) -> bool:
    explicit = hf_config.get("position_embedding_type")
    if explicit is not None:
        if explicit not in ("rope", "alibi"):
            raise ValueError(f"Baichuan config.json position_embedding_type={explicit!r}: "
                             "expected 'rope' or 'alibi'")
        return explicit == "alibi"
    if "BaiChuanForCausalLM" in (hf_config.get("architectures") or []):
        return False
    return hf_config["hidden_size"] != 4096


def uses_norm_head(hf_config: dict[str, Any]) -> bool:
    explicit = hf_config.get("norm_head")
    if explicit is not None:
        return bool(explicit)
    return hf_config.get("vocab_size") == BAICHUAN2_VOCAB_SIZE


# Llama with q, k and v fused as [q; k; v] in one W_pack (multi-head attention, no biases).
W_PACK = Rule("decoder.layers.{layer}.self_attention.linear_qkv.weight",
              "model.layers.{layer}.self_attn.W_pack.weight", QKV_CONCAT)
BAICHUAN_WEIGHTS = tuple(
    W_PACK if r.megatron == W_PACK.megatron else r for r in LLAMA_WEIGHTS
)
BAICHUAN_CONFIG = LLAMA_CONFIG + (
    # NormHead (Baichuan2): the raw lm_head rows are kept, and normalised in every forward.
    ConfigField("norm_head", "norm_head", uses_norm_head),
)
BAICHUAN_REQUIRES = {
    "hidden_act": LLAMA_REQUIRES["hidden_act"],
    # lm_head is its own tensor in every Baichuan model; NormHead needs it untied.
    "tie_word_embeddings": lambda v: not v,
    # Baichuan2's training-only auxiliary loss on the logits; Megatron's loss has no such term.
    "z_loss_weight": lambda v: v == 0,
}

BAICHUAN_ROPE = register(
    FamilySpec(
        name="baichuan",
        # Baichuan-7B (BaiChuan...) and Baichuan2-7B (Baichuan...): RoPE.
        architectures=("BaiChuanForCausalLM", "BaichuanForCausalLM"),
        config_fields=BAICHUAN_CONFIG,
        constants={},
        weights=BAICHUAN_WEIGHTS,
        hf_ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
        requires=BAICHUAN_REQUIRES,
        applies=lambda c: not uses_alibi(c),
    )
)
