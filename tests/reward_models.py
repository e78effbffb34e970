"""Tiny HF reward models (`*ForSequenceClassification`, one label) for the reward-model tests."""

from __future__ import annotations

from megatron_patch import tiny

PAD, EOS = 0, 2
LENGTHS = (16, 11, 7, 3)
QWEN2 = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=1000, max_position_embeddings=256,
             rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=True, bos_token_id=1,
             eos_token_id=EOS)
# name -> (architecture, config, pad_token_id). "llama_pad_eos": pad == EOS, so a sequence's
# closing EOS is padding to transformers, which scores the token before it.
MODELS = {
    "llama": ("LlamaForSequenceClassification",
              dict(tiny.COMMON, **tiny.LLAMA_VARIANTS["llama2"]), PAD),
    "qwen2": ("Qwen2ForSequenceClassification", QWEN2, PAD),
    "llama_pad_eos": ("LlamaForSequenceClassification",
                      dict(tiny.COMMON, **tiny.LLAMA_VARIANTS["llama1_tied"]), EOS),
}


def save_hf_reward_model(out_dir: str, arch: str, config: dict, pad: int, seed: int = 0):
    """A random tiny HF reward model (score head included) and the tiny tokenizer."""
    import torch
    import transformers
    from zoo import randomize_norms

    cls = getattr(transformers, arch)
    config = {k: v for k, v in config.items() if k != "architecture"}
    torch.manual_seed(seed)
    model = cls(cls.config_class(**config, num_labels=1, pad_token_id=pad)).float().eval()
    randomize_norms(model)
    model.save_pretrained(out_dir)
    tiny.train_tokenizer(out_dir)
    return model
