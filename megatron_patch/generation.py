"""Text generation with a KV cache on Megatron-Core models, with Hugging Face's sampling rules.

Prompts of different lengths are left-padded into one batch; padded key positions are masked.
RoPE makes attention depend only on relative positions, so a left-padded prompt computes what it
computes alone. Runs at any TP (every TP rank draws the same token: the logits are gathered and
the generators are seeded alike); pipeline parallelism is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Hugging Face `generate` semantics: do_sample=False is greedy."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token id already in the sequence: negative logits are
    multiplied by `penalty`, positive ones divided by it."""
    if penalty == 1.0:
        return scores
    picked = scores.gather(1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seen, picked)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return scores if temperature == 1.0 else scores / temperature


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the k highest logits (and any tied with the k-th), -inf elsewhere."""
    if top_k <= 0 or top_k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose total probability is at most
    1 - top_p; the most likely token always stays."""
    if top_p >= 1.0:
        return scores
    ascending, order = torch.sort(scores, dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p
    drop[..., -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None) -> torch.Tensor:
    scores = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if not params.do_sample:
        return scores.argmax(dim=-1)
    scores = apply_top_p(apply_top_k(apply_temperature(scores, params.temperature),
                                     params.top_k), params.top_p)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)


def generate(model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
             vocab_size: int, eos_token_ids: list[int], pad_token_id: int,
             params: SamplingParams = SamplingParams(), seed: int = 1234) -> list[list[int]]:
    """Complete each prompt (token ids); returns the new tokens of each, EOS included."""
    from megatron.core import parallel_state
    from megatron.core.inference.contexts import StaticInferenceContext

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("generation does not support pipeline parallelism; use PP=1 (TP works)")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    model.eval()
    batch, longest = len(prompts), max(len(p) for p in prompts)
    device = next(model.parameters()).device
    tokens = torch.full((batch, longest), pad_token_id, dtype=torch.long, device=device)
    real = torch.zeros((batch, longest), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, device=device)
        real[i, longest - len(p):] = True

    context = StaticInferenceContext(batch, longest + max_new_tokens)
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor(eos_token_ids, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    seen, new = tokens, []
    step_tokens = tokens
    with torch.no_grad():
        for step in range(max_new_tokens):
            length = real.shape[1]
            query = step_tokens.shape[1]
            # True = masked: padded keys, and (while prefilling) keys after the query.
            mask = ~real[:, None, None, :].expand(batch, 1, query, length)
            if query > 1:
                mask = mask | torch.ones(query, length, dtype=torch.bool,
                                         device=device).triu(1)
            positions = torch.arange(length - query, length, device=device).expand(batch, -1)
            logits = model(step_tokens, positions, mask, inference_context=context,
                           runtime_gather_output=True)
            context.sequence_len_offset += query
            full = logits[:, -1, :vocab_size]
            chosen = next_tokens(full, seen, params, generator)
            chosen = torch.where(done, torch.full_like(chosen, pad_token_id), chosen)
            new.append(chosen)
            done = done | torch.isin(chosen, eos)
            if bool(done.all()):
                break
            step_tokens = chosen[:, None]
            seen = torch.cat([seen, step_tokens], dim=1)
            real = torch.cat([real, torch.ones((batch, 1), dtype=torch.bool, device=device)], 1)
    out = torch.stack(new, dim=1).tolist()
    results = []
    for row in out:
        kept = []
        for t in row:
            kept.append(t)
            if t in eos_token_ids:
                break
        results.append(kept)
    return results
