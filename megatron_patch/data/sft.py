"""Supervised fine-tuning data: instruction and chat records -> masked, padded or packed samples.

Records (JSON list or JSON lines):
    {"instruction": ..., "input": ..., "output": ...}      (Alpaca style; "input" optional)
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}

Rendering: with the tokenizer's chat template when it has one; otherwise the Alpaca prompt
(ALPACA_PROMPT / ALPACA_PROMPT_WITH_INPUT below) for instruction records, and "### Role:" blocks
for chat records. The loss covers response tokens only (each assistant turn, and the EOS that
ends it); prompt and padding are masked.

Sequences are either padded to the sequence length, one sample each, or packed: several samples
per sequence, each attending only to itself (block-diagonal causal mask) with its positions
starting at 0.
"""

from __future__ import annotations

import codecs
import functools
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from megatron_patch.data import lone_surrogate

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class BadRecord(ValueError):
    pass


def read_records(path: str, skip_bad: bool = False,
                 check: Callable[[Any], str | None] | None = None) -> tuple[list[dict], int]:
    """Records of a JSON list or JSON-lines file, in order; the first malformed one (bad JSON
    or UTF-8, a lone UTF-16 surrogate, or what `check` objects to: training records by default)
    fails as `file:line: reason` (or, with skip_bad, each is skipped and counted). JSON lines
    are read one line at a time, so one bad byte spoils one record."""
    located, bad = read_located_records(path, skip_bad, check)
    return [record for _, record in located], bad


def read_located_records(path: str, skip_bad: bool = False,
                         check: Callable[[Any], str | None] | None = None,
                         ) -> tuple[list[tuple[str, dict]], int]:
    """As read_records, each record with where it is (`file:line`, or `file: record N` in a
    JSON list), for errors found after reading."""
    check = check or validate
    with open(path, "rb") as f:
        # A UTF-8 byte-order mark (Windows editors write one) is skipped, as Python's
        # utf-8-sig and preprocess do.
        start = len(codecs.BOM_UTF8) if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
        f.seek(start)
        head = f.read(4096).lstrip()
        f.seek(start)
        if head.startswith(b"["):
            items, where = _json_list(path, f.read()), f"{path}: record {{}}"
        else:
            items, where = [_json_line(lineno, line) for lineno, line in enumerate(f, 1)
                            if line.strip()], f"{path}:{{}}"
    records, bad = [], 0
    for lineno, record, problem in items:
        problem = problem or lone_surrogate(record) or check(record)
        if problem:
            if not skip_bad:
                raise BadRecord(f"{where.format(lineno)}: {problem}")
            bad += 1
            continue
        records.append((where.format(lineno), record))
    return records, bad


