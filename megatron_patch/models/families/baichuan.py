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
