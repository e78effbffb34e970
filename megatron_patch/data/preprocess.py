"""JSON lines -> a Megatron-Core mmap dataset (`.bin` + `.idx`) for pretraining.

    python -m megatron_patch.data.preprocess --input 'corpus/*.jsonl' \\
        --output-prefix data/corpus --tokenizer-model Llama-2-7b-hf --workers 8

writes `data/corpus_text_document.bin` and `.idx` in megatron-core's `IndexedDataset` format
(written by `megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`), so Megatron-LM and
Megatron-Core read it unmodified: pass `data/corpus_text_document` as `--data-path`.

Every input line is one JSON object; the document is its `--json-keys` value (default `text`).
Each document is tokenized as the tokenizer does by default (an HF tokenizer adds its special
tokens, e.g. Llama's BOS; a sentencepiece model adds none) and gets the tokenizer's EOS id
appended. Token ids are stored as uint16 when the vocabulary has fewer than 65500 entries, int32
otherwise (megatron-core's `DType.optimal_dtype`).

Lines: a malformed line (not JSON, not an object, key missing, value not a string) stops the run
with `file:line: reason` and writes nothing, unless `--skip-bad-lines`, which skips and counts it.
Blank lines and empty documents are skipped and counted. Progress goes to stderr every
`--log-interval` documents, a summary line to stdout at the end.

Output is written under temporary names (`<final name>.tmp-<pid>`) and renamed when complete:
`.bin` first, `.idx` last, and an existing `.idx` of the same name is removed before either rename.
So a dataset whose `.idx` exists is always complete, and an interrupted run never leaves one that
looks complete. Ctrl-C or SIGTERM stops the run after the task in hand (a second one at once),
exit status 128 + the signal number. Temporaries are removed on errors and interrupts; only
SIGKILL or a crash can leave `*.tmp-<pid>` files, which are safe to delete.

Flags follow Megatron-LM's tools/preprocess_data.py where one exists. Differences:

- `--input` takes a file, a glob or a comma-separated list of either (Megatron-LM: one file).
- `--json-keys` takes one key (Megatron-LM: several, one dataset each).
- `--tokenizer-model` (aliases `--tokenizer-dir`, `--tokenizer-name-or-path`) takes an HF
  tokenizer directory or hub name (AutoTokenizer) or a sentencepiece `.model` file; there is no
  `--tokenizer-type`, `--vocab-file` or `--merge-file`.
- EOD is appended by default (`--no-append-eod` turns it off); in Megatron-LM it is off unless
  `--append-eod` is given. `--append-eod` is accepted. A document the tokenizer already ends
  with EOS (a post-processor that appends it) gets no second one.
- `--workers` defaults to 1. With 1 the work runs in this process; with N > 1 in N worker
  processes (JSON parsing and tokenizing; this process reads and writes), with identical output.
- Not supported: `--split-sentences`, `--keep-newlines`, `--partitions`, `--lang`,
  `--keep-sequential-samples` (the output order is always the input order).
- Added: `--skip-bad-lines`, `--batch-size` (lines per encoding batch and per task).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from megatron_patch.data.preprocess_tasks import (
    MAX_TASK_BYTES,
    PreprocessError,
    Result,
    encoded_results,
    load_tokenizer,
    read_tasks,
)
from megatron_patch.errors import ArgumentParser, run_main

__all__ = ["MAX_TASK_BYTES", "PreprocessError", "expand_inputs", "load_tokenizer", "main",
           "preprocess", "run", "summary_line"]

DEFAULT_BATCH_SIZE = 1000
DEFAULT_LOG_INTERVAL = 10000
# With --skip-bad-lines, report this many skipped lines one by one; the rest are only counted.
MAX_REPORTED_BAD_LINES = 10


class _StopOnSignal:
    """Ctrl-C and SIGTERM make the run stop at the next task boundary (KeyboardInterrupt from
    check()) instead of raising wherever the main thread is, which may be inside the executor's
    bookkeeping. A second signal raises at once. Only in the main thread, where handlers live."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.pid = os.getpid()
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:
            return  # a worker just forked, before its initializer set its own handlers
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (Ctrl-C: SIGINT, or SIGTERM); nothing was written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """A file, a glob or a comma-separated list of them (or a list of such) -> file paths."""
    parts = inputs.split(",") if isinstance(inputs, str) else list(inputs)
    files: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if any(c in part for c in "*?["):
            import glob

            matches = sorted(p for p in glob.glob(part) if os.path.isfile(p))
            if not matches:
                raise PreprocessError(f"input {part!r} matches no file")
            files.extend(matches)
        elif os.path.isfile(part):
            files.append(part)
        else:
            raise PreprocessError(f"input file not found: {part}")
    if not files:
        raise PreprocessError("no input files given")
    return files


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _rates(docs: int, tokens: int, nbytes: int, seconds: float) -> str:
    s = max(seconds, 1e-9)
    return (f"{docs} docs, {tokens} tokens, {nbytes / 1e6:.1f} MB in {seconds:.1f} s: "
            f"{docs / s:.0f} docs/s, {tokens / s:.0f} tokens/s, {nbytes / 1e6 / s:.2f} MB/s")


