"""Text generation with a KV cache on Megatron-Core models, with Hugging Face's sampling rules.

Prompts of different lengths are left-padded into one batch; padded key positions are masked.
RoPE and ALiBi make attention depend only on relative positions, and learned position
embeddings are read at positions counted from each row's first real token, so a left-padded
prompt computes what it computes alone. Runs at any TP (every TP rank draws the same token: the
logits are gathered and the generators are seeded alike) and PP (stages pass hidden states
along for each step, and the last stage's tokens are broadcast to the others:
`forward.pipelined`); virtual pipeline stages are refused.

A prompt's completion does not depend on the other prompts in its batch: the repetition penalty
counts only the prompt and the tokens generated so far (never the left padding, which is EOS for
tokenizers without a pad token), and when sampling each prompt draws from its own generator,
seeded by `sample_seed(seed, index)` from the prompt's index in the run (its 0-based line in a
prompt file), not its place in the batch. Prompt i samples as transformers' `generate` does after
`torch.manual_seed(sample_seed(seed, i))`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_patch import checkpoint, parallel
from megatron_patch.errors import (
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
    require_dir,
)
from megatron_patch.forward import pipelined
from megatron_patch.models import (
    checkpoint_expert_tensor_parallel_size,
    from_checkpoint,
    load_hf_config,
    params_dtype_from_flags,
)
from megatron_patch.models.score_head import check_kind
from megatron_patch.prompts import PROMPT_FORMATS, output_line, prompt_ids, read_prompts


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


def sample_seed(seed: int, index: int) -> int:
    """The seed of the generator that prompt `index` of a run samples from: 32 bits of a hash
    of both (torch's CPU generator keeps only the low 32 bits of a seed, so `seed` and `index`
    cannot simply be packed side by side)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams,
                generators: Sequence[torch.Generator]) -> torch.Tensor:
    """The next token of each row. `seen`: the ids each row's repetition penalty counts;
    `generators`: one per row, so a row's draws do not depend on the other rows."""
    scores = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if not params.do_sample:
        return scores.argmax(dim=-1)
    scores = apply_top_p(apply_top_k(apply_temperature(scores, params.temperature),
                                     params.top_k), params.top_p)
    probs = scores.softmax(dim=-1)
    return torch.cat([torch.multinomial(probs[row:row + 1], 1, generator=generator)[0]
                      for row, generator in enumerate(generators)])


