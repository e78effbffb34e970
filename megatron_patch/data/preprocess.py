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
  `--append-eod` is given. `--append-eod` is accepted.
- `--workers` defaults to 1. With 1 the work runs in this process; with N > 1 in N worker
  processes (JSON parsing and tokenizing; this process reads and writes), with identical output.
- Not supported: `--split-sentences`, `--keep-newlines`, `--partitions`, `--lang`,
  `--keep-sequential-samples` (the output order is always the input order).
- Added: `--skip-bad-lines`, `--batch-size` (lines per encoding batch and per task).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from megatron_patch.data import lone_surrogate

DEFAULT_BATCH_SIZE = 1000
DEFAULT_LOG_INTERVAL = 10000
# A task also ends at this many bytes, so corpora of very long documents keep tasks small.
MAX_TASK_BYTES = 16 * 2**20
# With --skip-bad-lines, report this many skipped lines one by one; the rest are only counted.
MAX_REPORTED_BAD_LINES = 10


class PreprocessError(ValueError):
    """Bad input or arguments. A ValueError, so `megatron-patch` reports it without a traceback."""


# ---------------------------------------------------------------------------------------------
# Tokenizers: load once per process, encode a batch of texts.


class _HFTokenizer:
    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        # Documents are longer than the model's context; nothing is truncated, so the
        # "sequence length is longer than the maximum" warning would only be noise.
        self.tokenizer.model_max_length = sys.maxsize
        self.eos_id: int | None = self.tokenizer.eos_token_id
        self.vocab_size = len(self.tokenizer)  # added tokens included

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, return_attention_mask=False,
                              return_token_type_ids=False)["input_ids"]


class _SentencePieceTokenizer:
    def __init__(self, path: str, num_threads: int | None) -> None:
        import sentencepiece

        self.model = sentencepiece.SentencePieceProcessor(model_file=path)
        self.num_threads = num_threads
        eos = self.model.eos_id()
        self.eos_id = eos if eos >= 0 else None  # -1: trained without an EOS piece
        self.vocab_size = self.model.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.model.encode(texts, num_threads=self.num_threads)


