"""Reward functions the RL tests name as --reward-function rl_rewards:NAME."""

import math


def digits(record, prompt, completion):
    """The share of the completion's characters that are digits (0 for an empty one)."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def raises(record, prompt, completion):
    raise KeyError("answer")


def nan(record, prompt, completion):
    return math.nan


def text(record, prompt, completion):
    return "1.0"


def raises_on_bad(record, prompt, completion):
    """digits(), but raises on records marked bad."""
    if record.get("bad"):
        raise ValueError("this record has no answer")
    return digits(record, prompt, completion)


def exits(record, prompt, completion):
    import sys

    sys.exit(0)


def huge_int(record, prompt, completion):
    return 10**400


def beyond_float32(record, prompt, completion):
    return 1e39  # a float64, infinite in float32