def policy_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                    params: SamplingParams) -> torch.Tensor:
    """log pi(token) of the policy the sampling draws from, before its truncations:
    log_softmax(logits / temperature) over the whole vocabulary (temperature 1 when greedy).
    Top-k / top-p only decide which tokens may be drawn; reinforcement learning trains (and
    recomputes) this distribution, whose log-probs are what the trainer's forward gives."""
    temperature = params.temperature if params.do_sample else 1.0
    scores = logits.float() if temperature == 1.0 else logits.float() / temperature
    return torch.log_softmax(scores, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def generate(model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
             vocab_size: int, eos_token_ids: list[int], pad_token_id: int,
             params: SamplingParams = SamplingParams(), seed: int = 1234,
             prompt_indices: Sequence[int] | None = None, return_logprobs: bool = False,
             ) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """Complete each prompt (token ids); returns the new tokens of each, EOS included.

    prompt_indices: each prompt's index in the run (default 0, 1, ...), which seeds its sampling
    generator (`sample_seed`); pass the same index for a prompt whatever batch it is in.
    return_logprobs: also return each new token's log-probability (`policy_logprobs`), as
    (tokens, logprobs) lists of the same lengths."""
    from megatron.core.inference.contexts import StaticInferenceContext

    indices = _checked_indices(prompts, prompt_indices)
    model.eval()
    batch, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    device = next(model.parameters()).device
    tokens, positions, padded_keys, seen = _buffers(prompts, total, pad_token_id, device)
    context = StaticInferenceContext(batch, total)
    generators = [torch.Generator(device=device).manual_seed(sample_seed(seed, i))
                  for i in indices]
    eos = torch.tensor(eos_token_ids, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    steps = 0

    def choose(logits: torch.Tensor, length: int, done: torch.Tensor) -> torch.Tensor:
        """[b, 2] float64 (exact for token ids and fp32 log-probs): each row's next token and
        its log-probability, computed on the last pipeline stage."""
        full = logits[:, -1, :vocab_size]
        chosen = next_tokens(full, seen[:, :length], params, generators)
        chosen = torch.where(done, torch.full_like(chosen, pad_token_id), chosen)
        logprob = (policy_logprobs(full, chosen, params) if return_logprobs
                   else torch.zeros(batch, device=device))
        return torch.stack([chosen.double(), logprob.double()], dim=1)

    picked_like = torch.empty((batch, 2), dtype=torch.float64, device=device)
    # inference_mode rather than no_grad: less per-op bookkeeping in the decode loop.
    with torch.inference_mode():
        for step in range(max_new_tokens):
            length = longest + step
            query = longest if step == 0 else 1
            if step > 0:
                context.enable_decode_mode()
            picked = pipelined(model, tokens[:, length - query:length],
                               positions[:, length - query:length],
                               _step_mask(padded_keys, length, step == 0),
                               functools.partial(choose, length=length, done=done), picked_like,
                               inference_context=context, runtime_gather_output=True)
            context.sequence_len_offset += query
            chosen = picked[:, 0].long()
            if return_logprobs:
                logprobs[:, step] = picked[:, 1].float()
            tokens[:, length] = chosen
            seen[:, length] = chosen
            steps += 1
            done = done | torch.isin(chosen, eos)
            if bool(done.all()):
                break
    results = _cut_after_eos(tokens[:, longest:longest + steps].tolist(), eos_token_ids)
    if return_logprobs:
        return results, [row[:len(kept)] for row, kept in zip(logprobs.tolist(), results,
                                                               strict=True)]
    return results


def _checked_indices(prompts: list[list[int]],
                     prompt_indices: Sequence[int] | None) -> list[int]:
    """Each prompt's index in the run; ValueError for what generation cannot do."""
    from megatron.core import parallel_state

    if parallel_state.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
        raise ValueError("generation does not support virtual pipeline stages; build the model "
                         "with one chunk per stage")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    indices = list(range(len(prompts)) if prompt_indices is None else prompt_indices)
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} prompt_indices for {len(prompts)} prompts")
    return indices


def _buffers(prompts: list[list[int]], total: int, pad_token_id: int,
             device: torch.device) -> tuple[torch.Tensor, ...]:
    """(tokens, positions, padded keys, seen) for the whole run, prompts left-padded. Every
    buffer is allocated once; each step reads views of it, so the decode loop builds no masks,
    positions or concatenations."""
    batch, longest = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((batch, total), pad_token_id, dtype=torch.long, device=device)
    real = torch.ones((batch, total), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):longest] = torch.tensor(p, device=device)
        real[i, :longest - len(p)] = False
    # True = masked: padded keys. [b, 1, 1, total], sliced to the keys of each step.
    padded_keys = ~real[:, None, None, :]
    # Each prompt's first real token is position 0, as in transformers (left padding would
    # otherwise shift learned absolute positions and ALiBi distances).
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    # What the repetition penalty counts: `tokens` with each row's padding replaced by the row's
    # first prompt token, which the penalty counts anyway (a repeated id is penalised once).
    first = torch.tensor([p[0] for p in prompts], device=device)
    seen = torch.where(real, tokens, first[:, None])
    return tokens, positions, padded_keys, seen


def _step_mask(padded_keys: torch.Tensor, length: int, prefill: bool) -> torch.Tensor:
    """The attention mask (True = masked) of a step over the first `length` positions."""
    if not prefill:
        return padded_keys[..., :length]
    # Prefill: padded keys and keys after the query. A padding position still sees itself: a
    # row with every key masked is NaN in some attention kernels, and a NaN value poisons real
    # rows even where their weight on it is zero.
    device = padded_keys.device
    return (padded_keys[..., :length] | torch.ones(
        length, length, dtype=torch.bool, device=device).triu(1)) & ~torch.eye(
            length, dtype=torch.bool, device=device)


def _cut_after_eos(rows: list[list[int]], eos_token_ids: list[int]) -> list[list[int]]:
    results = []
    for row in rows:
        kept = []
        for t in row:
            kept.append(t)
            if t in eos_token_ids:
                break
        results.append(kept)
    return results


def add_arguments(parser) -> None:
    parser.add_argument("--load", required=True, help="checkpoint directory")
    parser.add_argument("--input-file", required=True,
                        help="a .txt file (one prompt a line, \\n escapes) or JSON lines with "
                             "`text`, `prompt`, `query`, `instruction` or `messages`")
    parser.add_argument("--output-file", required=True,
                        help=".txt: one completion a line (newlines escaped); else JSON lines")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                        help="raw: continue the text as is; chat: render as SFT does; auto: raw "
                             "for a .txt input and records with `text`, chat otherwise")
    parser.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    parser.add_argument("--micro-batch-size", type=positive_int, default=4,
                        help="prompts per batch")
    parser.add_argument("--max-input-length", type=positive_int, default=None,
                        help="keep only the last this-many prompt tokens")
    parser.add_argument("--max-new-tokens", "--out-seq-length", type=nonnegative_int,
                        default=128, dest="max_new_tokens")
    parser.add_argument("--top-k", type=nonnegative_int, default=0)
    parser.add_argument("--top-p", type=probability, default=0.0)
    parser.add_argument("--temperature", type=nonnegative_float, default=1.0)
    parser.add_argument("--repetition-penalty", type=positive_float, default=1.0)
    parser.add_argument("--greedy", action="store_true",
                        help="greedy decoding (also implied by --top-k 0 --top-p 0)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--tokenizer-model", default=None,
                        help="HF tokenizer directory (default: the checkpoint's)")


