"""Training flags, with Megatron-LM's names and meanings."""

from __future__ import annotations

import argparse
import math

from megatron_patch import logs
from megatron_patch.errors import (
    ArgumentParser,
    FloatRange,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from megatron_patch.lora import training as lora_training
from megatron_patch.prompts import PROMPT_FORMATS
from megatron_patch.training import metrics
from megatron_patch.training.modes import MODES, SELECTABLE, mode_class

# Adam's moment decay rates (torch.optim.Adam's range).
ADAM_BETA = FloatRange(0.0, 1.0, high_open=True)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("checkpoints")
    g.add_argument("--load", help="checkpoint to start from: a converted model (fresh run) or a "
                                  "training checkpoint (resumed exactly)")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="load this iteration of --load instead of the one its tracker names")
    g.add_argument("--save", help="where to save checkpoints")
    g.add_argument("--save-interval", type=positive_int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--exit-interval", type=positive_int, default=None,
                   help="stop (after saving, with --save) once the iteration is a multiple of this")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only and start at iteration 0")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, take the learning-rate schedule (--lr, --min-lr, "
                        "--lr-decay-style, warmup and decay lengths, weight decay) from the "
                        "command line instead of the checkpoint")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's learning-rate schedule whatever the "
                        "command line says (default: a difference is refused)")
    g.add_argument("--overwrite-checkpoints", action="store_true",
                   help="let --save replace checkpoints of iterations after the one this run "
                        "starts from (default: refused)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    g.add_argument("--expert-model-parallel-size", type=positive_int, default=1,
                   help="experts of a mixture-of-experts model split over this many data "
                        "parallel ranks")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")

    g = p.add_argument_group("precision and memory")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None,
                   help="FP8 through Transformer Engine (GPU only)")
    g.add_argument("--loss-scale", type=positive_float, default=None,
                   help="static loss scale for fp16 (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=positive_float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=positive_float, default=1.0)
    g.add_argument("--loss-scale-window", type=positive_float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--recompute-activations", action="store_true",
                   help="selective recomputation (same as --recompute-granularity selective)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform")
    g.add_argument("--recompute-num-layers", type=positive_int, default=1)
    g.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"],
                   default="auto", help="layer implementation (auto: Transformer Engine where "
                                        "importable on a GPU, else Megatron-Core's local one)")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="flash attention: Transformer Engine's where importable on a GPU, "
                        "else the flash_attn package (CUDA, fp16/bf16), else torch SDPA's flash "
                        "kernel (CUDA fp16/bf16, or CPU); the startup log names it")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=positive_int, default=1)
    g.add_argument("--global-batch-size", type=positive_int, default=None)
    g.add_argument("--seq-length", type=positive_int, default=None)
    g.add_argument("--train-iters", type=positive_int, default=None)
    g.add_argument("--train-tokens", type=positive_int, default=None)
    g.add_argument("--lr", type=nonnegative_float, default=1e-4)
    g.add_argument("--min-lr", type=nonnegative_float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"],
                   default="cosine")
    g.add_argument("--lr-warmup-iters", type=nonnegative_int, default=0)
    g.add_argument("--lr-warmup-tokens", type=nonnegative_int, default=None)
    g.add_argument("--lr-decay-iters", type=positive_int, default=None)
    g.add_argument("--weight-decay", type=nonnegative_float, default=0.01)
    g.add_argument("--adam-beta1", type=ADAM_BETA, default=0.9)
    g.add_argument("--adam-beta2", type=ADAM_BETA, default=0.999)
    g.add_argument("--adam-eps", type=positive_float, default=1e-8)
    g.add_argument("--clip-grad", type=nonnegative_float, default=1.0)
    g.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false",
                   dest="check_for_nan_in_loss_and_grad",
                   help="train on when the loss or a gradient is NaN or infinite (default: stop "
                        "before that iteration's optimizer step, nothing of it saved)")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="dataset prefixes, optionally weighted: [W1] P1 [W2] P2 ...")
    # Megatron-LM defaults to 969,30,1; this loop never evaluates a test split, so none is held out.
    g.add_argument("--split", default="98,2,0",
                   help="train,valid,test weights of each dataset's documents")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--tokenizer-model", default=None,
                   help="HF tokenizer directory (default: the one the checkpoint carries)")

    g = p.add_argument_group("supervised fine-tuning (--train-mode finetune)")
    g.add_argument("--train-mode", choices=list(SELECTABLE), default="pretrain",
                   help="what to train: pretrain (--data-path), finetune (SFT records), dpo "
                        "(preference pairs; rlhf/README.md)")
    g.add_argument("--train-data-path", help="SFT records: JSON list or JSON lines")
    g.add_argument("--valid-data-path", help="SFT validation records")
    g.add_argument("--epochs", type=positive_float, default=None,
                   help="SFT length in passes over the training set (instead of --train-iters)")
    g.add_argument("--pack-sequences", action="store_true",
                   help="pack several samples per sequence (each attends only to itself)")
    g.add_argument("--skip-long-samples", action="store_true",
                   help="drop samples longer than --seq-length instead of truncating them")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed SFT records (counted) instead of failing")

    g = p.add_argument_group("prompts of preference pairs (rm, dpo) and of megatron-patch rl")
    g.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                   help="how a string prompt is rendered. raw: the text as it is (preference "
                        "pairs: prompt + chosen / rejected + EOS as one text, TRL's standard "
                        "format); chat: as SFT renders an instruction (chat template, else the "
                        "Alpaca prompt); auto: chat for preference pairs, and for rl as for "
                        "`megatron-patch generate` (raw for `text` records and .txt files). "
                        "Message lists always use the chat template")

    # Each registered mode's own flags, in its own group (rlhf/ registers rm's and dpo's).
    for name in SELECTABLE:
        MODES[name].add_arguments(p)

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=positive_int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--eval-interval", type=positive_int, default=1000)
    g.add_argument("--eval-iters", type=nonnegative_int, default=10)
    logs.add_arguments(g)
    metrics.add_arguments(g)

    g = p.add_argument_group("model from scratch (with --load, any given must agree with the "
                             "checkpoint's architecture)")
    g.add_argument("--num-layers", type=positive_int)
    g.add_argument("--hidden-size", type=positive_int)
    g.add_argument("--ffn-hidden-size", type=positive_int)
    g.add_argument("--num-attention-heads", type=positive_int)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=positive_int, default=None)
    g.add_argument("--max-position-embeddings", type=positive_int, default=None)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default=None,
                   help="from scratch: default LayerNorm")
    g.add_argument("--norm-epsilon", type=positive_float, default=1e-5)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--position-embedding-type",
                   choices=["rope", "learned_absolute", "alibi", "none"], default=None,
                   help="from scratch: the position encoding; with --load it must agree with "
                        "the checkpoint's architecture (which decides)")
    g.add_argument("--use-rotary-position-embeddings", action="store_true")
    g.add_argument("--use-alibi-mask", action="store_true",
                   help="same as --position-embedding-type alibi")
    g.add_argument("--no-position-embedding", action="store_true",
                   help="same as --position-embedding-type none")
    g.add_argument("--rotary-base", type=positive_float, default=10000.0)
    g.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=128)
    g.add_argument("--extra-vocab-size", type=nonnegative_int, default=0)
    g.add_argument("--init-method-std", type=positive_float, default=0.02)
    lora_training.add_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = add_arguments(ArgumentParser(prog="megatron-patch train"))
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return validate(parser.parse_args(argv))


