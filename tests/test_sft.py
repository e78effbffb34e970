"""Supervised fine-tuning: response-only loss, packing, microbatch invariance, learning."""

import json
import os

import harness
import pytest

from megatron_patch.tiny import QA


def _first_loss_vs_hand(model_root: str, train: str) -> dict:
    import torch
    import transformers

    from megatron_patch.data.sft import ALPACA_PROMPT
    from megatron_patch.training.loop import Trainer

    trainer = Trainer(harness.sft_args(os.path.join(model_root, "mcore"), train, iters=2))
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(model_root, "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(model_root, "hf"),
                                                           dtype=torch.float32).eval()
    total, count = 0.0, 0
    for q, a in QA[:4]:
        prompt = tok(ALPACA_PROMPT.format(instruction=q))["input_ids"]
        response = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = hf(ids).logits[0]
        # Position t predicts token t+1: the response tokens are predicted from
        # positions len(prompt)-1 ... len(ids)-2.
        pred = logits[len(prompt) - 1: ids.shape[1] - 1]
        total += torch.nn.functional.cross_entropy(pred, torch.tensor(response),
                                                   reduction="sum").item()
        count += len(response)
    return {"megatron": trainer.train()[0]["loss"], "hand": total / count}


def test_loss_is_over_response_tokens_only(llama_models, tmp_path):
    train = str(tmp_path / "train.jsonl")
    harness.write_sft_records(train, 4)
    (r,) = harness.run(_first_loss_vs_hand, 1, llama_models["llama2"], train)
    assert abs(r["megatron"] - r["hand"]) <= harness.LOSS_ATOL, r


def _per_sample_losses(model_root: str, train: str, pack: bool) -> list[float]:
    import torch
    import transformers

    from megatron_patch import parallel
    from megatron_patch.data.sft import build_sft_dataset
    from megatron_patch.forward import masked_vocab_parallel_cross_entropy
    from megatron_patch.models import from_checkpoint

    parallel.initialize(1, 1)
    model, meta = from_checkpoint(os.path.join(model_root, "mcore"))
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(model_root, "hf"))
    dataset, _ = build_sft_dataset(train, tok, 256 if pack else 96, pack=pack)
    losses = {}
    for parts in dataset.sequences:
        item = dataset.build(parts)
        with torch.no_grad():
            logits = model(item["tokens"][None], item["position_ids"][None],
                           item.get("attention_mask", None) if pack else None)
        per_token = masked_vocab_parallel_cross_entropy(logits, item["labels"][None],
                                                        meta.vocab_size)[0] * item["loss_mask"]
        start = 0
        for tokens, _ in parts:
            losses[tuple(tokens)] = per_token[start:start + len(tokens)].sum().item()
            start += len(tokens)
    return [losses[k] for k in sorted(losses)]


def test_packed_sequences_give_the_same_per_sample_losses(llama_models, tmp_path):
    train = str(tmp_path / "train.jsonl")
    harness.write_sft_records(train)
    (padded,) = harness.run(_per_sample_losses, 1, llama_models["llama2"], train, False)
    (packed,) = harness.run(_per_sample_losses, 1, llama_models["llama2"], train, True)
    assert len(packed) == len(padded) == len(QA)
    assert max(abs(a - b) for a, b in zip(packed, padded, strict=True)) <= harness.LOSS_ATOL, (
        packed, padded)


def _curve(model_root: str, train: str, mbs: int) -> list[float]:
    from megatron_patch.training.loop import Trainer

    trainer = Trainer(harness.sft_args(os.path.join(model_root, "mcore"), train, mbs=mbs))
    return [s["loss"] for s in trainer.train()]


def test_microbatch_split_does_not_change_the_loss(llama_models, tmp_path):
    train = str(tmp_path / "train.jsonl")
    harness.write_sft_records(train)
    (one_by_four,) = harness.run(_curve, 1, llama_models["llama2"], train, 1)
    (four_by_one,) = harness.run(_curve, 1, llama_models["llama2"], train, 4)
    diff = max(abs(a - b) for a, b in zip(one_by_four, four_by_one, strict=True))
    assert diff <= harness.LOSS_ATOL, (one_by_four, four_by_one)


