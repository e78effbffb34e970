"""Pretraining data: Megatron-Core's GPTDataset over mmap datasets, read in a resumable order."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_patch import cpu_mode


@dataclass
class DatasetTokenizer:
    """What GPTDataset needs of a tokenizer: the end-of-document id and the vocabulary size."""

    eod: int
    vocab_size: int

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        # Part of the dataset description that names megatron's index cache files.
        return {"class": type(self).__name__, "eod": self.eod, "vocab_size": self.vocab_size}


def parse_blend(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron-LM's --data-path: 'P1 P2' or 'W1 P1 W2 P2'."""
    try:
        weights = [float(x) for x in data_path[0::2]]
    except ValueError:
        return list(data_path), None
    if len(data_path) % 2:
        raise ValueError(f"--data-path {' '.join(data_path)}: weights and paths must alternate")
    return list(data_path[1::2]), weights


def check_splits(paths: list[str], split: str) -> None:
    """Refuse a split that would leave a used part of a dataset without documents (megatron-core
    0.16 then loops forever looking for tokens)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    weights = [float(w) for w in split.replace("/", ",").split(",")]
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    for path in paths:
        if not (os.path.isfile(path + ".idx") and os.path.isfile(path + ".bin")):
            raise FileNotFoundError(f"--data-path {path}: no {path}.bin / {path}.idx")
        docs = len(IndexedDataset(path).sequence_lengths)
        start = 0.0
        for name, weight in zip(("train", "valid", "test"), weights, strict=False):
            end = start + weight / total
            if weight > 0 and round(end * docs) - round(start * docs) == 0:
                raise ValueError(f"--split {split}: the {name} part of {path} ({docs} documents) "
                                 "gets no document; give it weight 0 or more data")
            start = end


def build_gpt_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                       tokenizer: DatasetTokenizer, num_samples: list[int],
                       cache_path: str | None = None) -> list[Any]:
    """[train, valid, test] GPTDatasets (None where a split is empty)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    paths, _ = parse_blend(data_path)
    check_splits(paths, split)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=parse_blend(data_path), split=split,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=cache_path,
    )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def build():
        return BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True,
                                             config).build()

    # Rank 0 writes the index caches; the others then read them instead of racing to write.
    datasets = build() if rank == 0 else None
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return datasets if rank == 0 else build()


def microbatches(dataset, consumed_samples: int, micro_batch_size: int, num_microbatches: int,
                 dp_rank: int, dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The microbatches of one global batch for this data-parallel rank.

    Sample order depends only on `consumed_samples`, so a run resumed from a checkpoint reads
    exactly the samples it would have read, and the same global batch is seen whatever the DP
    size: each microbatch step takes `micro_batch_size * dp_size` consecutive samples.

    A dataset with `epoch_shuffled` set (SFT sequences, preference pairs) is given the run's
    sample count itself, past its length, so that each pass over it (epoch) is a fresh
    shuffle; any other dataset (megatron's GPTDataset, sized for the whole run; a rollout
    batch) is read from its start again.
    """
    device = cpu_mode.device()
    step = micro_batch_size * dp_size
    wraps = not getattr(dataset, "epoch_shuffled", False)
    for m in range(num_microbatches):
        start = consumed_samples + m * step + dp_rank * micro_batch_size
        indices = range(start, start + micro_batch_size)
        samples = [dataset[i % len(dataset) if wraps else i] for i in indices]
        yield {k: torch.stack([s[k] for s in samples]).to(device, non_blocking=True)
               for k in samples[0]}