def validate(args: argparse.Namespace) -> argparse.Namespace:
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    implied = {kind for flag, kind in ((args.use_rotary_position_embeddings, "rope"),
                                       (args.use_alibi_mask, "alibi"),
                                       (args.no_position_embedding, "none")) if flag}
    if args.position_embedding_type is not None:
        implied.add(args.position_embedding_type)
    if len(implied) > 1:
        raise ValueError(f"conflicting position encodings requested: {sorted(implied)} "
                         "(--position-embedding-type, --use-rotary-position-embeddings, "
                         "--use-alibi-mask, --no-position-embedding)")
    if implied:
        args.position_embedding_type = implied.pop()
    split = args.split.replace("/", ",").split(",")
    try:
        weights = [float(w) for w in split]
    except ValueError:
        weights = []
    # Megatron-LM pads fewer than three weights with zeros.
    if (not 1 <= len(weights) <= 3 or not all(map(math.isfinite, weights))
            or min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"--split {args.split}: give up to three train,valid,test weights, "
                         "none negative, with a positive sum (e.g. 98,2,0)")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ValueError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler "
                         "are exclusive")
    if args.bf16 and args.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive")
    if args.seq_length is None:
        raise ValueError("--seq-length is required")
    for name in SELECTABLE:
        MODES[name].check_flags_of(args)
    mode_class(args.train_mode).check_args(args)
    lora_training.validate(args)
    return args
