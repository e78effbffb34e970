"""The work of `preprocess`: the main process reads raw lines into tasks; workers (or the main
process, with one worker) parse the JSON and tokenize them. Results come back in input order."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from megatron_patch.data import lone_surrogate

# A task also ends at this many bytes, so corpora of very long documents keep tasks small.
MAX_TASK_BYTES = 16 * 2**20


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


class Task(NamedTuple):
    path: str
    first_line: int  # 1-based number of lines[0] in path
    lines: list[bytes]


class Result(NamedTuple):
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


def _encode_task(task: Task) -> Result:
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
        eos = _STATE["eos"]
        # One EOD per document: a tokenizer whose post-processor already ends every text with
        # EOS (as some Llama/Qwen tokenizer.json files do) gets no second one.
        missing = np.fromiter((ids[-1] != eos for ids in docs), bool, len(docs))
        lengths += missing
        flat = itertools.chain.from_iterable(
            itertools.chain(ids, (eos,)) if add else ids
            for ids, add in zip(docs, missing.tolist(), strict=True))
    tokens = np.fromiter(flat, _STATE["dtype"], int(lengths.sum()))
    return Result(task.path, len(task.lines), nbytes, tokens, lengths, bad, empty, blank)


def read_tasks(files: list[str], batch_size: int) -> Iterator[Task]:
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
                    yield Task(path, first, lines)
                    lines, nbytes = [], 0
            if lines:
                yield Task(path, first, lines)


def encoded_results(tasks: Iterator[Task], workers: int, init_args: tuple) -> Iterator[Result]:
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
