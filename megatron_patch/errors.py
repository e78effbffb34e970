"""How errors reach the user: one line, `megatron-patch <command>: error: ...`.

Bad input (a flag, a file, a record) raises ValueError or OSError with a message naming what is
wrong; the entry points (`megatron-patch`, the torchrun workers, the launchers) print that one
line and exit non-zero. Under torchrun only rank 0 prints; every rank also leaves its line in
torchelastic's error file. Under the launcher's torchrun (launch.torchrun) no rank prints: the
launcher prints the line of the rank that failed first.
`--debug` or MEGATRON_PATCH_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

DEBUG_ENV = "MEGATRON_PATCH_DEBUG"
# Set by torchrun for each worker: a JSON file the agent reads when the worker fails.
ELASTIC_ERROR_FILE = "TORCHELASTIC_ERROR_FILE"
# Marks an error file written here (the message is a line already shown by rank 0).
ERROR_FILE_SOURCE = "megatron_patch"
# Set by launch.torchrun for its workers: no rank prints its error, the launcher prints the
# line of the rank that failed first (rank 0's own error is often only the consequence, a
# collective whose peer is gone: "Connection closed by peer").
LAUNCHER_REPORTS_ENV = "MEGATRON_PATCH_LAUNCHER_REPORTS"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block before them)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (sizes, counts); argparse names the flag."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


class FloatRange:
    """argparse type: a finite float within a range; NaN and infinities are always refused.
    The error is argparse's, so it names the flag, and comes before any model is built.

    `low`/`high` (None: unbounded) are included unless `low_open`/`high_open`."""

    def __init__(self, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open
        self.__name__ = "float"  # argparse's name for the type in its messages

    def describe(self) -> str:
        """The accepted values, e.g. 'a finite number in (0, 1]'."""
        if self.low is None and self.high is None:
            return "a finite number"
        if self.high is None:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"a finite number {'<' if self.high_open else '<='} {self.high:g}"
        return (f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (
            value < self.high if self.high_open else value <= self.high)
        if not (math.isfinite(value) and low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text}")
        return value

    def __repr__(self) -> str:
        return f"FloatRange({self.describe()})"


finite_float = FloatRange()  # any finite number
positive_float = FloatRange(0.0, low_open=True)
nonnegative_float = FloatRange(0.0)
probability = FloatRange(0.0, 1.0)


def iteration(text: str) -> int | str:
    """argparse type: a checkpoint iteration, `release` or a number >= 0."""
    if text == "release":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an iteration number or 'release', got "
                                         f"{text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def require_dir(flag: str, path: str | None) -> None:
    """A directory a flag names must exist (said before anything slow starts)."""
    if path and not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such directory"
        raise ValueError(f"{flag} {path}: {what}")


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv


def read_json(path: str) -> Any:
    """The JSON value of a file; a malformed file fails naming it, with line and column."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from e


def describe(exc: BaseException, output: str | None = None) -> str:
    """One line for an exception. An OSError without a file name (a write that hit a full disk)
    is told against `output`, the path the command was writing."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename or output
        # A message that names the path already ("writing OUT failed ...") is not prefixed
        # with it a second time.
        text = (f"{where}: {exc.strerror}" if where and str(where) not in exc.strerror
                else exc.strerror)
        if exc.filename2:
            text += f" (-> {exc.filename2})"
    else:
        text = str(exc).strip()
        if isinstance(exc, KeyError):
            text = f"missing key {text}"
        if not isinstance(exc, (ValueError, OSError)):
            # Not an error we raise for bad input: its type says more than its text alone.
            text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return " ".join(text.split())


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def report(prog: str, exc: BaseException, *, output: str | None = None,
           argv: list[str] | None = None) -> int:
    """Print `prog: error: ...` (rank 0 only) and return the exit status: 2 for bad input
    (ValueError, OSError), 1 for anything else."""
    expected = isinstance(exc, (ValueError, OSError))
    line = f"{prog}: error: {describe(exc, output)}"
    debug = debug_requested(argv)
    if not expected and not debug:
        line += f" ({DEBUG_ENV}=1 or --debug shows the traceback)"
    if (rank() == 0 and not os.environ.get(LAUNCHER_REPORTS_ENV)) or debug:
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        print(line, file=sys.stderr, flush=True)
    # After printing: torchrun may stop this rank any moment once another one failed, and the
    # launcher prints a line itself unless rank 0's error file says it was printed.
    _write_error_file(line)
    return 2 if expected else 1


def _write_error_file(line: str) -> None:
    path = os.environ.get(ELASTIC_ERROR_FILE)
    if not path:
        return
    try:
        with open(path, "w") as f:
            # time_ns: torchelastic's timestamp has whole seconds, too coarse to tell which
            # rank failed first.
            json.dump({"message": line, "timestamp": int(time.time()),
                       "time_ns": time.time_ns(), "source": ERROR_FILE_SOURCE}, f)
    except OSError:
        pass  # the line itself is what matters; rank 0 printed it


def run_main(prog: str, main: Callable[[], int], *, output: str | None = None,
             verbose: bool | None = None) -> int:
    """main(), with any exception reported as one line, and other libraries' Python warnings
    hidden unless `verbose` (default: --verbose is among the process's arguments)."""
    from megatron_patch import logs

    if verbose is None:
        verbose = "--verbose" in sys.argv[1:]
    with logs.library_warnings(verbose):
        try:
            return main()
        except KeyboardInterrupt:
            if rank() == 0:
                print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # every error becomes one line; --debug shows the traceback
            return report(prog, e, output=output)
