"""Preference pairs (reward models, DPO): records in TRL's conventions -> padded token tensors.

Records (JSON list or JSON lines), as TRL's preference datasets hold them:
    {"prompt": str, "chosen": str, "rejected": str}
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}   (explicit prompt)
    {"chosen": [messages], "rejected": [messages]}                          (implicit prompt)
An implicit prompt is the longest run of messages chosen and rejected begin with; what follows
it must start with an assistant turn. An optional numeric "margin" (how much better chosen is)
is read for reward-model losses.

Rendering (`prompt_format`, the `--prompt-format` flag):
- message lists, in every format: SFT's rendering (data/sft.py), the chat template (or
  "### Role:" blocks without one), as TRL renders conversational records with the template;
- string records, `chat` and `auto` (the default): the prompt is an instruction rendered as SFT
  renders it (chat template, or the Alpaca prompt), as `generate` and `rl` render a `prompt`
  string under `auto`, so a model fine-tuned by SFT sees its own format;
- string records, `raw`: TRL's standard format, `prompt + chosen` as one text (with the EOS
  token's text appended unless it already ends with it), tokenized as the tokenizer does by
  default; the response starts where the tokenized prompt stops being a prefix of both sides.
The response mask covers the completion's assistant turns and the EOS or end-of-turn token that
closes each; the prompt, earlier turns and padding are masked.

Each item holds, for chosen and for rejected: `*_tokens` [seq_length] (the whole sequence,
padded), `*_loss_mask` [seq_length] aligned with next-token labels as in SFT (position t counts
when token t+1 is a response token), `*_length` (real tokens; the last real token is where a
reward model reads its score), plus `margin`.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from megatron_patch.data.sft import (
    BadRecord,
    epoch_position,
    messages_problem,
    read_located_records,
    tokenize_record,
)
from megatron_patch.prompts import PROMPT_FORMATS

log = logging.getLogger("megatron_patch.data")

SIDES = ("chosen", "rejected")


def _shared_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_pair(record: dict) -> tuple[str | list[dict], Any, Any]:
    """(prompt, chosen completion, rejected completion) of a valid record; an implicit prompt
    is taken from the messages both sides share."""
    if "prompt" in record:
        return record["prompt"], record["chosen"], record["rejected"]
    chosen, rejected = record["chosen"], record["rejected"]
    n = _shared_prefix(chosen, rejected)
    if n == len(chosen) == len(rejected):  # identical: the prompt is all but the last turn
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def validate_pair(record: Any) -> str | None:
    """What is wrong with a preference record, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [k for k in SIDES if k not in record]
    if missing:
        return f"missing {' and '.join(repr(k) for k in missing)}"
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not math.isfinite(
            margin):
        return "'margin' must be a finite number"
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(record.get("prompt"), str):
            return ("string 'chosen'/'rejected' need a string 'prompt' (implicit prompts are "
                    "read from message lists only)")
        if not record["prompt"].strip():
            return "'prompt' is empty"
        for side in SIDES:
            if not record[side].strip():
                return f"'{side}' is empty"
        return None
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        return "'chosen' and 'rejected' must both be strings or both be lists of messages"
    for side in SIDES:
        if not record[side]:
            return f"'{side}' is empty"
        if problem := messages_problem(record[side]):
            return f"'{side}': {problem}"
    if "prompt" in record:
        if not isinstance(record["prompt"], list):
            return "with message lists, 'prompt' must be a list of messages too"
        if problem := messages_problem(record["prompt"]):
            return f"'prompt': {problem}"
    prompt, *completions = split_pair(record)
    if not prompt:
        return "'chosen' and 'rejected' share no prompt (they differ from the first message)"
    if prompt[-1]["role"] == "assistant":
        return "the prompt must not end with an assistant turn"
    for side, completion in zip(SIDES, completions, strict=True):
        if not completion:
            return f"'{side}' has no response after the prompt"
        if completion[0]["role"] != "assistant":
            return (f"'{side}' must continue the prompt with an assistant turn, not "
                    f"{completion[0]['role']!r}")
        if not any(m["content"].strip() for m in completion if m["role"] == "assistant"):
            return f"'{side}' is empty (its assistant turns have no text)"
    return None


def _raw_sides(tokenizer, prompt: str, completions: tuple[str, str]
               ) -> list[tuple[list[int], list[int]]]:
    """TRL's standard-format rule: prompt + completion (+ EOS text) tokenized whole; the
    response is what follows the longest prefix the tokenized prompt shares with both sides
    (a token merging across the boundary belongs to the response)."""
    eos = tokenizer.eos_token
    if eos is None:
        raise ValueError("--prompt-format raw appends the tokenizer's EOS token to each side, "
                         "and the tokenizer has none")
    sides = [tokenizer(prompt + c if c.endswith(eos) else prompt + c + eos)["input_ids"]
             for c in completions]
    prompt_ids = tokenizer(prompt)["input_ids"]
    start = min(_shared_prefix(prompt_ids, ids) for ids in sides)
    return [(ids, [0] * start + [1] * (len(ids) - start)) for ids in sides]


def tokenize_pair(tokenizer, record: dict, prompt_format: str = "auto",
                  ) -> list[tuple[list[int], list[int]]]:
    """[(ids, response mask) of chosen, (ids, response mask) of rejected]: string records as
    TRL tokenizes them with prompt_format "raw", else each side rendered as SFT renders the
    same conversation."""
    prompt, chosen, rejected = split_pair(record)
    if isinstance(prompt, str) and prompt_format == "raw":
        return _raw_sides(tokenizer, prompt, (chosen, rejected))
    out = []
    for completion in (chosen, rejected):
        if isinstance(prompt, str):
            out.append(tokenize_record(tokenizer, {"instruction": prompt, "output": completion}))
        else:
            out.append(tokenize_record(tokenizer, {"messages": prompt + completion},
                                       train_from=len(prompt)))
    return out


