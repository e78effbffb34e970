"""Generation inputs and outputs: plain text or JSON lines, continued raw or rendered as chat.

Input files:
- `.txt`: one prompt a line (the classic launcher's INPUT_FILE); `\\n`, `\\r`, `\\t` and `\\\\`
  inside a line stand for a newline, a carriage return, a tab and a backslash, so a prompt can
  span lines.
- anything else: JSON lines (or a JSON list) of records with `text`, `prompt`, `query`,
  `instruction` or `messages`.

Prompt formats (`--prompt-format`):
- `raw`: the text is continued as it is, tokenized as the tokenizer does by default (its BOS
  included when it adds one): what a base model, e.g. after continued pretraining, expects.
- `chat`: rendered as supervised fine-tuning renders it (chat template, or the Alpaca prompt).
- `auto`: `raw` for a `.txt` file and for records with a `text` key, `chat` otherwise.

Output files: `.txt` gets one completion a line, escaped as above; anything else gets JSON lines,
each input record with a `completion`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

# Function-level imports: data.sft imports torch, which this module otherwise does not need.

PROMPT_FORMATS = ("auto", "raw", "chat")
_UNESCAPE = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


class PromptError(ValueError):
    pass


@dataclass(frozen=True)
class Prompt:
    record: dict[str, Any]
    raw: bool  # continue the text as is (else render as chat)
    where: str  # "file:line", for errors


def is_text_file(path: str) -> bool:
    return os.path.splitext(path)[1].lower() == ".txt"


def unescape_line(line: str) -> str:
    """`\\n`, `\\r`, `\\t`, `\\\\` -> newline, carriage return, tab, backslash. Any other
    backslash stays as it is (a Windows path in a prompt needs no escaping)."""
    out, i = [], 0
    while i < len(line):
        pair = line[i:i + 2]
        if pair[:1] == "\\" and pair[1:] in _UNESCAPE:
            out.append(_UNESCAPE[pair[1:]])
            i += 2
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def escape_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace(
        "\r", "\\r")


def read_lines(path: str) -> list[str]:
    """The unescaped lines of a `.txt` prompt or completion file. Only `\\n` (or `\\r\\n`) ends
    a line: a generated text may hold other characters that str.splitlines breaks at."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")  # a leading BOM is no text
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PromptError(f"{path}:{line}: invalid UTF-8 (byte {e.start})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [unescape_line(line.removesuffix("\r")) for line in lines]


def _raw_text(record: dict[str, Any]) -> str | None:
    for key in ("text", "prompt"):
        if isinstance(record.get(key), str):
            return record[key]
    return None


def read_prompts(path: str, prompt_format: str = "auto") -> list[Prompt]:
    """The prompts of a `.txt` or JSON-lines file, in order, each marked raw or chat."""
    from megatron_patch.data.sft import read_records, validate_prompt

    if prompt_format not in PROMPT_FORMATS:
        raise PromptError(f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, "
                          f"got {prompt_format!r}")
    if is_text_file(path):
        raw = prompt_format != "chat"
        prompts = [Prompt({"text" if raw else "prompt": text}, raw, f"{path}:{lineno}")
                   for lineno, text in enumerate(read_lines(path), 1)]
        if not prompts:
            raise PromptError(f"{path}: no prompts (one a line)")
        return prompts

    def check(record: Any) -> str | None:
        if prompt_format == "raw":
            if isinstance(record, dict) and _raw_text(record) is not None:
                return None
            return "--prompt-format raw needs a string `text` or `prompt`"
        if prompt_format == "auto" and isinstance(record, dict) and isinstance(
                record.get("text"), str):
            return None
        return validate_prompt(record)

    records, _ = read_records(path, check=check)
    if not records:
        raise PromptError(f"{path}: no prompts")
    return [Prompt(r, prompt_format == "raw" or (prompt_format == "auto"
                                                 and isinstance(r.get("text"), str)),
                   f"{path}: record {i}") for i, r in enumerate(records, 1)]


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: raw text as the tokenizer encodes it, or rendered as in SFT."""
    from megatron_patch.data.sft import render_prompt

    if prompt.raw:
        ids = list(tokenizer(_raw_text(prompt.record), add_special_tokens=True)["input_ids"])
    else:
        ids = render_prompt(tokenizer, prompt.record)
    if not ids:
        raise PromptError(f"{prompt.where}: the prompt is empty (no tokens to continue)")
    return ids


def output_line(path: str, prompt: Prompt, completion: str) -> str:
    """One line of the output file: the escaped completion (`.txt`), or the record with it."""
    if is_text_file(path):
        return escape_line(completion) + "\n"
    return json.dumps({**prompt.record, "completion": completion}, ensure_ascii=False) + "\n"