def check_sampling_flags(args) -> None:
    """Refuse what transformers' logits processors refuse (top_p = 0 stays Megatron-LM's "off")."""
    if not 0.0 <= args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1] (or 0: off), got {args.top_p}")
    if args.repetition_penalty <= 0:
        raise ValueError(f"--repetition-penalty must be a positive number, got "
                         f"{args.repetition_penalty}")
    if args.temperature <= 0 and sampling_params(args).do_sample:
        raise ValueError(f"--temperature must be positive when sampling, got {args.temperature}")


def sampling_params(args) -> SamplingParams:
    """Megatron-LM's convention: top_k = 0 and top_p = 0 mean greedy; top_p = 0 means off."""
    greedy = args.greedy or (args.top_k == 0 and args.top_p == 0.0)
    return SamplingParams(do_sample=not greedy, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p if args.top_p > 0 else 1.0,
                          repetition_penalty=args.repetition_penalty)


def _check_output_file(output: str, prompts: str) -> None:
    """Before the model loads: the output's directory exists, and it is not the prompt file
    (which it would replace)."""
    import os

    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--output-file {output}: its directory {folder} does not exist")
    if os.path.exists(output) and os.path.samefile(output, prompts):
        raise ValueError(f"--output-file {output} is the --input-file: the prompts would be "
                         "overwritten")


def _load_tokenizer(tokenizer_model: str | None, load: str) -> Any:
    """--tokenizer-model, else the checkpoint's own tokenizer; a --tokenizer-model that does not
    load is named (transformers takes a missing directory for a hub name it then refuses)."""
    import os

    from transformers import AutoTokenizer

    if not tokenizer_model:
        return AutoTokenizer.from_pretrained(os.path.join(load, checkpoint.HF_DIR))
    if not os.path.isdir(tokenizer_model) and tokenizer_model.startswith(("/", ".", "~")):
        raise ValueError(f"--tokenizer-model {tokenizer_model}: no such directory")
    try:
        return AutoTokenizer.from_pretrained(tokenizer_model)
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer-model {tokenizer_model}: cannot load a tokenizer "
                         f"({e})") from e


def run(args) -> int:
    """Generate completions for a prompt file (run under torchrun for TP > 1)."""
    check_sampling_flags(args)
    require_dir("--load", args.load)
    import os

    records = read_prompts(args.input_file, args.prompt_format)  # bad input before work
    _check_output_file(args.output_file, args.input_file)
    check_kind(load_hf_config(os.path.join(args.load, checkpoint.HF_DIR)), reward=False,
               source=args.load, flag="--load")
    tok = _load_tokenizer(args.tokenizer_model, args.load)  # before the model: seconds
    parallel.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                        seed=args.seed,
                        expert_tensor_parallel_size=checkpoint_expert_tensor_parallel_size(
                            args.load, args.tensor_model_parallel_size))
    model, meta = from_checkpoint(args.load, params_dtype=params_dtype_from_flags(args))
    params = sampling_params(args)
    eos = [tok.eos_token_id]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rank0 = torch.distributed.get_rank() == 0
    tmp = args.output_file + ".partial"
    out = open(tmp, "w", encoding="utf-8") if rank0 else None
    eos_first = 0
    for start in range(0, len(records), args.micro_batch_size):
        batch = records[start:start + args.micro_batch_size]
        prompts = [prompt_ids(tok, r)[-(args.max_input_length or 0):] for r in batch]
        completions = generate(model, prompts, max_new_tokens=args.max_new_tokens,
                               vocab_size=meta.vocab_size, eos_token_ids=eos, pad_token_id=pad,
                               params=params, seed=args.seed,
                               prompt_indices=range(start, start + len(batch)))
        eos_first += sum(1 for ids in completions if ids[:1] and ids[0] in eos)
        if out:
            for record, ids in zip(batch, completions, strict=True):
                text = tok.decode(ids, skip_special_tokens=True)
                out.write(output_line(args.output_file, record, text))
            print(f"generated {min(start + len(batch), len(records))}/{len(records)}",
                  flush=True)
    if out:
        out.close()
        os.replace(tmp, args.output_file)
        if eos_first:
            print(eos_first_note(eos_first, len(records), tok.eos_token), flush=True)
    parallel.destroy()
    return 0


def eos_first_note(count: int, total: int, eos_token: str) -> str:
    """Why some completions are empty strings (not an error)."""
    return (f"note: {count} of {total} completions are empty: the model's first new token was "
            f"its end-of-sequence token {eos_token!r}, which ends a completion")


if __name__ == "__main__":
    import sys

    from megatron_patch.errors import ArgumentParser, run_main

    parser = ArgumentParser(prog="megatron-patch generate")
    add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--verbose", action="store_true",
                        help="also show other libraries' warnings")
    sys.exit(run_main("megatron-patch generate", lambda: run(parser.parse_args())))