def load_tokenizer(name_or_path: str, single_thread: bool = False) -> Any:
    """A sentencepiece `.model` file, else an HF tokenizer (directory or hub name). The result
    has `encode(texts) -> ids per text`, `eos_id` (None if absent) and `vocab_size`."""
    if not os.path.exists(name_or_path) and name_or_path.startswith(("/", ".", "~")):
        # Not a hub name either; transformers would say "Repo id must be in the form ...".
        raise PreprocessError(f"tokenizer not found: {name_or_path}")
    try:
        if name_or_path.endswith(".model") and os.path.isfile(name_or_path):
            return _SentencePieceTokenizer(name_or_path, 1 if single_thread else None)
        return _HFTokenizer(name_or_path)
    except Exception as e:  # transformers raises OSError, ValueError, ... for unusable paths
        raise PreprocessError(f"cannot load tokenizer {name_or_path!r}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Work items. The main process reads raw lines; workers parse JSON and tokenize.


class _Task(NamedTuple):
    path: str
    first_line: int  # 1-based number of lines[0] in path
    lines: list[bytes]


class _Result(NamedTuple):
    path: str
    lines: int
    nbytes: int
    tokens: np.ndarray  # every kept document of the task, concatenated, EOD included
    lengths: np.ndarray  # tokens per kept document
    bad: list[tuple[int, str]]  # (line number, reason)
    empty: int  # documents with no text, or no tokens
    blank: int  # whitespace-only lines


# Per-process state, set by _init_worker: the tokenizer is loaded once per process, not per task.
_STATE: dict[str, Any] = {}


def _exit_with(parent: int) -> None:
    # A worker holds both ends of the executor's task queue, so it would wait for tasks forever
    # once the parent is killed (SIGKILL, out of memory): it leaves when the parent is gone.
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _init_worker(tokenizer: str, json_key: str, append_eod: bool, dtype: type,
                 parent: int | None = None) -> None:
    """Load the tokenizer into this process. parent: the pid of the main process, in a worker."""
    if parent is not None:
        # Ctrl-C reaches every process of the group; the main process alone handles it (it
        # stops at the next task boundary and shuts the workers down), so does SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    tok = load_tokenizer(tokenizer, single_thread=parent is not None)
    _STATE.update(tokenizer=tok, json_key=json_key, dtype=dtype,
                  eos=tok.eos_id if append_eod else None)


def _encode_task(task: _Task) -> _Result:
    key = _STATE["json_key"]
    texts: list[str] = []
    numbers: list[int] = []  # the line of each text
    bad: list[tuple[int, str]] = []
    empty = blank = nbytes = 0
    for number, raw in enumerate(task.lines, task.first_line):
        nbytes += len(raw)
        if not raw.strip():
            blank += 1
            continue
        try:
            # bytes: json detects UTF-8/16/32; bad UTF-8 is a ValueError. Without the newline,
            # an unterminated string reads as such, not as an "invalid control character".
            obj = json.loads(raw.rstrip(b"\r\n"))
        except ValueError as e:
            bad.append((number, f"bad JSON ({e}); expected one JSON object per line"))
            continue
        if not isinstance(obj, dict):
            bad.append((number, f"expected a JSON object, got {type(obj).__name__}"))
        elif key not in obj:
            bad.append((number, f"missing key {key!r}"))
        elif not isinstance(obj[key], str):
            bad.append((number, f"{key!r} is {type(obj[key]).__name__}, not a string"))
        elif not obj[key]:
            empty += 1
        else:
            texts.append(obj[key])
            numbers.append(number)

    try:
        encoded = _STATE["tokenizer"].encode(texts) if texts else []
    except (TypeError, ValueError):
        # Checked only when a batch fails, so the common case pays nothing for it.
        problems = [lone_surrogate(t) for t in texts]
        bad += [(n, p) for n, p in zip(numbers, problems, strict=True) if p]
        bad.sort()
        texts = [t for t, p in zip(texts, problems, strict=True) if not p]
        encoded = _STATE["tokenizer"].encode(texts) if texts else []
    docs = [ids for ids in encoded if len(ids)]
    empty += len(texts) - len(docs)
    lengths = np.fromiter((len(ids) for ids in docs), np.int64, len(docs))
    flat = itertools.chain.from_iterable(docs)
    if _STATE["eos"] is not None:
        lengths += 1
        flat = itertools.chain.from_iterable(itertools.chain(ids, (_STATE["eos"],)) for ids in docs)
    tokens = np.fromiter(flat, _STATE["dtype"], int(lengths.sum()))
    return _Result(task.path, len(task.lines), nbytes, tokens, lengths, bad, empty, blank)


def _read_tasks(files: list[str], batch_size: int) -> Iterator[_Task]:
    """Raw lines in input order, batch_size lines (or MAX_TASK_BYTES) per task; a task never
    spans two files, so a line number is always relative to its task's file."""
    for path in files:
        with open(path, "rb") as f:
            lines: list[bytes] = []
            first = nbytes = 0
            for number, line in enumerate(f, 1):
                if not lines:
                    first = number
                lines.append(line)
                nbytes += len(line)
                if len(lines) >= batch_size or nbytes >= MAX_TASK_BYTES:
                    yield _Task(path, first, lines)
                    lines, nbytes = [], 0
            if lines:
                yield _Task(path, first, lines)


def _results(tasks: Iterator[_Task], workers: int, init_args: tuple) -> Iterator[_Result]:
    """Encoded tasks, in input order: in this process, or in a pool of worker processes."""
    if workers == 1:
        _init_worker(*init_args)
        try:
            for task in tasks:
                yield _encode_task(task)
        finally:
            _STATE.clear()  # the tokenizer is not needed after the run
        return
    # A ProcessPoolExecutor rather than a multiprocessing.Pool: a worker that dies (killed for
    # memory, say) makes it raise BrokenProcessPool where Pool waits forever, and Pool.terminate()
    # can hang when workers are sending large results. fork: workers start in milliseconds and
    # inherit the imported libraries (the parent loaded a tokenizer but has not encoded with it,
    # so no tokenizers thread pool exists yet).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(*init_args, os.getpid()))
    try:
        # An ordered window of tasks in flight rather than executor.map or Pool.imap, which
        # read the whole input ahead into memory when the workers are slower than the reader.
        pending: deque[Future] = deque()
        for task in tasks:
            pending.append(executor.submit(_encode_task, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # Also on an error or an interrupt: drop the queued tasks, let each worker finish the
        # one it is on, then exit. No signals, so no lock is left held by a killed worker.
        executor.shutdown(wait=True, cancel_futures=True)


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


def _write(builder: Any, res: _Result, n: dict[str, int], skip_bad_lines: bool) -> None:
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
    if workers > 1:
        # N processes each running the tokenizers library's own thread pool would fight over
        # the cores; and a forked child deadlocks if that pool had started in the parent.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tokenizer, single_thread=workers > 1)  # fail early, before any output
    if append_eod and tok.eos_id is None:
        raise PreprocessError(f"tokenizer {tokenizer!r} has no EOS token to append as EOD; "
                              "use a tokenizer with one, or turn EOD off (--no-append-eod)")
    with warnings.catch_warnings():
        # Importing megatron.core warns that Transformer Engine and Apex are missing: irrelevant
        # to writing a dataset, and noise in a preprocessing log.
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(tok.vocab_size)
    del tok  # the in-process path (workers=1) loads its own, exactly as a worker does

    prefix = f"{output_prefix}_{json_key}_document"
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    tmp_bin, tmp_idx = f"{bin_path}.tmp-{os.getpid()}", f"{idx_path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)

    start = time.monotonic()
    n = {"lines": 0, "documents": 0, "tokens": 0, "input_bytes": 0, "empty_documents": 0,
         "bad_lines": 0, "blank_lines": 0}
    next_log = log_interval
    builder = None
    tasks = _read_tasks(files, batch_size)
    results = _results(tasks, workers, (tokenizer, json_key, append_eod, dtype))
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

    seconds = time.monotonic() - start
    return dict(prefix=prefix, bin=bin_path, idx=idx_path, files=len(files),
                dtype=np.dtype(dtype).name, seconds=seconds, **n,
                docs_per_s=n["documents"] / max(seconds, 1e-9),
                tokens_per_s=n["tokens"] / max(seconds, 1e-9),
                mb_per_s=n["input_bytes"] / 1e6 / max(seconds, 1e-9))


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
    from megatron_patch.errors import ArgumentParser, run_main

    parser = ArgumentParser(prog="python -m megatron_patch.data.preprocess",
                            description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    return run_main("megatron-patch preprocess", lambda: run(args), output=args.output_prefix)


if __name__ == "__main__":
    sys.exit(main())
