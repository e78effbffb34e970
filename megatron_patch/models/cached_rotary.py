"""Self-attention whose KV cache holds keys already rotated (rotary position embedding).

Megatron-Core's static-batching KV cache stores keys before rotary, so every decode step
re-rotates the whole cached key in every layer (and recomputes its cos/sin). Rotation is
elementwise per position, so rotating each new key once, at its own positions, before it enters
the cache gives the same cached-and-rotated keys bit for bit; the attention then skips megatron's
key rotation (it does when the key's embedding is None). Training, and every inference path
other than static batching with rotary embeddings, is megatron's own.
"""

from __future__ import annotations

from typing import Any

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention


class CachedRotarySelfAttention(SelfAttention):
    """SelfAttention that rotates keys before caching them (static-batching inference)."""

    # megatron-core internal: overrides a private method (tests/test_megatron_core_contract.py).
    def _adjust_key_value_for_inference(self, inference_context, query, key, value,
                                        rotary_pos_emb, *args: Any, **kwargs: Any):
        if (inference_context is None or rotary_pos_emb is None or self.config.flash_decode
                or not inference_context.is_static_batching()):
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = inference_context.sequence_len_offset
        key = apply_rotary_pos_emb(key, k_pos_emb[start:start + key.size(0)],
                                   config=self.config, cp_group=self.pg_collection.cp)
        query, key, value, (q_pos_emb, _), mask_type, block_table = (
            super()._adjust_key_value_for_inference(
                inference_context, query, key, value, (q_pos_emb, k_pos_emb), *args, **kwargs))
        return query, key, value, (q_pos_emb, None), mask_type, block_table
