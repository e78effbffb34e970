"""What a run prints: our own progress and warnings by default, every library's with --verbose.

Without --verbose, Megatron-Core's INFO lines (the DDP bucket parameter list, the dataset
builder's index and split reports, its config dumps) and other libraries' Python warnings
(Transformer Engine / Apex absent, deprecations inside megatron-core and torch) are hidden; our
own `megatron_patch.*` loggers keep INFO, and every library's logging WARNING and ERROR still
show. `--log-level` sets the level of the other libraries' loggers (Megatron-LM's
`--logging-level` takes the same number or name).
"""

from __future__ import annotations

import argparse
import logging
import warnings

LEVELS = ("debug", "info", "warning", "error")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--verbose", action="store_true",
                       help="also show Megatron-Core's INFO lines and other libraries' warnings")
    group.add_argument("--log-level", "--logging-level", dest="log_level", default=None,
                       help="level of other libraries' loggers: debug, info, warning, error or "
                            "a number (default warning; info with --verbose)")


def _level(value: str | int | None, verbose: bool) -> int:
    if value is None:
        return logging.INFO if verbose else logging.WARNING
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    if str(value).lower() not in LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LEVELS)} or a number, "
                         f"got {value!r}")
    return getattr(logging, str(value).upper())


def setup(verbose: bool = False, log_level: str | int | None = None) -> None:
    """Configure logging and warnings for a run (call once, before megatron-core is used)."""
    level = _level(log_level, verbose)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    # Our own progress stays visible whatever the libraries' level.
    logging.getLogger("megatron_patch").setLevel(min(level, logging.INFO))
    # megatron-core sets its own loggers' levels in places; the parent decides here.
    logging.getLogger("megatron").setLevel(level)
    if not verbose and level > logging.INFO:
        # Other libraries' warnings say nothing the user can act on in a run that works
        # (no Transformer Engine on CPU, deprecations inside megatron-core and torch).
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|torch)\.")