def _write(builder: Any, res: Result, n: dict[str, int], skip_bad_lines: bool) -> None:
    """Append one task's documents to the dataset and count them in n."""
    for number, reason in res.bad:
        where = f"{res.path}:{number}: {reason}"
        if not skip_bad_lines:
            raise PreprocessError(f"{where} (--skip-bad-lines skips such lines)")
        if n["bad_lines"] < MAX_REPORTED_BAD_LINES:
            print(f"preprocess: skipping {where}", file=sys.stderr)
        n["bad_lines"] += 1
    ends = np.cumsum(res.lengths)
    for begin, end in zip(ends - res.lengths, ends, strict=True):
        builder.add_document(res.tokens[begin:end], [int(end - begin)])
    n["lines"] += res.lines
    n["input_bytes"] += res.nbytes
    n["documents"] += len(res.lengths)
    n["tokens"] += len(res.tokens)
    n["empty_documents"] += res.empty
    n["blank_lines"] += res.blank


def preprocess(inputs: str | Sequence[str], output_prefix: str, tokenizer: str, *,
               json_key: str = "text", append_eod: bool = True, workers: int = 1,
               skip_bad_lines: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
               log_interval: int = DEFAULT_LOG_INTERVAL) -> dict[str, Any]:
    """Tokenize JSON-lines `inputs` into `{output_prefix}_{json_key}_document.bin/.idx`.

    `tokenizer`: an HF tokenizer directory (or hub name) or a sentencepiece `.model` file.
    `log_interval`: print progress to stderr every this many documents (0: never).
    Returns a summary: the dataset prefix and paths, counts, seconds and rates. Raises
    PreprocessError for bad input (nothing is written then).
    """
    if workers < 1 or batch_size < 1 or log_interval < 0:
        raise PreprocessError("workers and batch_size must be >= 1, log_interval >= 0")
    files = expand_inputs(inputs)
    dtype = _token_dtype(tokenizer, append_eod, workers)  # fails early, before any output
    prefix = f"{output_prefix}_{json_key}_document"
    start = time.monotonic()
    results = encoded_results(read_tasks(files, batch_size), workers,
                              (tokenizer, json_key, append_eod, dtype))
    n = _write_dataset(prefix, dtype, results, files, skip_bad_lines, log_interval, start)
    seconds = time.monotonic() - start
    return dict(prefix=prefix, bin=prefix + ".bin", idx=prefix + ".idx", files=len(files),
                dtype=np.dtype(dtype).name, seconds=seconds, **n,
                docs_per_s=n["documents"] / max(seconds, 1e-9),
                tokens_per_s=n["tokens"] / max(seconds, 1e-9),
                mb_per_s=n["input_bytes"] / 1e6 / max(seconds, 1e-9))


def _token_dtype(tokenizer: str, append_eod: bool, workers: int) -> type:
    """The dtype the dataset stores the tokenizer's ids in; PreprocessError for a tokenizer
    that does not load, or has no EOS to append."""
    if workers > 1:
        # N processes each running the tokenizers library's own thread pool would fight over
        # the cores; and a forked child deadlocks if that pool had started in the parent.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tokenizer, single_thread=workers > 1)
    if append_eod and tok.eos_id is None:
        raise PreprocessError(f"tokenizer {tokenizer!r} has no EOS token to append as EOD; "
                              "use a tokenizer with one, or turn EOD off (--no-append-eod)")
    with warnings.catch_warnings():
        # Importing megatron.core warns that Transformer Engine and Apex are missing: irrelevant
        # to writing a dataset, and noise in a preprocessing log.
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.indexed_dataset import DType

    # The in-process path (workers=1) loads its own tokenizer, exactly as a worker does.
    return DType.optimal_dtype(tok.vocab_size)


