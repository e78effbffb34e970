"""The `megatron-patch` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megatron_patch import errors

# Function-level imports: each command's module (numpy, tqdm, torch, megatron.core behind
# them) is imported when its parser is built or the command runs, so `import megatron_patch.cli`
# stays at ~20 ms and loads three of our modules.


def _convert(args: argparse.Namespace) -> int:
    from megatron_patch.convert import hf_megatron, megatron_lm
    from megatron_patch.lora import checkpoint as lora_checkpoint

    lora = args.direction == "megatron-to-hf" and lora_checkpoint.is_lora_checkpoint(args.src)
    if getattr(args, "merge_lora", False) and not lora:
        raise ValueError(f"--merge-lora: {args.src} is not a LoRA training checkpoint (it has "
                         f"no {lora_checkpoint.LORA_FILE}); only megatron-to-hf of one merges")
    base_name = getattr(args, "lora_base_model_name_or_path", None)  # megatron-to-hf's flag
    if base_name and not (lora and not args.merge_lora):
        raise ValueError("--lora-base-model-name-or-path: only the PEFT adapter exported from a "
                         "LoRA training checkpoint (megatron-to-hf without --merge-lora) names "
                         "its base")
    if lora:
        files = lora_checkpoint.export(args.src, args.dst, iteration=args.iteration,
                                       merge=args.merge_lora, max_shard_size=args.max_shard_size,
                                       base_model_name_or_path=base_name)
        what = "merged HF model" if args.merge_lora else "PEFT adapter"
        print(f"{args.dst}: {what} ({', '.join(files)})")
        return 0
    if args.direction == "import-megatron" or (
            args.direction == "megatron-to-hf" and megatron_lm.is_megatron_lm_checkpoint(args.src)):
        return megatron_lm.run(args)
    if args.direction == "hf-to-megatron":
        import torch

        dtype = getattr(torch, args.params_dtype) if args.params_dtype else None
        meta = hf_megatron.hf_to_megatron(
            args.src, args.dst,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            extra_vocab_size=args.extra_vocab_size, params_dtype=dtype,
        )
        print(f"{args.dst}: {meta.architecture}, vocab {meta.vocab_size} padded to "
              f"{meta.padded_vocab_size}, {meta.dtype}")
    else:
        files = hf_megatron.megatron_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size,
                                           iteration=args.iteration)
        print(f"{args.dst}: {len(files)} safetensors file(s)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from megatron_patch import verify

    return verify.launch(args)


def _train(args: argparse.Namespace) -> int:
    from megatron_patch.training import arguments

    args = arguments.validate(args)  # before importing megatron-core, which takes seconds
    from megatron_patch.training import loop

    return loop.run(args)


def _rl(args: argparse.Namespace) -> int:
    from megatron_patch.rlhf import cli as rl_cli

    return rl_cli.run(rl_cli.validate(args))


def _preprocess(args: argparse.Namespace) -> int:
    from megatron_patch.data import preprocess

    return preprocess.run(args)


def _generate(args: argparse.Namespace) -> int:
    from megatron_patch import generation

    return generation.run(args)


def _make_tiny(args: argparse.Namespace) -> int:
    from megatron_patch import tiny
    from megatron_patch.convert.hf_io import check_output_dir

    # Both checked before anything is written: the model's files and the demo data's names are
    # common ones (config.json, corpus.jsonl) that a user's directory may hold.
    check_output_dir(args.out_dir)
    if args.demo_data:
        check_output_dir(args.demo_data)
    tiny.make_hf_model(args.out_dir, args.variant, seed=args.seed, dtype=args.dtype)
    print(f"{args.out_dir}: tiny random {args.variant} model with a local tokenizer")
    if args.demo_data:
        for name, path in tiny.write_demo_data(args.demo_data).items():
            print(f"{path}: demo {name}")
    return 0


def _extend_vocab(args: argparse.Namespace) -> int:
    from megatron_patch import vocab

    return vocab.run(args)


def build_parser() -> argparse.ArgumentParser:
    from megatron_patch import generation, tiny, verify, vocab
    from megatron_patch.data import preprocess
    from megatron_patch.rlhf import cli as rl_cli
    from megatron_patch.rlhf import modes as rlhf_modes  # noqa: F401 (registers rm, dpo)
    from megatron_patch.training import arguments

    parser = errors.ArgumentParser(prog="megatron-patch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert checkpoints between HF and Megatron-Core "
                                             "(`convert DIRECTION --help`: its flags)")
    add_convert_directions(convert)
    convert.set_defaults(func=_convert)

    check = sub.add_parser("verify", help="compare a converted checkpoint with the HF model "
                                          "at a TP/PP layout")
    verify.add_arguments(check)
    check.set_defaults(func=_verify)

    train = sub.add_parser(
        "train", help="train with Megatron-LM flags (run under torchrun for several processes; "
                      "`megatron-patch train --help` lists them)")
    arguments.add_arguments(train)
    train.set_defaults(func=_train)

    rl = sub.add_parser(
        "rl", help="reinforcement learning (GRPO, PPO) with rollouts from the trained model "
                   "itself; the flags of `train` plus --algorithm, --prompt-data-path, "
                   "--reward-function / --reward-model")
    rl_cli.add_arguments(rl)
    rl.set_defaults(func=_rl)

    prep = sub.add_parser("preprocess", help="JSON lines -> Megatron .bin/.idx datasets")
    preprocess.add_arguments(prep)
    prep.set_defaults(func=_preprocess)

    gen = sub.add_parser("generate", help="complete prompts from a .txt file (one a line) or "
                                          "JSON lines (under torchrun for TP > 1)")
    generation.add_arguments(gen)
    gen.set_defaults(func=_generate)

    make = sub.add_parser("make-tiny", help="save a tiny random HF model with a local tokenizer")
    make.add_argument("out_dir")
    make.add_argument("--variant", default="llama2", choices=sorted(tiny.LLAMA_VARIANTS))
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    make.add_argument("--demo-data", metavar="DIR",
                      help="also write the demo's data here: "
                           + ", ".join(f"{name}.jsonl" for name in tiny.DEMO_FILES))
    make.set_defaults(func=_make_tiny)

    extend = sub.add_parser("extend-vocab", help="add pieces (e.g. Chinese words) to a model's "
                                                 "tokenizer and grow its embeddings")
    vocab.add_arguments(extend)
    extend.set_defaults(func=_extend_vocab)
    for command in sub.choices.values():
        for leaf in _leaf_parsers(command):
            add_debug_flag(leaf)
            if not any("--verbose" in action.option_strings for action in leaf._actions):
                add_verbose_flag(leaf)
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser, or those of its subcommands (convert's directions), which read the flags."""
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [p for a in nested for p in a.choices.values()] if nested else [parser]


