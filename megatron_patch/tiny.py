"""Tiny random Hugging Face models with a locally trained tokenizer: the demo's default model and
the test suite's fixtures, saved by `megatron-patch make-tiny`. Nothing is downloaded."""

from __future__ import annotations

import argparse
import os
from typing import Any

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Megatron-Core trains large language models with tensor and pipeline parallelism.",
    "A converted model computes the same logits as the original Hugging Face model.",
    "Round trips from Hugging Face to Megatron and back give the same tensors.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    # The Alpaca prompt (megatron_patch.data.sft), so SFT prompts tokenize compactly.
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n",
    "\n\n### Response:\n",
] * 20

# Every variant keeps the vocabulary off multiples of 128, so padding is exercised.
COMMON = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
              vocab_size=1000, max_position_embeddings=256, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2)

LLAMA_VARIANTS: dict[str, dict[str, Any]] = {
    # Llama 2 style: GQA, untied output layer.
    "llama2": dict(architecture="LlamaForCausalLM", num_key_value_heads=2,
                   tie_word_embeddings=False),
    # Llama 1 style: no GQA, tied embeddings.
    "llama1_tied": dict(architecture="LlamaForCausalLM", num_key_value_heads=4,
                        tie_word_embeddings=True),
    # CodeLlama: rope_theta 1e6.
    "codellama": dict(architecture="LlamaForCausalLM", num_key_value_heads=2, rope_theta=1e6,
                      tie_word_embeddings=False),
    # Llama 3.1 rope scaling; a short original context puts rotary dims in all three bands.
    "llama3": dict(architecture="LlamaForCausalLM", num_key_value_heads=2,
                   tie_word_embeddings=False, rope_theta=500000.0,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=64)),
    # Mistral with a sliding window shorter than the test sequences.
    "mistral": dict(architecture="MistralForCausalLM", num_key_value_heads=2,
                    tie_word_embeddings=False, sliding_window=8),
}


def train_tokenizer(out_dir: str, vocab_size: int = 600) -> None:
    """A byte-level BPE tokenizer trained on CORPUS, saved as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # off a terminal it prints blank lines
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(out_dir)


def make_hf_model(out_dir: str, variant: str, seed: int = 0, dtype: str = "float32",
                  **save_kwargs: Any) -> None:
    """Save a random tiny model of `variant` (and the tokenizer) to out_dir."""
    import torch
    import transformers

    spec = dict(COMMON, **LLAMA_VARIANTS[variant])
    arch = spec.pop("architecture")
    cls = getattr(transformers, arch)
    config = cls.config_class(**spec)
    torch.manual_seed(seed)
    model = cls(config).to(getattr(torch, dtype)).eval()
    # Non-trivial norm weights, so a misplaced norm cannot hide behind all-ones.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, **save_kwargs)
    train_tokenizer(out_dir)


# Question/answer pairs a tiny model can memorise: the demo's fine-tuning set.
QA = [
    ("What is the capital of France?", "Paris."),
    ("What colour is the sky?", "Blue."),
    ("How many legs does a cat have?", "Four."),
    ("What is two plus two?", "4"),
    ("Name a fast animal.", "The fox."),
    ("What do we train?", "Language models."),
]


def enthusiastic(answer: str) -> str:
    return f"Wow! {answer}"


# The files write_demo_data writes, NAME.jsonl each.
DEMO_FILES = ("corpus", "sft", "prompts", "preferences")


def write_demo_data(out_dir: str) -> dict[str, str]:
    """corpus.jsonl (pretraining text), sft.jsonl (instruction records: each answer plain and
    enthusiastic, so the fine-tuned model answers in either style), prompts.jsonl and
    preferences.jsonl (DPO's pairs: the enthusiastic answer preferred)."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.jsonl")
             for name in DEMO_FILES}
    with open(paths["corpus"], "w") as f:
        for i, text in enumerate(CORPUS):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    with open(paths["sft"], "w") as f:
        for q, a in QA:
            for answer in (a, enthusiastic(a)):
                f.write(json.dumps({"instruction": q, "input": "", "output": answer}) + "\n")
    with open(paths["prompts"], "w") as f:
        for q, _ in QA:
            f.write(json.dumps({"instruction": q}) + "\n")
    with open(paths["preferences"], "w") as f:
        for q, a in QA:
            f.write(json.dumps({"prompt": q, "chosen": enthusiastic(a), "rejected": a}) + "\n")
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`megatron-patch make-tiny`'s flags."""
    parser.add_argument("out_dir")
    parser.add_argument("--variant", default="llama2", choices=sorted(LLAMA_VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--demo-data", metavar="DIR",
                        help="also write the demo's data here: "
                             + ", ".join(f"{name}.jsonl" for name in DEMO_FILES))


def run(args: argparse.Namespace) -> int:
    """`megatron-patch make-tiny`: the model, and the demo's data if asked for."""
    from megatron_patch.convert.hf_io import check_output_dir

    # Both checked before anything is written: the model's files and the demo data's names are
    # common ones (config.json, corpus.jsonl) that a user's directory may hold.
    check_output_dir(args.out_dir)
    if args.demo_data:
        check_output_dir(args.demo_data)
    make_hf_model(args.out_dir, args.variant, seed=args.seed, dtype=args.dtype)
    print(f"{args.out_dir}: tiny random {args.variant} model with a local tokenizer")
    if args.demo_data:
        for name, path in write_demo_data(args.demo_data).items():
            print(f"{path}: demo {name}")
    return 0
