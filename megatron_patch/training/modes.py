"""Training modes: what pretraining, SFT and the RLHF modes each supply to the one Trainer.

A mode supplies its data (`build_datasets`), its forward pass over one micro-batch (`forward`)
and its loss (`loss`); the Trainer does the rest (model, optimizer, Megatron-Core's schedules,
checkpoints, logging). A new mode is a `TrainingMode` subclass that registers itself with
`register_mode`; modes of other packages (rlhf/) register there when imported, so an entry point
that offers them imports their package first.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from megatron_patch import parallel
from megatron_patch.checkpoint import CheckpointMeta
from megatron_patch.data.sft import build_sft_dataset, epochs_to_iters
from megatron_patch.forward import masked_vocab_parallel_cross_entropy
from megatron_patch.models.score_head import check_kind
from megatron_patch.training import data

if TYPE_CHECKING:
    from megatron_patch.training.loop import Trainer

# Every mode the Trainer can run, by name, in registration order; `register_mode` fills it.
MODES: dict[str, type[TrainingMode]] = {}
# Those --train-mode offers (the others are run by their own commands, e.g. RL's actor).
SELECTABLE: list[str] = []


def register_mode(name: str, cls: type[TrainingMode], *, selectable: bool = True) -> None:
    """Make `cls` the mode called `name`: offered by --train-mode if `selectable`, and its
    `add_arguments` called by the parser of `megatron-patch train`."""
    if MODES.get(name, cls) is not cls:
        raise ValueError(f"training mode {name!r} registered twice ({MODES[name].__qualname__}, "
                         f"{cls.__qualname__})")
    MODES[name] = cls
    if selectable and name not in SELECTABLE:
        SELECTABLE.append(name)


def mode_class(name: str) -> type[TrainingMode]:
    if name not in MODES:
        raise ValueError(f"--train-mode {name}: no such training mode registered (registered: "
                         f"{', '.join(MODES)})")
    return MODES[name]


@dataclass
class Datasets:
    """The training data of a run and how many iterations it trains for."""

    train: Any
    valid: Any | None
    train_iters: int


# (loss summed over this micro-batch, the count that sum is divided by once summed over the
# global batch, {metric name: tensor([sum, count])})
LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class TrainingMode:
    """A way of training: its data, forward pass and loss.

    `loss` returns sums and counts, never means: the schedule divides the loss sum by the count
    of the whole global batch (Megatron-Core's `calculate_per_token_loss`) and the Trainer reduces
    each metric's [sum, count] over micro-batches and data-parallel ranks, so that no result
    depends on how the global batch is split.
    """

    name: ClassVar[str]
    loss_name: ClassVar[str] = "lm loss"
    # Every metric `loss` reports, the loss first (all ranks must know them: under pipeline
    # parallelism only the last stage computes them).
    metric_names: ClassVar[tuple[str, ...]] = ("lm loss",)
    # Sequences one sample puts through the model (a preference pair puts two, chosen and
    # rejected, in one forward): the schedule's micro-batch of sequences is this many times
    # --micro-batch-size.
    sequences_per_sample: ClassVar[int] = 1

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this mode's own flags (in their own argument group) to `megatron-patch train`'s
        parser; called for every registered mode."""

    @classmethod
    def check_flags_of(cls, args: argparse.Namespace) -> None:
        """Refuse this mode's own flags given to another --train-mode; called for every
        registered mode, whichever is chosen."""

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Refuse flags this mode cannot use, before any work is done."""
        if args.train_iters is None and args.train_tokens is None:
            raise ValueError("give --train-iters or --train-tokens")

    def describe_model(self, hf_config: dict[str, Any], meta: CheckpointMeta) -> tuple[
            dict[str, Any], CheckpointMeta]:
        """The HF config and checkpoint meta of the model this mode trains, given those of
        --load (or of the model the architecture flags make). Default: a language model, as
        given; a reward model's checkpoint is refused."""
        check_kind(hf_config, reward=False, source=self.trainer.args.load, flag="--load")
        return hf_config, meta

    def unloaded_weights(self) -> tuple[str, ...]:
        """Prefixes of model state names a fresh run does not take from --load, but keeps as
        built (a reward model's new score head, where --load holds a language model)."""
        return ()

    def model_options(self) -> dict[str, Any]:
        """Extra keyword arguments for `models.build_stages` (e.g. a different output head)."""
        return {}

    def build_datasets(self) -> Datasets:
        raise NotImplementedError

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))

    def loss(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> LossOutput:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What this mode must save to resume exactly (kept in the checkpoint's common state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` on resume."""

    def before_schedule(self, dataset: Any, consumed: int, forward_only: bool) -> None:
        """Runs before each training or evaluation schedule over the global batch that starts at
        sample `consumed` of `dataset` (e.g. to compute a frozen reference model's outputs)."""


def lm_loss(labels: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int,
            output: torch.Tensor) -> LossOutput:
    """Sum of next-token losses over unmasked tokens, and their count."""
    per_token = masked_vocab_parallel_cross_entropy(output, labels, vocab_size)
    mask = loss_mask.float()
    loss_sum = (per_token * mask).sum()
    tokens = mask.sum()
    return loss_sum, tokens.to(torch.int), {"lm loss": torch.stack([loss_sum.detach().clone(),
                                                                    tokens.detach().clone()])}


def train_iterations(args: argparse.Namespace, global_batch_size: int,
                     train_samples: int | None = None) -> int:
    """--train-iters, else --train-tokens in whole global batches, else --epochs over
    `train_samples` samples."""
    if args.train_iters:
        return args.train_iters
    if args.train_tokens:
        return -(-args.train_tokens // (global_batch_size * args.seq_length))

    return epochs_to_iters(train_samples, args.epochs, global_batch_size)


class LanguageModelMode(TrainingMode):
    """Next-token prediction over the tokens the batch's loss mask keeps."""

    def loss(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> LossOutput:
        return lm_loss(batch["labels"], batch["loss_mask"], self.trainer.vocab_size, output)


class PretrainMode(LanguageModelMode):
    """Pretraining on mmap datasets made by `megatron-patch preprocess` (--data-path)."""

    name = "pretrain"

    def build_datasets(self) -> Datasets:
        t, a = self.trainer, self.trainer.args
        if not a.data_path:
            raise ValueError("give --data-path (datasets made by `megatron-patch preprocess`)")
        tok = t.tokenizer()
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {a.tokenizer_model or t.hf_source} has no EOS token")
        iters = train_iterations(a, t.global_batch_size)
        evals = (iters // a.eval_interval + 1) * a.eval_iters
        train, valid, _ = data.build_gpt_datasets(
            a.data_path, a.split, a.seq_length, a.seed,
            data.DatasetTokenizer(eod=tok.eos_token_id, vocab_size=t.vocab_size),
            [iters * t.global_batch_size, evals * t.global_batch_size, 0], a.data_cache_path)
        return Datasets(train, valid, iters)


class RecordsMode(TrainingMode):
    """A mode trained on records files (--train-data-path, --valid-data-path), which may run
    for --epochs."""

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.train_iters is None and args.train_tokens is None and not args.epochs:
            raise ValueError("give --train-iters or --train-tokens or --epochs")
        if not args.train_data_path:
            raise ValueError(f"--train-mode {cls.name} needs --train-data-path")

    def build_dataset(self, path: str) -> Any:
        """The dataset of one records file."""
        raise NotImplementedError

    def build_datasets(self) -> Datasets:
        a = self.trainer.args
        train = self.build_dataset(a.train_data_path)
        valid = self.build_dataset(a.valid_data_path) if a.valid_data_path else None
        return Datasets(train, valid,
                        train_iterations(a, self.trainer.global_batch_size, len(train)))


class FinetuneMode(RecordsMode, LanguageModelMode):
    """Supervised fine-tuning on prompt/response records (`data/sft.py`)."""

    name = "finetune"

    def build_dataset(self, path: str) -> Any:
        a = self.trainer.args
        dataset, summary = build_sft_dataset(
            path, self.trainer.tokenizer(), a.seq_length, pack=a.pack_sequences,
            skip_long=a.skip_long_samples, skip_bad=a.skip_bad_lines, seed=a.seed)
        parallel.print_rank0(
            f"SFT data {path}: {summary.samples} samples in {summary.sequences} sequences; "
            f"truncated {summary.truncated}, skipped as too long {summary.skipped_long}, bad "
            f"records skipped {summary.bad_records}")
        return dataset


register_mode(PretrainMode.name, PretrainMode)
register_mode(FinetuneMode.name, FinetuneMode)