def _learn_and_answer(model_root: str, train: str, save: str) -> dict:
    from megatron_patch.training.loop import Trainer

    trainer = Trainer(harness.sft_args(os.path.join(model_root, "mcore"), train, iters=120,
                                       mbs=6, gbs=6, seq=64, lr=3e-3))
    losses = [s["loss"] for s in trainer.train()]
    return {"answers": harness.qa_answers(trainer, model_root), "first": losses[0],
            "last": losses[-1]}


def test_finetuned_model_reproduces_the_answers(llama_models, tmp_path):
    train = str(tmp_path / "train.jsonl")
    harness.write_sft_records(train)
    (r,) = harness.run(_learn_and_answer, 1, llama_models["llama2"], train, str(tmp_path / "s"))
    harness.report_learning("sft answers", first=r["first"], last=r["last"],
                            right=sum(a == b for a, (_, b) in zip(r["answers"], QA, strict=True)))
    # Measured on seeds 1-4 and 7 (MEGATRON_PATCH_TEST_SEED; 3 is the default; a seed stands in
    # for another CPU's rounding): all 6 answers right on every seed, the loss from 6.88 down to
    # 0.024 on every seed (a mean probability of 0.98 per answer token, where greedy decoding
    # needs only the largest). The bar, every answer, stands on that margin, not on one run.
    assert r["answers"] == [a for _, a in QA], r


def _bad(path: str) -> str:
    from megatron_patch.data.sft import read_records

    try:
        read_records(path)
    except ValueError as e:
        return str(e)
    return "no error"


def test_bad_records_name_file_and_line(tmp_path):
    from megatron_patch.data.sft import read_records

    path = str(tmp_path / "bad.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"instruction": "q", "output": "a"}) + "\n")
        f.write(json.dumps({"instruction": "q"}) + "\n")
        f.write("{not json\n")
    assert _bad(path).startswith(f"{path}:2: missing or non-string 'output'")
    records, bad = read_records(path, skip_bad=True)
    assert len(records) == 1 and bad == 2
    with pytest.raises(ValueError, match=f"{path}:3: invalid JSON"):
        with open(path, "w") as f:
            f.write(json.dumps({"instruction": "q", "output": "a"}) + "\n\n{not json\n")
        read_records(path)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _chat_masks(model_root: str) -> dict:
    import transformers

    from megatron_patch.data.sft import render_prompt, tokenize_record

    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(model_root, "hf"))
    tok.chat_template = CHAT_TEMPLATE
    record = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "What is two plus two?"},
                           {"role": "assistant", "content": "4"},
                           {"role": "user", "content": "And three plus three?"},
                           {"role": "assistant", "content": "6"}]}
    ids, mask = tokenize_record(tok, record)
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    prompt = tok.decode(render_prompt(tok, {"messages": record["messages"][:2]}))
    return {"trained": trained, "full": tok.decode(ids), "prompt": prompt}


def test_chat_template_trains_on_assistant_turns_only(llama_models):
    (r,) = harness.run(_chat_masks, 1, llama_models["llama2"])
    # Each assistant turn and the end-of-turn token the template puts after it, nothing else.
    assert r["trained"] == "4</s>6</s>", r
    assert r["full"].startswith("<|system|>Be brief.</s><|user|>What is two plus two?</s>")
    assert r["prompt"] == "<|system|>Be brief.</s><|user|>What is two plus two?</s><|assistant|>"


# ---- epochs: a fresh shuffle each pass, read alike by every split and by a resumed run ------