@dataclass
class PreferenceSummary:
    pairs: int = 0
    truncated: int = 0  # pairs with a side cut to --seq-length (on the response side)
    skipped_long: int = 0
    bad_records: int = 0
    identical: int = 0  # pairs whose chosen and rejected are the same text (skipped)
    identical_at: list[str] = field(default_factory=list)  # where the first few are
    # Pairs whose two sides are the same tokens once tokenized and cut to --seq-length: their
    # reward-model and DPO losses are ln 2 with gradient 0 whatever the weights (skipped).
    identical_tokens: int = 0
    identical_tokens_at: list[str] = field(default_factory=list)

    def line(self, path: str) -> str:
        text = (f"preference data {path}: {self.pairs} pairs; truncated {self.truncated}, "
                f"skipped as too long {self.skipped_long}, identical chosen/rejected skipped "
                f"{self.identical}, identical once tokenized and truncated skipped "
                f"{self.identical_tokens}, bad records skipped {self.bad_records}")
        for what, count, at in (("identical", self.identical, self.identical_at),
                                ("identical tokens", self.identical_tokens,
                                 self.identical_tokens_at)):
            if at:
                text += f" ({what}: {', '.join(at)}" + (", ...)" if count > len(at) else ")")
        return text


Side = tuple[list[int], list[int]]


class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized pairs, padded to the sequence length, shuffled per epoch as SFT data is."""

    epoch_shuffled: ClassVar[bool] = True  # training.data.microbatches passes i unreduced

    def __init__(self, pairs: list[tuple[Side, Side, float]], seq_length: int, pad_id: int,
                 seed: int = 1234) -> None:
        self.pairs, self.seq_length, self.pad_id, self.seed = pairs, seq_length, pad_id, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.build(self.pairs[epoch_position(idx, len(self.pairs), self.seed)])

    def build(self, pair: tuple[Side, Side, float]) -> dict[str, torch.Tensor]:
        *sides, margin = pair
        out = {"margin": torch.tensor(float(margin))}
        for name, (ids, mask) in zip(SIDES, sides, strict=True):
            tokens = torch.full((self.seq_length,), self.pad_id, dtype=torch.long)
            tokens[:len(ids)] = torch.tensor(ids, dtype=torch.long)
            # Position t predicts token t+1: it counts when that token is a response token.
            loss_mask = torch.zeros(self.seq_length)
            loss_mask[:len(ids) - 1] = torch.tensor(mask[1:], dtype=torch.float)
            out[f"{name}_tokens"] = tokens
            out[f"{name}_loss_mask"] = loss_mask
            out[f"{name}_length"] = torch.tensor(len(ids))
        return out


def build_preference_dataset(path: str, tokenizer, seq_length: int, *, skip_long: bool = False,
                             skip_bad: bool = False, seed: int = 1234,
                             prompt_format: str = "auto",
                             ) -> tuple[PreferenceDataset, PreferenceSummary]:
    """The pairs of a preference file, and what was truncated, skipped or wrong in it;
    string records rendered per `prompt_format` (the module's docstring says how).

    A side longer than `seq_length` tokens is cut on the response side (the prompt is kept
    whole), or, with skip_long, its pair is dropped; a pair that keeps no response token on
    either side is dropped as too long, and one whose sides are then the same tokens (nothing
    to prefer: no gradient) is dropped and counted. Malformed records fail as
    `file:line: reason`, or with skip_bad are skipped and counted."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, got "
                         f"{prompt_format!r}")
    located, bad = read_located_records(path, skip_bad, check=validate_pair)
    summary = PreferenceSummary(bad_records=bad)
    pairs = []
    for where, record in located:
        _, chosen, rejected = split_pair(record)
        if chosen == rejected:
            summary.identical += 1
            if len(summary.identical_at) < 3:
                summary.identical_at.append(where)
            continue
        try:
            sides = tokenize_pair(tokenizer, record, prompt_format)
        except BadRecord as e:
            if not skip_bad:
                raise BadRecord(f"{where}: {e}") from e
            summary.bad_records += 1
            continue
        long = any(len(ids) > seq_length for ids, _ in sides)
        if long:
            sides = [(ids[:seq_length], mask[:seq_length]) for ids, mask in sides]
        # With skip_long, or when the prompt fills the sequence (no response left to score).
        if long and skip_long or any(sum(mask[1:]) == 0 for _, mask in sides):
            summary.skipped_long += 1
            continue
        if sides[0][0] == sides[1][0]:  # the same tokens: nothing to prefer
            summary.identical_tokens += 1
            if len(summary.identical_tokens_at) < 3:
                summary.identical_tokens_at.append(where)
            continue
        summary.truncated += long
        pairs.append((*sides, float(record.get("margin", 0.0))))
    if summary.identical:
        log.warning("%s: %d pairs have identical chosen and rejected (first at %s); skipped",
                    path, summary.identical, summary.identical_at[0])
    if summary.identical_tokens:
        log.warning("%s: %d pairs have the same tokens on both sides once tokenized and cut to "
                    "--seq-length %d (first at %s); skipped", path, summary.identical_tokens,
                    seq_length, summary.identical_tokens_at[0])
    if not pairs:
        raise ValueError(f"{path}: no usable preference pairs ({summary.line(path)})")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    summary.pairs = len(pairs)
    return PreferenceDataset(pairs, seq_length, pad, seed), summary
