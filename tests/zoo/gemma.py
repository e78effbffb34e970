"""Gemma 2 and Gemma 3 (text) against their native transformers classes.

Sizes make every Gemma switch matter: head_dim (32) is not hidden / heads, query_pre_attn_scalar
(24) is not head_dim, the sliding window (8) is shorter than the test's sequence (32), the
soft-caps (2 on attention scores, 3 on logits) are near the tiny model's score magnitudes, and
Gemma 3's global layers use linear RoPE scaling with a base other than the local layers'.
"""

from zoo import DENSE, Case, native

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=96, vocab_size=1000, max_position_embeddings=256,
            rms_norm_eps=1e-5, query_pre_attn_scalar=24, sliding_window=8)

CASES = [
    # Tied (Gemma's default); the default layer pattern: sliding, full, sliding, full.
    Case("gemma2", native("Gemma2ForCausalLM", **TINY, attn_logit_softcapping=2.0,
                          final_logit_softcapping=3.0),
         layouts=DENSE, generate=True),
    Case("gemma3", native("Gemma3ForCausalLM", **TINY, tie_word_embeddings=False,
                          layer_types=["sliding_attention", "full_attention",
                                       "sliding_attention", "sliding_attention"],
                          rope_parameters={
                              "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                 "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default",
                                                    "rope_theta": 1e4}}),
         layouts=DENSE, generate=True),
]
