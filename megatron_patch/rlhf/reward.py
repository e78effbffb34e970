"""Reward models on Megatron-Core: scoring, the Bradley-Terry loss, loading.

A reward model is the family's GPTModel with a scalar score head (models/score_head.py). Its
score for a sequence is the head's output at the last token that is not padding, exactly as
transformers' *ForSequenceClassification pools: the rightmost token whose id is not
`pad_token_id` (with pad == EOS, a trailing EOS counts as padding), within the sequence's
length where one is given.

    from megatron_patch.rlhf.reward import load_reward_model, score

    model, pad_token_id = load_reward_model("ckpt/rm")           # any TP/PP layout
    rewards = score([model], tokens, pad_token_id, lengths)     # [b] on every rank

Loss (Bradley-Terry): -log sigmoid(r_chosen - r_rejected - margin) per pair, with `margin` a
per-pair offset (0 without one, TRL's `margin` column), plus with
--center-rewards-coefficient c TRL's centring term c * (r_chosen + r_rejected)^2, which keeps
the scores near zero mean; reported with the accuracy (the share of
pairs with r_chosen > r_rejected; ties count as wrong) and the mean margin r_chosen - r_rejected.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any

import torch

from megatron_patch import checkpoint
from megatron_patch.checkpoint import CheckpointMeta
from megatron_patch.errors import nonnegative_float
from megatron_patch.models import from_checkpoint, load_hf_config
from megatron_patch.models.score_head import check_kind, is_reward_config, reward_hf_config
from megatron_patch.rlhf.pairs import PreferencePairsMode, pair_tensors

LOSS_NAME = "rm loss"


def score_positions(tokens: torch.Tensor, pad_token_id: int | None,
                    lengths: torch.Tensor | None = None) -> torch.Tensor:
    """[b] index of the token each sequence is scored at: the rightmost position before its
    length (all of it without `lengths`) whose token is not `pad_token_id`; 0 if none is."""
    batch, seq = tokens.shape
    position = torch.arange(seq, device=tokens.device).expand(batch, seq)
    counted = torch.ones_like(tokens, dtype=torch.bool)
    if lengths is not None:
        counted &= position < lengths.to(tokens.device)[:, None]
    if pad_token_id is not None:
        counted &= tokens != pad_token_id
    elif lengths is None:
        raise ValueError("scoring a batch needs the pad token id (config.json pad_token_id) or "
                         "the sequence lengths: the score is read at the last real token")
    return (position * counted).argmax(-1)


def pooled_scores(output: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[b] fp32 scores from the head's output [b, s, 1] at `positions` [b]."""
    rows = torch.arange(output.shape[0], device=output.device)
    return output[rows, positions.to(output.device), 0].float()


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor,
                  margin: torch.Tensor | None = None, center_coefficient: float = 0.0) -> tuple[
                      torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of per-pair losses, number of pairs, metrics {name: [sum, count]}) for the
    rewards [n] of n pairs; the caller divides the sums by the pairs of the whole batch.
    `center_coefficient` c adds TRL's centring term c * (r_chosen + r_rejected)^2 per pair."""
    difference = chosen - rejected
    shifted = difference if margin is None else difference - margin.to(difference)
    losses = -torch.nn.functional.logsigmoid(shifted)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    loss_sum = losses.sum()
    pairs = torch.tensor(chosen.shape[0], device=chosen.device, dtype=torch.int)
    count = pairs.float()
    metrics = {
        LOSS_NAME: torch.stack([loss_sum.detach().clone(), count]),
        "accuracy": torch.stack([(difference > 0).float().sum().detach(), count]),
        "margin": torch.stack([difference.detach().sum(), count]),
    }
    return loss_sum, pairs, metrics


