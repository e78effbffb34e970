"""`megatron-patch train`: Megatron-LM's training flags (`training.arguments`), and the run."""

from __future__ import annotations

import argparse

from megatron_patch.training import arguments

# Function-level import: training.loop imports megatron.core (seconds), which the parser and a
# refused flag do not need.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    arguments.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    args = arguments.validate(args)  # before importing megatron-core, which takes seconds
    from megatron_patch.training import loop

    return loop.run(args)
