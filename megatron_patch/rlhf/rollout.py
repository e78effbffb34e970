"""Rollouts: prompts from a file, completions sampled by the policy being trained (the same
Megatron-Core model in the same processes, through `megatron_patch.generation`), and the
tensors the trainer reads.

Log-probabilities: generation returns, for each sampled token, log softmax(logits / temperature)
over the whole vocabulary (`generation.policy_logprobs`). That is the policy the trainer
recomputes and differentiates (`token_logprobs` below, with the same temperature). Top-k and
top-p only restrict which tokens may be drawn; as in verl and OpenRLHF they are not part of the
trained policy, so with them the samples come from a truncated version of it (keep them off for
on-policy samples). The repetition penalty is refused: it would make the sampling distribution
depend on the history in a way the trainer does not model.

Layout for training: each sample is [prompt, completion, padding] from position 0 (causal
attention needs no mask; generation's left padding computes the same as a prompt alone). The
loss mask covers the positions that predict completion tokens, EOS included.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from megatron_patch.forward import masked_vocab_parallel_cross_entropy, pipelined
from megatron_patch.generation import SamplingParams, generate
from megatron_patch.prompts import Prompt, prompt_ids, read_prompts


class RolloutError(ValueError):
    pass


@dataclass
class Rollout:
    index: int  # its number in the run: seeds its sampling generator (generation.sample_seed)
    prompt_index: int  # its prompt's index in the PromptSet (the file's prompts that fit)
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # of each completion token, as sampled
    finished: bool  # ended with EOS (else cut at --max-new-tokens)


@dataclass
class PromptSet:
    prompts: list[Prompt]
    ids: list[list[int]]
    skipped_long: int

    def order(self, seed: int, epoch: int) -> list[int]:
        """The prompts' order in one pass (epoch): a seeded shuffle, so a resumed run knows
        which prompt comes next from the count of prompts consumed alone."""
        return np.random.RandomState((seed + epoch) % 2**32).permutation(len(self.ids)).tolist()

    def take(self, consumed: int, count: int, seed: int) -> list[int]:
        """Indices of the `count` prompts after the first `consumed` of the run."""
        n = len(self.ids)
        orders: dict[int, list[int]] = {}
        out: list[int] = []
        for position in range(consumed, consumed + count):
            epoch = position // n
            if epoch not in orders:
                orders[epoch] = self.order(seed, epoch)
            out.append(orders[epoch][position % n])
        return out


def load_prompts(path: str, prompt_format: str, tokenizer, max_prompt_length: int,
                 skip_long: bool, limit_hint: str) -> PromptSet:
    """The prompts of a `.txt` / JSON-lines file rendered as generation renders them. A prompt
    longer than max_prompt_length is an error naming it (or, with skip_long, a counted skip)."""
    kept, ids, skipped = [], [], 0
    for prompt in read_prompts(path, prompt_format):
        tokens = prompt_ids(tokenizer, prompt)
        if len(tokens) > max_prompt_length:
            if not skip_long:
                raise RolloutError(f"{prompt.where}: the prompt has {len(tokens)} tokens, more "
                                   f"than {max_prompt_length} ({limit_hint}); shorten it, raise "
                                   "the limit, or pass --skip-long-prompts")
            skipped += 1
            continue
        kept.append(prompt)
        ids.append(tokens)
    if not ids:
        raise RolloutError(f"{path}: no prompt fits within {max_prompt_length} tokens "
                           f"({limit_hint})")
    return PromptSet(kept, ids, skipped)


def sample(module: torch.nn.Module, prompts: list[list[int]], prompt_indices: list[int],
           first_index: int, n: int, *, max_new_tokens: int, vocab_size: int, eos: list[int],
           pad: int, params: SamplingParams, seed: int, batch_size: int) -> list[Rollout]:
    """`n` completions of each prompt, the n of a prompt consecutive. Sample k of the call gets
    the run-wide index first_index + k, which seeds its draw: the same call gives the same
    completions whatever the batch size (and after a resume)."""
    if params.repetition_penalty != 1.0:
        raise RolloutError("the repetition penalty is not supported in rollouts: the trainer's "
                           "policy would not be the one that sampled")
    flat = [(p, i) for p, i in zip(prompts, prompt_indices, strict=True) for _ in range(n)]
    rollouts: list[Rollout] = []
    was_training = module.training
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        indices = list(range(first_index + start, first_index + start + len(chunk)))
        tokens, logprobs = generate(module, [p for p, _ in chunk], max_new_tokens=max_new_tokens,
                                    vocab_size=vocab_size, eos_token_ids=eos, pad_token_id=pad,
                                    params=params, seed=seed, prompt_indices=indices,
                                    return_logprobs=True)
        for (prompt, prompt_index), index, completion, lp in zip(chunk, indices, tokens,
                                                                 logprobs, strict=True):
            rollouts.append(Rollout(index, prompt_index, prompt, completion, lp,
                                    bool(completion) and completion[-1] in eos))
    module.train(was_training)
    return rollouts


def pack(rollouts: list[Rollout], seq_length: int, pad: int) -> dict[str, torch.Tensor]:
    """[N, seq_length] tensors: tokens, position_ids, labels (next tokens), loss_mask (1.0 where
    the label is a completion token) and rollout_logprobs (the sampled log-prob of that label)."""
    count = len(rollouts)
    tokens = torch.full((count, seq_length), pad, dtype=torch.long)
    labels = torch.full((count, seq_length), pad, dtype=torch.long)
    mask = torch.zeros((count, seq_length))
    logprobs = torch.zeros((count, seq_length))
    for row, r in enumerate(rollouts):
        sequence = r.prompt_ids + r.completion_ids
        if len(sequence) > seq_length:
            raise RolloutError(f"a prompt of {len(r.prompt_ids)} tokens with a completion of "
                               f"{len(r.completion_ids)} exceeds --seq-length {seq_length}")
        tokens[row, :len(sequence)] = torch.tensor(sequence)
        labels[row, :len(sequence) - 1] = torch.tensor(sequence[1:])
        first, last = len(r.prompt_ids) - 1, len(sequence) - 1  # positions predicting completion
        mask[row, first:last] = 1.0
        logprobs[row, first:last] = torch.tensor(r.logprobs, dtype=torch.float32)
    positions = torch.arange(seq_length).expand(count, -1).contiguous()
    return {"tokens": tokens, "position_ids": positions, "labels": labels, "loss_mask": mask,
            "rollout_logprobs": logprobs}


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[label] from vocab-parallel logits [b, s, V/TP] (the
    whole vocabulary is never gathered); differentiable."""
    scaled = logits if temperature == 1.0 else logits / temperature
    return -masked_vocab_parallel_cross_entropy(scaled, labels, vocab_size)


