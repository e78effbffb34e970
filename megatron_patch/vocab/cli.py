"""`megatron-patch extend-vocab`: its flags and what it runs."""

from __future__ import annotations

import logging
import os
import tempfile

from megatron_patch.errors import iteration, positive_int
from megatron_patch.vocab.formats import SP_MODEL, TOKENIZER_JSON
from megatron_patch.vocab.pieces import (
    pieces_from_sentencepiece,
    pieces_from_word_list,
    train_sentencepiece,
)
from megatron_patch.vocab.weights import extend_hf, extend_megatron, is_megatron_checkpoint

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("src", help="HF model directory, or a megatron-patch checkpoint directory")
    p.add_argument("dst", help="output directory (same kind as src)")
    p.add_argument("--sp-model", action="append", default=[],
                   help="add the pieces of this sentencepiece model (repeatable)")
    p.add_argument("--words", action="append", default=[],
                   help="add the words of this file, one a line (repeatable)")
    p.add_argument("--train-from", metavar="CORPUS",
                   help="learn a sentencepiece model from this text file and add its pieces")
    p.add_argument("--vocab-size", type=positive_int, default=20000,
                   help="pieces to learn with --train-from (default 20000)")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"],
                   help="sentencepiece model type for --train-from")
    p.add_argument("--save-sp-model", metavar="PREFIX",
                   help="keep the model learnt with --train-from as PREFIX.model")
    p.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=128,
                   help="pad a grown vocabulary (config.json vocab_size) to a multiple of this")
    p.add_argument("--tensor-model-parallel-size", type=positive_int, default=1,
                   help="Megatron checkpoints: also pad for this TP size if the padded "
                        "vocabulary must grow")
    p.add_argument("--iteration", default=None, type=iteration,
                   help="Megatron checkpoints: extend this iteration instead of the latest")
    p.add_argument("--max-shard-size", default="5GB")


def run(args) -> int:
    texts: list[str] = []
    samples: list[str] = []
    with tempfile.TemporaryDirectory(prefix="extend-vocab-sp-") as tmp:
        sp_models = list(args.sp_model)
        if args.train_from:
            prefix = args.save_sp_model or os.path.join(tmp, "learnt")
            log.info("learning %d sentencepiece pieces from %s", args.vocab_size, args.train_from)
            sp_models.append(train_sentencepiece(args.train_from, args.vocab_size, prefix,
                                                 args.model_type))
            with open(args.train_from, encoding="utf-8") as f:
                # Sample texts for the tokenizer.model / tokenizer.json consistency check.
                samples = [line.rstrip("\n") for _, line in zip(range(1000), f, strict=False)]
        for path in sp_models:
            texts += pieces_from_sentencepiece(path)
        for path in args.words:
            texts += pieces_from_word_list(path)
    if not texts:
        raise ValueError("no new pieces: give --sp-model, --words or --train-from")
    if is_megatron_checkpoint(args.src):
        summary = extend_megatron(
            args.src, args.dst, texts,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            iteration=args.iteration, sample_texts=samples)
    else:
        summary = extend_hf(args.src, args.dst, texts,
                            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                            max_shard_size=args.max_shard_size, sample_texts=samples)
    for line in summary.lines():
        print(line)
    if summary.inconsistent:
        print(f"warning: {summary.inconsistent} texts encode differently with {SP_MODEL} and "
              f"{TOKENIZER_JSON}")
    print(f"{args.dst}: extended")
    return 0
