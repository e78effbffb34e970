"""Generation: greedy output equals transformers' generate; processors equal HF's."""

import os

import harness
import pytest
from harness import MAX_NEW, PROMPTS


@pytest.mark.parametrize("variant", ["llama2", "llama1_tied"])
def test_greedy_matches_transformers_at_tp1_tp2_and_pp2(llama_models, variant):
    """PP=2: the tied variant's embedding and output layer live on different stages."""
    root = llama_models[variant]
    (expected,) = harness.run(harness.hf_greedy, 1, root)
    (tp1,) = harness.run(harness.megatron_greedy, 1, root, 1)
    tp2 = harness.run(harness.megatron_greedy, 2, root, 2)
    pp2 = harness.run(harness.megatron_greedy, 2, root, 1, pp=2)
    assert tp1 == expected
    assert tp2[0] == tp2[1] == expected
    assert pp2[0] == pp2[1] == expected  # both stages hold the tokens
    assert any(len(seq) > 5 for seq in expected)  # something was generated


def _processors() -> dict:
    import torch
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from megatron_patch import generation as g

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=gen) * 3
    seen = torch.randint(0, 50, (4, 12), generator=gen)
    pairs = {
        "repetition": (g.apply_repetition_penalty(scores, seen, 1.3),
                       RepetitionPenaltyLogitsProcessor(1.3)(seen, scores.clone())),
        "temperature": (g.apply_temperature(scores, 0.7),
                        TemperatureLogitsWarper(0.7)(seen, scores.clone())),
        "top_k": (g.apply_top_k(scores, 7), TopKLogitsWarper(7)(seen, scores.clone())),
        "top_p": (g.apply_top_p(scores, 0.8), TopPLogitsWarper(0.8)(seen, scores.clone())),
        "top_p_small": (g.apply_top_p(scores, 0.01), TopPLogitsWarper(0.01)(seen, scores.clone())),
    }
    return {name: bool(torch.equal(a, b)) for name, (a, b) in pairs.items()}


def test_logits_processors_match_transformers():
    (r,) = harness.run(_processors, 1)
    assert all(r.values()), r


def _sample(model_root: str, seed: int, tp: int = 1, pp: int = 1) -> list:
    from megatron_patch import parallel
    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.models import from_checkpoint

    parallel.initialize(tp, pp)
    model, meta = from_checkpoint(os.path.join(model_root, "mcore"))
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=50, top_p=0.95,
                            repetition_penalty=1.2)
    return generate(model, PROMPTS, max_new_tokens=16, vocab_size=meta.vocab_size,
                    eos_token_ids=[2], pad_token_id=0, params=params, seed=seed,
                    return_logprobs=True)


def test_sampling_is_reproducible_with_a_seed_at_any_layout(llama_models):
    """The same seed draws the same tokens with the same log-probs at TP=2 and PP=2 (every
    rank of each), another seed other tokens."""
    root = llama_models["llama2"]
    (a,) = harness.run(_sample, 1, root, 11)
    (b,) = harness.run(_sample, 1, root, 11)
    (c,) = harness.run(_sample, 1, root, 12)
    assert a == b and a[0] != c[0]
    for name, ranks in (("tp2", harness.run(_sample, 2, root, 11, 2)),
                        ("pp2", harness.run(_sample, 2, root, 11, 1, 2))):
        assert ranks[0][0] == ranks[1][0] == a[0], name
        # fp32: TP/PP reorder the sums of the logits; log-probs stay within 1e-5.
        worst = max(abs(x - y) for r in ranks for row, ref in zip(r[1], a[1], strict=True)
                    for x, y in zip(row, ref, strict=True))
        assert worst <= harness.LOSS_ATOL, (name, worst)


def _masks_seen(model_root: str) -> list[list[bool]]:
    """For each forward of a left-padded batch: whether some query row has every key masked."""
    from megatron_patch import parallel
    from megatron_patch.generation import generate
    from megatron_patch.models import from_checkpoint

    parallel.initialize(1, 1)
    model, meta = from_checkpoint(os.path.join(model_root, "mcore"))
    seen = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(bool(args[2].all(dim=-1).any())))
    generate(model, PROMPTS, max_new_tokens=3, vocab_size=meta.vocab_size, eos_token_ids=[-1],
             pad_token_id=0)
    return seen


