"""StarCoder2 against transformers' Starcoder2ForCausalLM."""

from zoo import Case, native
from zoo.remote_format import with_random_biases

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1000, max_position_embeddings=256,
            norm_epsilon=1e-5, rope_theta=100000.0, use_bias=True,
            hidden_act="gelu_pytorch_tanh")

CASES = [
    # Released models tie the output layer; a window shorter than the 32-token test sequences.
    Case("starcoder2", with_random_biases(native(
        "Starcoder2ForCausalLM", seed=7, **TINY, tie_word_embeddings=True, sliding_window=8))),
    Case("starcoder2_untied", with_random_biases(native(
        "Starcoder2ForCausalLM", seed=8, **TINY, tie_word_embeddings=False,
        sliding_window=None))),
]