def _write_dataset(prefix: str, dtype: type, results: Iterator[Result], files: list[str],
                   skip_bad_lines: bool, log_interval: int, start: float) -> dict[str, int]:
    """Write `results` to prefix.bin/.idx under temporary names, renamed when complete (see the
    module docstring); the counts."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    tmp_bin, tmp_idx = f"{bin_path}.tmp-{os.getpid()}", f"{idx_path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    n = {"lines": 0, "documents": 0, "tokens": 0, "input_bytes": 0, "empty_documents": 0,
         "bad_lines": 0, "blank_lines": 0}
    next_log = log_interval
    builder = None
    with _StopOnSignal() as stop:
        try:
            builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
            for res in results:
                stop.check()
                _write(builder, res, n, skip_bad_lines)
                if log_interval and n["documents"] >= next_log:
                    next_log += log_interval * ((n["documents"] - next_log) // log_interval + 1)
                    print("preprocess: " + _rates(n["documents"], n["tokens"], n["input_bytes"],
                                                  time.monotonic() - start), file=sys.stderr)
            if n["documents"] == 0:
                raise PreprocessError(f"no documents in {', '.join(files)}; nothing written")
            builder.finalize(tmp_idx)
            # fsync, so that what the renames below promise also holds after a machine crash,
            # not only after a killed process.
            _fsync(tmp_bin)
            _fsync(tmp_idx)
            stop.check()
            # Renamed only when complete. The .idx is what makes a dataset look complete, so
            # an old one goes first and the new one comes last.
            _remove(idx_path)
            os.replace(tmp_bin, bin_path)
            os.replace(tmp_idx, idx_path)
        except BaseException:
            results.close()  # shuts the worker processes down now, not at garbage collection
            if builder is not None:
                builder.data_file.close()
            _remove(tmp_bin, tmp_idx)
            raise
    return n


def summary_line(summary: dict[str, Any]) -> str:
    s = summary
    return (f"preprocess: wrote {s['prefix']}.bin/.idx ({s['dtype']}) from {s['files']} "
            f"file(s): " + _rates(s["documents"], s["tokens"], s["input_bytes"], s["seconds"])
            + f"; skipped {s['empty_documents']} empty documents, {s['bad_lines']} bad lines, "
            f"{s['blank_lines']} blank lines")


# ---------------------------------------------------------------------------------------------
# Command line: `megatron-patch preprocess` and `python -m megatron_patch.data.preprocess`.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True,
                        help="JSON-lines file(s), one object per line (.jsonl or .json): a "
                             "path, a glob or a comma-separated list")
    parser.add_argument("--output-prefix", required=True,
                        help="writes OUTPUT_PREFIX_KEY_document.bin and .idx")
    parser.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                        help="the key holding each document's text (one key; default: text)")
    parser.add_argument("--tokenizer-model", "--tokenizer-dir", "--tokenizer-name-or-path",
                        dest="tokenizer", required=True,
                        help="HF tokenizer directory or hub name, or a sentencepiece .model file")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="append the tokenizer's EOS id to every document (default: on)")
    parser.add_argument("--workers", type=int, default=1,
                        help="tokenizing processes (default 1: in this process)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"lines per encoding batch and per task (default "
                             f"{DEFAULT_BATCH_SIZE})")
    parser.add_argument("--log-interval", type=int, default=DEFAULT_LOG_INTERVAL,
                        help=f"progress line every this many documents, 0: none (default "
                             f"{DEFAULT_LOG_INTERVAL})")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count malformed lines instead of failing")


def run(args: argparse.Namespace) -> int:
    """Run from parsed arguments. Bad input raises PreprocessError (a ValueError). Ctrl-C or
    SIGTERM stops the run, writing nothing, and returns 128 + the signal number."""
    if len(args.json_keys) != 1:
        raise PreprocessError(f"--json-keys takes one key, got {args.json_keys}")
    try:
        summary = preprocess(args.input, args.output_prefix, args.tokenizer,
                             json_key=args.json_keys[0], append_eod=args.append_eod,
                             workers=args.workers, skip_bad_lines=args.skip_bad_lines,
                             batch_size=args.batch_size, log_interval=args.log_interval)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"preprocess: stopped by {signal.Signals(signum).name}; nothing written",
              file=sys.stderr)
        return 128 + signum
    print(summary_line(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m megatron_patch.data.preprocess",
                            description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--verbose", action="store_true",
                        help="also show other libraries' warnings")
    args = parser.parse_args(argv)
    return run_main("megatron-patch preprocess", lambda: run(args), output=args.output_prefix,
                    verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
