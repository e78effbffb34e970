"""The `megatron-patch` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NamedTuple

from megatron_patch import errors


class Command(NamedTuple):
    """One `megatron-patch` command: a row of COMMANDS."""

    name: str
    help: str
    # A module with `add_arguments(parser)` and `run(args) -> int`, imported when the parser is
    # built: its imports (numpy, torch, megatron.core behind some) stay out of `import
    # megatron_patch.cli`, which loads three of our modules.
    module: str
    # The argument naming where the command writes: an OSError without a file name (a full disk)
    # is told against it.
    output: str | None = None


# The commands in the order `megatron-patch --help` lists them. A new command is a row here.
COMMANDS: tuple[Command, ...] = (
    Command("convert", "convert checkpoints between HF and Megatron-Core "
                       "(`convert DIRECTION --help`: its flags)",
            "megatron_patch.convert.cli", output="dst"),
    Command("verify", "compare a converted checkpoint with the HF model at a TP/PP layout",
            "megatron_patch.verify"),
    Command("train", "train with Megatron-LM flags (run under torchrun for several processes; "
                     "`megatron-patch train --help` lists them)",
            "megatron_patch.training.cli", output="save"),
    Command("rl", "reinforcement learning (GRPO, PPO) with rollouts from the trained model "
                  "itself; the flags of `train` plus --algorithm, --prompt-data-path, "
                  "--reward-function / --reward-model",
            "megatron_patch.rlhf.cli", output="save"),
    Command("preprocess", "JSON lines -> Megatron .bin/.idx datasets",
            "megatron_patch.data.preprocess", output="output_prefix"),
    Command("generate", "complete prompts from a .txt file (one a line) or JSON lines (under "
                        "torchrun for TP > 1)",
            "megatron_patch.generation", output="output_file"),
    Command("make-tiny", "save a tiny random HF model with a local tokenizer",
            "megatron_patch.tiny", output="out_dir"),
    Command("extend-vocab", "add pieces (e.g. Chinese words) to a model's tokenizer and grow "
                            "its embeddings",
            "megatron_patch.vocab.cli", output="dst"),
)


def build_parser() -> argparse.ArgumentParser:
    # The training modes rlhf/ defines register themselves (training/ does not know them) before
    # train's and rl's flags are built.
    from megatron_patch.rlhf import modes as rlhf_modes  # noqa: F401

    parser = errors.ArgumentParser(prog="megatron-patch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        module = importlib.import_module(command.module)
        command_parser = sub.add_parser(command.name, help=command.help)
        module.add_arguments(command_parser)
        command_parser.set_defaults(func=module.run)
        for leaf in _leaf_parsers(command_parser):
            add_debug_flag(leaf)
            if not any("--verbose" in action.option_strings for action in leaf._actions):
                add_verbose_flag(leaf)
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser, or those of its subcommands (convert's directions), which read the flags."""
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [p for a in nested for p in a.choices.values()] if nested else [parser]


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error (or set {errors.DEBUG_ENV}=1)")


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="also show other libraries' warnings (megatron-core's about "
                             "Transformer Engine and Apex, deprecations)")


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
    output_flag = next(c.output for c in COMMANDS if c.name == args.command)
    output = getattr(args, output_flag, None) if output_flag else None
    return errors.run_main(f"megatron-patch {command}", lambda: args.func(args),
                           output=output, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
