"""What a run prints: our own progress and warnings by default, every library's with --verbose.

Without --verbose, Megatron-Core's INFO lines (the DDP bucket parameter list, the dataset
builder's index and split reports, its config dumps) and other libraries' Python warnings
(Transformer Engine / Apex absent, deprecations inside megatron-core and torch) are hidden; our
own `megatron_patch.*` loggers keep INFO, and every library's logging WARNING and ERROR still
show. The warnings are hidden by the entry points only (`errors.run_main`, around the command's
run, through `library_warnings`): importing or calling the library changes no filter.
`--log-level` sets the level of the other libraries' loggers (Megatron-LM's `--logging-level`
takes the same number or name).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from collections.abc import Iterator

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
    """Configure logging for a run (call once, before megatron-core is used)."""
    level = _level(log_level, verbose)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    # Our own progress stays visible whatever the libraries' level.
    logging.getLogger("megatron_patch").setLevel(min(level, logging.INFO))
    # megatron-core sets its own loggers' levels in places; the parent decides here.
    logging.getLogger("megatron").setLevel(level)


# The UserWarnings hidden without --verbose: megatron-core's "Transformer Engine and Apex are not
# installed" and the like from megatron, torch and transformers; deprecation notices are hidden
# from every module but ours.
NOISY_MODULES = r"(megatron|torch|transformers)(\.|$)"
NOT_OURS = r"(?!megatron_patch(\.|$))"


@contextlib.contextmanager
def library_warnings(verbose: bool) -> Iterator[None]:
    """Inside: other libraries' Python warnings hidden unless `verbose`; ours always shown. The
    process's warning filters are restored on exit."""
    with warnings.catch_warnings():
        if not verbose:
            # Nothing the user can act on in a run that works (no Transformer Engine on CPU,
            # deprecations inside the libraries).
            warnings.filterwarnings("ignore", category=UserWarning, module=NOISY_MODULES)
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=NOT_OURS)
        yield