def _json_list(path: str, data: bytes) -> list[tuple[int, Any, str | None]]:
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise BadRecord(f"{path}:{line}: invalid UTF-8 (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise BadRecord(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(items, list):
        raise BadRecord(f"{path}: expected a JSON list or JSON lines")
    return [(i, r, None) for i, r in enumerate(items, 1)]


def _json_line(lineno: int, line: bytes) -> tuple[int, Any, str | None]:
    try:
        return lineno, json.loads(line.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return lineno, None, f"invalid UTF-8 (byte {e.start} of the line)"
    except json.JSONDecodeError as e:
        return lineno, None, f"invalid JSON ({e.msg})"


def messages_problem(msgs: Any) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for k, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant")):
            return (f"message {k + 1}: each message needs a role (system/user/assistant) and "
                    "string content")
    return None


def validate(record: Any) -> str | None:
    """What is wrong with a record, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if "messages" in record:
        problem = messages_problem(record["messages"])
        if problem:
            return problem
        if record["messages"][-1]["role"] != "assistant":
            return "the last message must be the assistant's"
        return None
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            return f"missing or non-string '{key}'"
    if not isinstance(record.get("input", ""), str):
        return "'input' must be a string"
    return None


def validate_prompt(record: Any) -> str | None:
    """What is wrong with a generation input (a prompt to complete), or None; its messages
    are held to the rules of training records."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if "messages" in record:
        return messages_problem(record["messages"])
    if any(isinstance(record.get(k), str) for k in ("prompt", "query", "instruction")):
        return None
    return "needs a string `prompt`, `query` or `instruction`, or `messages`"


def to_messages(record: dict) -> list[dict[str, str]]:
    """Chat messages of a record; instruction records (and generation inputs with `prompt`,
    `query` or `instruction`) become one user turn, plus the assistant turn if `output` is set."""
    if "messages" in record:
        return record["messages"]
    user = record.get("instruction") or record.get("prompt") or record.get("query") or ""
    if record.get("input"):
        user += "\n\n" + record["input"]
    msgs = [{"role": "user", "content": user}]
    if isinstance(record.get("output"), str):
        msgs.append({"role": "assistant", "content": record["output"]})
    return msgs


def _plain_prompt(record: dict, msgs: list[dict[str, str]]) -> str:
    """The template used when the tokenizer has no chat template."""
    if "messages" not in record:
        instruction = record.get("instruction") or record.get("prompt") or record.get("query")
        if record.get("input"):
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=record["input"])
        return ALPACA_PROMPT.format(instruction=instruction)
    return "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in msgs) \
        + "### Assistant:\n"


def render_prompt(tokenizer, record: dict) -> list[int]:
    """Token ids of the prompt the model should answer, rendered as in training."""
    msgs = to_messages(record)
    if msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return tokenizer(_plain_prompt(record, msgs), add_special_tokens=True)["input_ids"]


def tokenize_record(tokenizer, record: dict, train_from: int = 0) -> tuple[list[int], list[int]]:
    """(token ids, 1 where the token is part of a response) for one training record; with
    `train_from`, only assistant turns from that message on count as responses (preference
    pairs train the completion after a conversation, not the conversation's earlier turns)."""
    eos = tokenizer.eos_token_id
    if tokenizer.chat_template:
        msgs = to_messages(record)
        ids: list[int] = []
        mask: list[int] = []
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = list(tokenizer.apply_chat_template(msgs[:k], add_generation_prompt=True,
                                                        tokenize=True, return_dict=False))
            full = list(tokenizer.apply_chat_template(msgs[:k + 1], tokenize=True,
                                                      return_dict=False))
            if full[:len(ids)] != ids or full[:len(prefix)] != prefix:
                raise BadRecord("the chat template does not render turns as prefixes")
            mask += [0] * (len(prefix) - len(ids)) + [int(k >= train_from)] * (len(full)
                                                                            - len(prefix))
            ids = full
        return ids, mask
    if "messages" not in record:
        prompt = render_prompt(tokenizer, record)
        response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [eos]
        return prompt + response, [0] * len(prompt) + [1] * len(response)
    ids, mask = [], []
    for k, m in enumerate(record["messages"]):
        if m["role"] == "assistant":
            turn = tokenizer(m["content"], add_special_tokens=False)["input_ids"] + [eos]
            ids, mask = ids + turn, mask + [int(k >= train_from)] * len(turn)
        else:
            head = f"### {m['role'].capitalize()}:\n{m['content']}\n\n"
            if k + 1 < len(record["messages"]) and record["messages"][k + 1]["role"] == "assistant":
                head += "### Assistant:\n"
            part = tokenizer(head, add_special_tokens=not ids)["input_ids"]
            ids, mask = ids + part, mask + [0] * len(part)
    return ids, mask


@dataclass
class SFTSummary:
    samples: int = 0
    truncated: int = 0
    skipped_long: int = 0
    bad_records: int = 0
    sequences: int = 0
    extra: dict = field(default_factory=dict)


def epoch_position(idx: int, size: int, seed: int) -> int:
    """Which of `size` samples the idx-th read takes: each pass over the data (epoch) is a
    fresh shuffle, fixed by the seed, so a resumed run reads the same order."""
    epoch, pos = divmod(idx, size)
    return _epoch_order(size, seed, epoch)[pos]


# A prime larger than any epoch count: seed * stride + epoch is a different shuffle seed for
# every (seed, epoch) pair (a plain seed + epoch would give seed 1 epoch 0 the order of seed 0
# epoch 1).
_EPOCH_SEED_STRIDE = 1_000_003


@functools.lru_cache(maxsize=4)
def _epoch_order(size: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(size))
    random.Random(seed * _EPOCH_SEED_STRIDE + epoch).shuffle(order)
    return tuple(order)


class SFTDataset(torch.utils.data.Dataset):
    """Fixed-length training sequences built from tokenized samples, shuffled per epoch: item
    i is the (i mod len)-th of epoch i // len's order, for any i >= 0."""

    epoch_shuffled: ClassVar[bool] = True  # training.data.microbatches passes i unreduced

    def __init__(self, samples: list[tuple[list[int], list[int]]], seq_length: int, pad_id: int,
                 pack: bool, seed: int = 1234) -> None:
        self.seq_length, self.pad_id, self.seed = seq_length, pad_id, seed
        if pack:
            self.sequences = _pack(samples, seq_length + 1)
        else:
            self.sequences = [[s] for s in samples]
        self.pack = pack

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.build(self.sequences[epoch_position(idx, len(self.sequences), self.seed)])

    def build(self, parts: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        n = self.seq_length
        ids = np.full(n + 1, self.pad_id, dtype=np.int64)
        target = np.zeros(n + 1, dtype=np.float32)
        positions = np.zeros(n, dtype=np.int64)
        segment = np.full(n, -1, dtype=np.int64)
        start = 0
        for k, (tokens, mask) in enumerate(parts):
            end = start + len(tokens)
            ids[start:end] = tokens
            target[start:end] = mask
            stop = min(end, n + 1) - 1  # positions of inputs within this sample
            positions[start:stop] = np.arange(stop - start)
            segment[start:stop] = k
            start = end
        out = {
            "tokens": torch.from_numpy(ids[:-1].copy()),
            "labels": torch.from_numpy(ids[1:].copy()),
            # Position t is trained when the token it predicts is a response token of the
            # same sample.
            "loss_mask": torch.from_numpy(target[1:] * (segment >= 0)),
            "position_ids": torch.from_numpy(positions),
        }
        if self.pack:
            seg = torch.from_numpy(segment)
            same = seg[:, None] == seg[None, :]
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            # True = masked, as Megatron-Core expects.
            out["attention_mask"] = ~(same & causal & (seg[:, None] >= 0))[None]
        return out


def _pack(samples: list[tuple[list[int], list[int]]], capacity: int) -> list[list]:
    """First-fit packing in sample order."""
    bins: list[list] = []
    room: list[int] = []
    for s in samples:
        for i, r in enumerate(room):
            if len(s[0]) <= r:
                bins[i].append(s)
                room[i] -= len(s[0])
                break
        else:
            bins.append([s])
            room.append(capacity - len(s[0]))
    return bins


def build_sft_dataset(path: str, tokenizer, seq_length: int, *, pack: bool = False,
                      skip_long: bool = False, skip_bad: bool = False,
                      seed: int = 1234) -> tuple[SFTDataset, SFTSummary]:
    records, bad = read_records(path, skip_bad)
    summary = SFTSummary(bad_records=bad)
    samples = []
    limit = seq_length + 1
    no_response = 0  # records whose response starts after the first seq_length + 1 tokens
    for record in records:
        ids, mask = tokenize_record(tokenizer, record)
        if len(ids) > limit:
            if skip_long:
                summary.skipped_long += 1
                continue
            ids, mask = ids[:limit], mask[:limit]
            summary.truncated += 1
        if sum(mask[1:]) == 0:
            summary.skipped_long += 1  # nothing left to learn from after truncation
            no_response += 1
            continue
        samples.append((ids, mask))
    if not samples:
        raise ValueError(f"{path}: no usable samples: "
                         + _why_none(len(records), bad, summary.skipped_long - no_response,
                                     no_response, seq_length))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = SFTDataset(samples, seq_length, pad, pack, seed)
    summary.samples, summary.sequences = len(samples), len(dataset)
    return dataset, summary


def _why_none(good: int, bad: int, too_long: int, no_response: int, seq_length: int) -> str:
    """Why no record became a sample, counted by cause."""
    if good + bad == 0:
        return "the file holds no records"
    reasons = [f"{bad} bad record(s) skipped (--skip-bad-lines)" if bad else "",
               f"{too_long} longer than --seq-length {seq_length} skipped "
               "(--skip-long-samples)" if too_long else "",
               f"{no_response} with no response token within --seq-length {seq_length}"
               if no_response else ""]
    return f"of {good + bad} record(s): " + ", ".join(r for r in reasons if r)


def epochs_to_iters(num_sequences: int, epochs: float, global_batch_size: int) -> int:
    return max(1, math.ceil(num_sequences * epochs / global_batch_size))