def test_no_query_row_has_every_key_masked(llama_models):
    """Left padding must not leave a padding position with no key at all: some attention
    kernels (not torch's CPU ones) return NaN for such a row, and NaN values poison real rows."""
    (seen,) = harness.run(_masks_seen, 1, llama_models["llama2"])
    assert seen == [False] * 3, seen


# Repetition penalty and sampling with pad == EOS: a prompt's completion must not depend on the
# other prompts of its batch (their left padding is EOS, which must not count as seen).
PENALTY = 1.5
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9)
SEED = 7


def _hf_alone(model_root: str, eos: int | None, max_new: int = MAX_NEW) -> dict:
    """transformers' completions of each prompt of PROMPTS alone (no padding), greedy and
    sampled after torch.manual_seed(sample_seed(SEED, i)); eos None: never stop."""
    import torch
    import transformers

    from megatron_patch.generation import sample_seed

    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(model_root, "hf"),
                                                           dtype=torch.float32).eval()
    stop = {"eos_token_id": eos, "pad_token_id": eos} if eos is not None else {
        "min_new_tokens": max_new, "pad_token_id": 0}
    out: dict[str, list[list[int]]] = {"greedy": [], "sampled": []}
    for i, prompt in enumerate(PROMPTS):
        for mode, extra in (("greedy", {"do_sample": False}), ("sampled", SAMPLING)):
            torch.manual_seed(sample_seed(SEED, i))
            ids = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new,
                              repetition_penalty=PENALTY, **stop, **extra)
            out[mode].append(ids[0, len(prompt):].tolist())
    return out


def _megatron_alone_and_batched(model_root: str, tp: int, eos: int) -> dict:
    """Greedy and sampled completions of PROMPTS with pad == EOS: each prompt alone, all in one
    batch, and in one batch in reverse order (prompt_indices reversed too)."""
    from megatron_patch import parallel
    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.models import from_checkpoint

    parallel.initialize(tp, 1)
    model, meta = from_checkpoint(os.path.join(model_root, "mcore"))
    out = {}
    for mode, extra in (("greedy", {}), ("sampled", SAMPLING)):
        params = SamplingParams(repetition_penalty=PENALTY, **extra)

        def run(prompts, indices, params=params):
            return generate(model, prompts, max_new_tokens=MAX_NEW, vocab_size=meta.vocab_size,
                            eos_token_ids=[eos], pad_token_id=eos, params=params, seed=SEED,
                            prompt_indices=indices)

        order = list(range(len(PROMPTS)))[::-1]
        out[mode] = {
            "alone": [run([p], [i])[0] for i, p in enumerate(PROMPTS)],
            "batched": run(PROMPTS, None),
            "reversed": run([PROMPTS[i] for i in order], order)[::-1],
        }
    return out


def test_penalty_and_sampling_ignore_left_padding_at_tp1_and_tp2(llama_models):
    """Repetition penalty 1.5, pad == EOS, prompts of 3, 7 and 12 tokens. EOS is a token that
    the shortest prompt's greedy completion reaches at its fourth step (transformers, alone):
    were the EOS padding of the batch counted, that row would be penalised away from it."""
    root = llama_models["llama2"]
    (free,) = harness.run(_hf_alone, 1, root, None)
    completion = free["greedy"][0]
    eos = completion[3]
    assert eos not in PROMPTS[0] + completion[:3], completion
    (expected,) = harness.run(_hf_alone, 1, root, eos)
    assert expected["greedy"][0][-1] == eos and len(expected["greedy"][0]) == 4
    for tp in (1, 2):
        results = harness.run(_megatron_alone_and_batched, tp, root, tp, eos)
        assert all(r == results[0] for r in results), tp  # TP ranks agree
        got = results[0]
        for mode in ("greedy", "sampled"):
            assert got[mode]["alone"] == got[mode]["batched"] == got[mode]["reversed"], (
                tp, mode, got[mode])
        assert got["greedy"]["alone"] == expected["greedy"], (tp, got["greedy"], expected)
        assert got["sampled"]["alone"] == expected["sampled"], (tp, got["sampled"], expected)
