"""Data tooling: `preprocess` turns JSON-lines text into Megatron-Core's mmap `.bin`/`.idx`."""

from __future__ import annotations

from typing import Any


def lone_surrogate(value: Any) -> str | None:
    """What is wrong if a string in `value` (a JSON value) holds a lone UTF-16 surrogate, else
    None. JSON's "\\ud800" escape decodes to one: valid JSON, common in scraped corpora, and not
    text any tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return (f"lone UTF-16 surrogate {value[e.start]!r} at character {e.start} "
                    "(not valid text)")
        return None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((p for p in map(lone_surrogate, items) if p), None)