def score(model: list[torch.nn.Module], tokens: torch.Tensor, pad_token_id: int | None,
          lengths: torch.Tensor | None = None, micro_batch_size: int | None = None
          ) -> torch.Tensor:
    """Reward-model scores [b] (fp32) for a token batch [b, s] (right-padded), on every rank.

    model: this rank's reward-model chunks (any TP/PP/VPP layout); all ranks of a model-parallel
    group call this with the same batch. micro_batch_size: sequences per forward (default: all).
    No gradients. The positions scored are `score_positions(tokens, pad_token_id, lengths)`.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    micro = micro_batch_size or batch
    if batch % micro:
        raise ValueError(f"batch of {batch} sequences is not a multiple of micro batch {micro}")
    positions = score_positions(tokens, pad_token_id, lengths)
    position_ids = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(micro, -1)
    chunks = [slice(i, i + micro) for i in range(0, batch, micro)]

    def step(data_iterator, chunk):
        rows = next(data_iterator)
        output = chunk(tokens[rows], position_ids, None)

        def loss_func(output: torch.Tensor):
            scores = pooled_scores(output, positions[rows])
            return scores.sum() * 0, torch.tensor(1, dtype=torch.int), {"scores": scores}

        return output, loss_func

    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=step, data_iterator=[iter(chunks) for _ in model], model=model,
            num_microbatches=len(chunks), seq_length=seq, micro_batch_size=micro,
            forward_only=True)
    scores = torch.zeros(batch, dtype=torch.float32, device=tokens.device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        scores = torch.cat([r["scores"] for r in results])
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(scores, parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return scores


def pad_token_id(hf_config: dict[str, Any]) -> int | None:
    """The id a reward model's config pools by (transformers: config.pad_token_id)."""
    return hf_config.get("pad_token_id")


def load_reward_model(ckpt_dir: str, *, flag: str = "--reward-model",
                      sequence_parallel: bool = False) -> tuple[torch.nn.Module, int | None]:
    """This rank's reward model (one chunk, at the current parallel layout) from a converted or
    trained reward-model checkpoint, and its pad token id. A language-model checkpoint is
    refused naming `flag` and the directory."""
    hf_config = load_hf_config(os.path.join(ckpt_dir, checkpoint.HF_DIR))
    check_kind(hf_config, reward=True, source=ckpt_dir, flag=flag)
    model, _ = from_checkpoint(ckpt_dir, sequence_parallel=sequence_parallel)
    model.eval()
    return model, pad_token_id(hf_config)


class RewardMode(PreferencePairsMode):
    """`--train-mode rm`: a reward model trained on preference pairs (data/preference.py) with
    the Bradley-Terry loss. From a language model (--load of an SFT or converted checkpoint)
    the model becomes its *ForSequenceClassification: the LM head is dropped and a score head
    created (models/score_head.py); from a reward model, training continues it."""

    name = "rm"
    loss_name = LOSS_NAME
    metric_names = (LOSS_NAME, "accuracy", "margin")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("reward models (--train-mode rm; TRL's names)")
        g.add_argument("--center-rewards-coefficient", type=nonnegative_float, default=None,
                       help="add c * (r_chosen + r_rejected)^2 per pair to the loss, pulling the "
                            "scores towards zero mean (TRL's RewardConfig; e.g. 0.01)")

    @classmethod
    def check_flags_of(cls, args: argparse.Namespace) -> None:
        if args.center_rewards_coefficient is not None and args.train_mode != cls.name:
            raise ValueError(f"--center-rewards-coefficient applies to --train-mode {cls.name}, "
                             f"not {args.train_mode}")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        super().check_args(args)
        if args.pack_sequences:
            raise ValueError("--pack-sequences: a reward model scores whole sequences, one per "
                             "row (pairs are padded, not packed)")
        center = args.center_rewards_coefficient
        if center is not None and not (math.isfinite(center) and center >= 0):
            raise ValueError(f"--center-rewards-coefficient {center}: must be a finite number "
                             ">= 0")

    def describe_model(self, hf_config: dict[str, Any], meta: CheckpointMeta) -> tuple[
            dict[str, Any], CheckpointMeta]:
        self.new_head = not is_reward_config(hf_config)
        if self.new_head:
            from transformers import AutoTokenizer

            t = self.trainer
            tok = AutoTokenizer.from_pretrained(t.args.tokenizer_model or t.hf_source)
            # The id the data is padded with (data/preference.py), which transformers will
            # then pool by.
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            hf_config = reward_hf_config(hf_config, pad)
            meta = dataclasses.replace(meta, architecture=hf_config["architectures"][0])
        self.pad_token_id = pad_token_id(hf_config)
        return hf_config, meta

    def unloaded_weights(self) -> tuple[str, ...]:
        return ("output_layer.",) if self.new_head else ()

    def loss(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        tokens, lengths = pair_tensors(batch, "tokens"), pair_tensors(batch, "length")
        scores = pooled_scores(output, score_positions(tokens, self.pad_token_id, lengths))
        pairs = batch["chosen_tokens"].shape[0]
        return bradley_terry(scores[:pairs], scores[pairs:], batch["margin"],
                             self.trainer.args.center_rewards_coefficient or 0.0)