@torch.no_grad()
def logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], micro_batch_size: int,
             vocab_size: int, temperature: float) -> torch.Tensor:
    """[N, S] log-probs of every label of a packed batch under `model` (any TP/PP: on every
    stage), in micro-batches."""
    def of_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_logprobs(logits, labels, vocab_size, temperature).float()

    out = []
    for start in range(0, batch["tokens"].shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        labels = batch["labels"][rows]
        out.append(pipelined(model, batch["tokens"][rows], batch["position_ids"][rows], None,
                             functools.partial(of_labels, labels=labels),
                             torch.empty(labels.shape)))
    return torch.cat(out)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position, from vocab-parallel logits
    (three reductions over TP instead of a gather); padding rows of the vocabulary excluded."""
    from megatron.core import parallel_state

    scaled = logits.float() / temperature
    local = scaled.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * local
    real = torch.arange(start, start + local, device=scaled.device) < vocab_size
    scaled = scaled.masked_fill(~real, float("-inf"))
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    peak = scaled.max(dim=-1, keepdim=True).values
    if tp > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = scaled - peak
    weights = torch.where(real, shifted.exp(), torch.zeros_like(shifted))
    sums = torch.stack([weights.sum(-1), (weights * torch.where(real, shifted, 0)).sum(-1)])
    if tp > 1:
        torch.distributed.all_reduce(sums, group=group)
    return sums[0].log() - sums[1] / sums[0]


def digest(rollouts: list[Rollout]) -> str:
    """A fingerprint of this rank's sampled tokens (a resumed run must sample the same)."""
    import hashlib

    text = ";".join(",".join(map(str, r.completion_ids)) for r in rollouts)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RolloutShare:
    """This data-parallel rank's samples of one rollout batch, indexed as the trainer's
    micro-batch reader (`training.data.microbatches`) indexes a dataset: sample g of the global
    batch order lies on DP rank (g // mbs) % dp, and each rank holds its micro-batches in order.
    The length is the whole rollout batch's, so the reader's running sample count (modulo the
    length) walks the mini-batches of every PPO epoch."""

    def __init__(self, batch: dict[str, torch.Tensor], micro_batch_size: int, dp: int) -> None:
        self.batch, self.mbs, self.dp = batch, micro_batch_size, dp
        self.local = batch["tokens"].shape[0]

    def __len__(self) -> int:
        return self.local * self.dp

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        row = (g // (self.mbs * self.dp)) * self.mbs + g % self.mbs
        return {k: v[row] for k, v in self.batch.items()}


def rollout_stats(rollouts: list[Rollout], rewards: torch.Tensor, valid: torch.Tensor,
                  batch: dict[str, torch.Tensor], n: int,
                  all_reduce: Callable[..., torch.Tensor]) -> dict[str, float]:
    """Reward mean/std, response length, rollout-vs-train log-prob difference and skipped or
    equal-reward groups of a rollout batch, over every data-parallel rank (`all_reduce`)."""
    mask = batch["loss_mask"]
    counted = valid.float()
    lengths = torch.tensor([float(len(r.completion_ids)) for r in rollouts])
    diff = (batch["old_logprobs"] - batch["rollout_logprobs"]).abs() * mask
    grouped, whole = rewards.view(-1, n), valid.view(-1, n).all(dim=1)
    equal_groups = ((grouped == grouped[:, :1]).all(dim=1) & whole).float().sum()
    sums = torch.stack([(rewards * counted).sum(), (rewards.square() * counted).sum(),
                        counted.sum(), (lengths * counted).sum(), diff.sum(), mask.sum(),
                        (~valid).float().sum() / n, equal_groups]).double()
    all_reduce(sums)
    top = diff.max().reshape(1)
    all_reduce(top, torch.distributed.ReduceOp.MAX)
    count = sums[2].clamp(min=1)
    mean = sums[0] / count
    return {"reward mean": mean.item(),
            "reward std": (sums[1] / count - mean.square()).clamp(min=0).sqrt().item(),
            "response length": (sums[3] / count).item(),
            "logprob diff mean": (sums[4] / sums[5].clamp(min=1)).item(),
            "logprob diff max": top.item(),
            "skipped groups": int(sums[6].item()),
            "equal-reward groups": int(sums[7].item())}