def add_convert_directions(convert: argparse.ArgumentParser) -> None:
    """`convert DIRECTION SRC DST`, each direction with its own flags and help."""
    from megatron_patch.convert import megatron_lm

    directions = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION",
                                        parser_class=errors.ArgumentParser)
    to_megatron = directions.add_parser("hf-to-megatron", help="an HF model directory -> a "
                                        "Megatron-Core checkpoint that loads at any TP/PP")
    to_megatron.add_argument("src", help="HF model directory (config.json, safetensors)")
    to_megatron.add_argument("dst", help="output checkpoint directory")
    to_megatron.add_argument("--make-vocab-size-divisible-by", type=errors.positive_int,
                             default=128, help="pad the vocabulary to a multiple of this "
                                               "times TP (default 128)")
    to_megatron.add_argument("--tensor-model-parallel-size", type=errors.positive_int,
                             default=1, help="pad the vocabulary for this TP size (it loads at "
                                             "any TP that divides the padded size)")
    to_megatron.add_argument("--extra-vocab-size", type=errors.nonnegative_int, default=0,
                             help="extra embedding rows before padding")
    to_megatron.add_argument("--params-dtype", choices=["float32", "float16", "bfloat16"],
                             help="store weights in this dtype (default: the source's)")

    to_hf = directions.add_parser("megatron-to-hf", help="a Megatron checkpoint (megatron-patch's, "
                                  "a LoRA run's, or Megatron-LM's) -> an HF model directory")
    to_hf.add_argument("src", help="checkpoint directory: megatron-patch's (any iteration, any "
                                   "layout it was saved at), a LoRA training run's, or "
                                   "Megatron-LM's (legacy or torch_dist)")
    to_hf.add_argument("dst", help="output HF directory")
    to_hf.add_argument("--max-shard-size", default="5GB",
                       help="largest safetensors file, decimal units (default 5GB, "
                            "transformers 4.x's save_pretrained default; 5.x uses 50GB)")
    to_hf.add_argument("--merge-lora", action="store_true",
                       help="a LoRA training checkpoint: write the full HF model with the "
                            "adapters merged into its weights (default: a PEFT adapter "
                            "directory, adapter_config.json + adapter_model.safetensors)")
    to_hf.add_argument("--lora-base-model-name-or-path", default=None, metavar="NAME_OR_DIR",
                       help="the exported PEFT adapter's base_model_name_or_path: the HF model "
                            "(hub name or directory) its base was converted from (default: as "
                            "recorded at training)")

    import_lm = directions.add_parser("import-megatron", help="a Megatron-LM checkpoint (legacy "
                                      "or torch_dist) -> a megatron-patch checkpoint")
    import_lm.add_argument("src", help="Megatron-LM checkpoint root or iteration directory")
    import_lm.add_argument("dst", help="output checkpoint directory")
    for parser in (to_hf, import_lm):
        parser.add_argument("--iteration", default=None, type=errors.iteration,
                            help="convert this iteration instead of the latest")
        megatron_lm.add_arguments(parser)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error (or set {errors.DEBUG_ENV}=1)")


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="also show other libraries' warnings (megatron-core's about "
                             "Transformer Engine and Apex, deprecations)")


# Where each command writes: an OSError without a file name (a full disk) is told against it.
OUTPUTS = {"convert": "dst", "extend-vocab": "dst", "make-tiny": "out_dir", "train": "save",
           "rl": "save", "preprocess": "output_prefix", "generate": "output_file"}


def main(argv: list[str] | None = None) -> int:
    # Our own progress at INFO; other libraries' chatter (megatron-core's import notices) hidden.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron_patch").setLevel(logging.INFO)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # convert's errors name the direction, as its argparse errors do.
    command = " ".join(filter(None, (args.command, getattr(args, "direction", None))))
    if unknown:  # said by the command's parser, as argparse's top level would not
        parser.exit(2, f"{parser.prog} {command}: error: unrecognized arguments: "
                       f"{' '.join(unknown)} (--help lists the flags)\n")
    if args.debug:
        os.environ[errors.DEBUG_ENV] = "1"  # also for the processes this command starts
    output = getattr(args, OUTPUTS.get(args.command, ""), None)
    return errors.run_main(f"megatron-patch {command}", lambda: args.func(args),
                           output=output, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