def _read_order(kind: str, size: int, gbs: int, batches: int, first: int, mbs: int,
                dp: int) -> list[int]:
    """In a worker: the samples (by number) global batches first..batches-1 of a run read from
    a new dataset of `size` numbered samples, split into micro-batches of mbs on dp ranks."""
    from megatron_patch.data import sft
    from megatron_patch.data.preference import PreferenceDataset
    from megatron_patch.training.data import microbatches

    sft._epoch_order.cache_clear()  # as in a new process (a resumed run)
    if kind == "sft":  # sample k's first token is k + 1
        dataset = sft.SFTDataset([([k + 1, 0], [0, 1]) for k in range(size)], 4, 0, pack=False,
                                 seed=3)
    else:  # pair k's margin is k
        dataset = PreferenceDataset([(([k + 1, 0], [0, 1]), ([k + 1, 1], [0, 1]), float(k))
                                     for k in range(size)], 4, 0, seed=3)
    order = []
    for b in range(first, batches):
        # The global batch's sample g: micro-batch step g // (mbs * dp), rank (g // mbs) % dp.
        found: dict[int, int] = {}
        for rank in range(dp):
            steps = microbatches(dataset, b * gbs, mbs, gbs // (mbs * dp), rank, dp)
            for m, batch in enumerate(steps):
                numbers = (batch["tokens"][:, 0] - 1 if kind == "sft" else batch["margin"])
                for j, k in enumerate(numbers.tolist()):
                    found[m * mbs * dp + rank * mbs + j] = int(k)
        order += [found[g] for g in range(gbs)]
    return order


@pytest.mark.parametrize("kind", ["sft", "pairs"])
def test_each_epoch_is_a_new_shuffle_whatever_the_split_and_on_resume(kind):
    # 10 samples, 4 a step, 8 steps: 3 epochs and 2 samples; epochs end inside global batches.
    size, gbs, batches = 10, 4, 8
    (whole,) = harness.run(_read_order, 1, kind, size, gbs, batches, 0, gbs, 1)
    epochs = [whole[e * size:(e + 1) * size] for e in range(3)]
    assert all(sorted(e) == list(range(size)) for e in epochs), whole
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2], epochs
    for mbs, dp in ((2, 1), (1, 1), (2, 2), (1, 2), (1, 4)):
        (split,) = harness.run(_read_order, 1, kind, size, gbs, batches, 0, mbs, dp)
        assert split == whole, (mbs, dp, split, whole)
    # Resumed after step 3 (12 samples read: inside epoch 1) from a newly built dataset.
    for mbs, dp in ((gbs, 1), (1, 2)):
        (resumed,) = harness.run(_read_order, 1, kind, size, gbs, batches, 3, mbs, dp)
        assert resumed == whole[3 * gbs:], (mbs, dp, resumed, whole)


def _epoch_losses(load: str, train: str, save: str, exit_at: int | None = None) -> list[float]:
    """In a worker: the step losses of 3 epochs of the 6 records, 2 a step, at learning rate 0
    (each loss then depends on its batch alone), from `load`."""
    from megatron_patch.training.loop import Trainer

    extra = ("--lr-decay-style", "constant", "--save", save,
             *(("--exit-interval", str(exit_at)) if exit_at else ()))
    trainer = Trainer(harness.sft_args(load, train, iters=9, mbs=1, gbs=2, lr=0.0, extra=extra))
    return [s["loss"] for s in trainer.train()]


def test_epochs_train_on_new_batches_and_a_resume_mid_epoch_continues_them(llama_models,
                                                                          tmp_path):
    train = str(tmp_path / "train.jsonl")
    harness.write_sft_records(train)  # 6 records: 3 steps an epoch
    start = os.path.join(llama_models["llama2"], "mcore")
    (straight,) = harness.run(_epoch_losses, 1, start, train, str(tmp_path / "straight"))
    # The weights do not move: a step repeating a batch of the previous epoch repeats its loss.
    assert len(straight) == 9 and straight[3:6] != straight[0:3], straight
    assert straight[6:9] != straight[3:6], straight
    stopped = str(tmp_path / "stopped")
    (first,) = harness.run(_epoch_losses, 1, start, train, stopped, 4)  # inside epoch 1
    (rest,) = harness.run(_epoch_losses, 1, stopped, train, stopped)
    assert first + rest == straight, (first, rest, straight)
