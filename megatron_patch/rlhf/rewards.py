"""Rule-based rewards: a Python function named `module:function`.

The function is called once per completion as `function(record, prompt, completion)`:
- record: the prompt's JSON record as read from --prompt-data-path (a dict; a `.txt` prompt file
  gives {"text": line}), so it can carry an answer key, e.g. {"prompt": ..., "answer": "42"};
- prompt: the prompt text as the model saw it (chat-rendered where the record is rendered);
- completion: the sampled completion, decoded without special tokens.
It returns a number (bool, int or float). The module is imported like any Python module: from
the current directory, PYTHONPATH, or an installed package.

A function that raises (or calls sys.exit), or returns something that is not a finite number
in float32's range (the dtype rewards are trained in), stops the run with an error naming the
function and the prompt; with --skip-bad-rewards the prompt's group of samples
is instead left out of the update and counted (`skipped groups` in the log).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_patch import checkpoint
from megatron_patch.rlhf.reward import load_reward_model, score

# The dtype of the rewards tensor (advantages and returns are computed from it), whatever the
# model's dtype.
REWARD_DTYPE = torch.float32


class RewardError(ValueError):
    pass


@dataclass
class RewardFunction:
    name: str  # as given: module:function
    function: Callable[[dict, str, str], Any]

    def __call__(self, record: dict, prompt: str, completion: str, where: str) -> float:
        """The reward as a float that REWARD_DTYPE holds; RewardError naming the function and
        `where` otherwise."""
        try:
            value = self.function(record, prompt, completion)
        # The user's code: any exception is reported the same way, and so is sys.exit(),
        # which would otherwise end the run with its status (0: success, nothing trained).
        except (Exception, SystemExit) as e:
            raise RewardError(f"reward function {self.name} raised {type(e).__name__}: {e} "
                              f"(on {where}, completion {completion[:80]!r})") from e
        try:
            if isinstance(value, str | bytes):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise RewardError(f"reward function {self.name} returned {type(value).__name__} "
                              f"{_short(value)}, not a number (on {where})") from None
        except OverflowError:  # an int too large for a float
            number = math.inf
        # Checked in the dtype rewards are trained in: 1e39 is a float, but infinite there.
        if not math.isfinite(number) or not torch.tensor(number, dtype=REWARD_DTYPE).isfinite():
            raise RewardError(
                f"reward function {self.name} returned {_short(value)} (on {where}, completion "
                f"{completion[:80]!r}); rewards must be finite numbers within "
                f"+-{torch.finfo(REWARD_DTYPE).max:.4g} (the range of {REWARD_DTYPE}, the "
                "dtype rewards are trained in)")
        return number


def _short(value: Any) -> str:
    """repr(value), shortened (a huge int has hundreds of digits)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"


def load_reward_function(spec: str) -> RewardFunction:
    """Import `module:function` (module may be dotted); errors name the flag and what is
    missing."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise RewardError(f"--reward-function {spec!r}: give it as module:function, e.g. "
                          "my_rewards:contains_answer")
    # The current directory, as for `python -m`: the `megatron-patch` entry point's sys.path
    # does not have it.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise RewardError(f"--reward-function {spec}: cannot import module {module_name!r} "
                          f"({e}); put it in the current directory or on PYTHONPATH") from e
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RewardError(f"--reward-function {spec}: module {module_name} "
                          f"({getattr(module, '__file__', '?')}) has no function "
                          f"{function_name!r}")
    return RewardFunction(spec, function)


def contains_word(record: dict, prompt: str, completion: str) -> float:
    """Example: 1.0 when the completion contains the record's `word` (default "fox"), else 0."""
    return float(str(record.get("word", "fox")) in completion)


class Rewards:
    """The rewards of a rollout batch: a reward model's score of prompt + completion and/or a
    reward function's value, whichever the run was given."""

    def __init__(self, args: Any, trainer: Any, prompts: Any, tokenizer: Any, n: int,
                 function: RewardFunction | None) -> None:
        self.args, self.prompts, self.tokenizer, self.n = args, prompts, tokenizer, n
        self.function = function
        self.model, self.pad = None, None
        if args.reward_model:
            self._load_model(trainer.vocab_size)

    def _load_model(self, policy_vocab: int) -> None:
        """The reward model, at the policy's layout; it must read the policy's token ids."""
        path = self.args.reward_model
        rm_vocab = checkpoint.read_meta(path).vocab_size
        if rm_vocab != policy_vocab:
            raise ValueError(f"--reward-model {path} has a vocabulary of {rm_vocab} tokens, the "
                             f"policy {policy_vocab}: the reward model scores the policy's token "
                             "ids, so both need the same tokenizer")
        self.model, self.pad = load_reward_model(path)
        self.model.requires_grad_(False)

    def __call__(self, rollouts: list, batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards [N] and which samples count ([N] bool: a group with a bad reward is left
        out)."""
        rewards = torch.zeros(len(rollouts), dtype=REWARD_DTYPE)
        if self.model is not None:
            lengths = torch.tensor([len(r.prompt_ids) + len(r.completion_ids) for r in rollouts])
            rewards += score([self.model], batch["tokens"], self.pad, lengths,
                             micro_batch_size=self.args.micro_batch_size)
        valid = [True] * len(rollouts)
        if self.function is not None:
            values, valid = self._function_rewards(rollouts)
            rewards += values
        self._check_sums(rollouts, rewards, valid)
        groups = torch.tensor(valid).view(-1, self.n).all(dim=1, keepdim=True)
        return rewards, groups.expand(-1, self.n).reshape(-1)

    def _check_sums(self, rollouts: list, rewards: torch.Tensor, valid: list[bool]) -> None:
        """A non-finite reward (a diverged reward model's score, or its sum with the function's
        value overflowing) is an error naming the prompt, or with --skip-bad-rewards a bad
        sample (its reward zeroed, its group left out)."""
        for i in torch.nonzero(~torch.isfinite(rewards)).flatten().tolist():
            if not self.args.skip_bad_rewards:
                where = self.prompts.prompts[rollouts[i].prompt_index].where
                plus = " plus the reward function's value" if self.function else ""
                raise RewardError(f"the reward of a completion of {where} is "
                                  f"{rewards[i].item()} in {REWARD_DTYPE}: the reward model's "
                                  f"score{plus} is not finite")
            rewards[i], valid[i] = 0.0, False

    def _function_rewards(self, rollouts: list) -> tuple[torch.Tensor, list[bool]]:
        rewards, valid = [], []
        for r in rollouts:
            prompt = self.prompts.prompts[r.prompt_index]
            text = self.tokenizer.decode(r.completion_ids, skip_special_tokens=True)
            prompt_text = self.tokenizer.decode(r.prompt_ids, skip_special_tokens=True)
            try:
                rewards.append(self.function(prompt.record, prompt_text, text, prompt.where))
                valid.append(True)
            except RewardError:
                if not self.args.skip_bad_rewards:
                    raise
                rewards.append(0.0)
                valid.append(False)
        return torch.tensor(rewards, dtype=REWARD_DTYPE), valid
