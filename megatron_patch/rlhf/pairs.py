"""What reward-model and DPO training share: preference pairs (data/preference.py), whose
chosen and rejected sequences go through the model in one forward."""

from __future__ import annotations

from typing import Any

import torch

from megatron_patch import parallel
from megatron_patch.data.preference import build_preference_dataset
from megatron_patch.training.modes import RecordsMode


def pair_tensors(batch: dict[str, torch.Tensor], field: str) -> torch.Tensor:
    """The micro-batch's chosen then rejected `field` ("tokens", "loss_mask", "length"), as one
    batch of 2n rows: the layout of the pairs' forward."""
    return torch.cat([batch[f"chosen_{field}"], batch[f"rejected_{field}"]])


class PreferencePairsMode(RecordsMode):
    """A mode trained on preference pairs (--train-data-path / --valid-data-path in TRL's
    formats)."""

    sequences_per_sample = 2  # chosen and rejected go through the model together

    def build_dataset(self, path: str) -> Any:
        a = self.trainer.args
        dataset, summary = build_preference_dataset(
            path, self.trainer.tokenizer(), a.seq_length, skip_long=a.skip_long_samples,
            skip_bad=a.skip_bad_lines, seed=a.seed, prompt_format=a.prompt_format)
        parallel.print_rank0(summary.line(path))
        return dataset

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = pair_tensors(batch, "tokens")
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return model(tokens, positions, None)
