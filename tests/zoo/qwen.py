"""Qwen2 / Qwen2.5 and Qwen3 against their native transformers classes."""

from zoo import Case, native

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=1000, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=1e6)

CASES = [
    Case("qwen2", native("Qwen2ForCausalLM", **TINY, tie_word_embeddings=False)),
    # Small Qwen2.5 models tie the output layer to the embedding.
    Case("qwen2_tied", native("Qwen2ForCausalLM", **TINY, tie_word_embeddings=True)),
    # Qwen3's head_dim is not hidden_size / heads.
    Case("qwen3", native("Qwen3ForCausalLM", **TINY, head_dim=32, tie_word_embeddings=False)),
]
