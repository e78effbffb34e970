"""Preference data (reward models, DPO): TRL's record shapes, masks, truncation, bad records."""

import json
import os

import harness
import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

STRING_PAIRS = [
    {"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green, I think."},
    {"prompt": "What is two plus two?", "chosen": "4", "rejected": "5", "margin": 1.5},
]
USER = {"role": "user", "content": "What colour is the sky?"}
EXPLICIT = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Green."}]}
# Implicit prompt with an earlier assistant turn: only the last turn is the completion.
IMPLICIT = {
    "chosen": [USER, {"role": "assistant", "content": "Blue."},
               {"role": "user", "content": "And at night?"},
               {"role": "assistant", "content": "Black."}],
    "rejected": [USER, {"role": "assistant", "content": "Blue."},
                 {"role": "user", "content": "And at night?"},
                 {"role": "assistant", "content": "Blue."}],
}


def _write(path: str, records: list) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def _tokenizer(model_root: str, kind: str):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(model_root, "hf"))
    if kind == "pad_is_eos":
        tok.pad_token = tok.eos_token
    elif kind == "chatml":  # special tokens added after the BPE vocabulary, used by the template
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
    return tok


def _items(model_root: str, tmp: str) -> dict:
    """In a worker: every case's items, decoded into what a reader can check."""
    from megatron_patch import cpu_mode
    from megatron_patch.data.preference import build_preference_dataset
    from megatron_patch.training.data import microbatches

    def describe(tok, dataset) -> list[dict]:
        out = []
        for pair in dataset.pairs:
            item = dataset.build(pair)
            d = {"margin": item["margin"].item()}
            for side in ("chosen", "rejected"):
                tokens, mask = item[f"{side}_tokens"], item[f"{side}_loss_mask"]
                length = int(item[f"{side}_length"])
                # Position t is trained on token t+1 (labels are the tokens shifted by one).
                labels = tokens[1:][mask[:-1] == 1]
                d[side] = {"text": tok.decode(tokens[:length]), "trained": tok.decode(labels),
                           "length": length, "shape": list(tokens.shape),
                           "mask_shape": list(mask.shape), "last": int(tokens[length - 1]),
                           "padding": sorted(set(tokens[length:].tolist())),
                           "mask_after_end": float(mask[length - 1:].sum())}
            out.append(d)
        return out

    report = {}
    for kind, records in (("plain", STRING_PAIRS), ("pad_is_eos", STRING_PAIRS),
                          ("chatml", STRING_PAIRS + [EXPLICIT, IMPLICIT]),
                          ("plain_messages", [EXPLICIT, IMPLICIT])):
        tok = _tokenizer(model_root, "plain" if kind == "plain_messages" else kind)
        path = _write(os.path.join(tmp, f"{kind}.jsonl"), records)
        dataset, summary = build_preference_dataset(path, tok, 128)
        report[kind] = {"items": describe(tok, dataset), "eos": tok.eos_token_id,
                        "pad": tok.pad_token_id, "summary": summary.line(path)}
    # Batches as the training loop collates them.
    tok = _tokenizer(model_root, "plain")
    dataset, _ = build_preference_dataset(os.path.join(tmp, "plain.jsonl"), tok, 128)
    (batch,) = microbatches(dataset, 0, 2, 1, 0, 1)
    report["batch"] = {k: [list(v.shape), str(v.dtype), str(v.device)] for k, v in batch.items()}
    report["device"] = str(cpu_mode.device())

    # Long pairs: truncated on the response side, or skipped.
    long_pairs = [{"prompt": "Hi", "chosen": "fox " * 60, "rejected": "dog."},
                  {"prompt": "word " * 80, "chosen": "a", "rejected": "b"},
                  STRING_PAIRS[0]]
    path = _write(os.path.join(tmp, "long.jsonl"), long_pairs)
    dataset, summary = build_preference_dataset(path, tok, 64)
    report["truncated"] = {"summary": summary.line(path), "pairs": len(dataset),
                           "items": describe(tok, dataset)}
    dataset, summary = build_preference_dataset(path, tok, 64, skip_long=True)
    report["skipped"] = {"summary": summary.line(path), "pairs": len(dataset)}
    return report


@pytest.fixture(scope="module")
def items(llama_models, tmp_path_factory) -> dict:
    (r,) = harness.run(_items, 1, llama_models["llama2"], str(tmp_path_factory.mktemp("pref")))
    return r


def test_string_pairs_render_the_alpaca_prompt_and_train_the_response(items):
    from megatron_patch.data.sft import ALPACA_PROMPT

    first, second = items["plain"]["items"]
    prompt = ALPACA_PROMPT.format(instruction="What colour is the sky?")
    assert first["chosen"]["text"] == prompt + "Blue.</s>", first
    assert first["rejected"]["text"] == prompt + "Green, I think.</s>", first
    assert first["chosen"]["trained"] == "Blue.</s>", first
    assert first["rejected"]["trained"] == "Green, I think.</s>", first
    assert (first["margin"], second["margin"]) == (0.0, 1.5)
    for side in ("chosen", "rejected"):
        assert first[side]["shape"] == first[side]["mask_shape"] == [128]
        assert first[side]["last"] == items["plain"]["eos"]
        assert first[side]["padding"] == [items["plain"]["pad"]]
        assert first[side]["mask_after_end"] == 0.0
    assert items["plain"]["summary"].endswith(
        ": 2 pairs; truncated 0, skipped as too long 0, identical chosen/rejected skipped 0, "
        "identical once tokenized and truncated skipped 0, bad records skipped 0"
    ), items["plain"]["summary"]


def test_pad_equal_to_eos_keeps_the_real_end_of_sequence(items):
    r = items["pad_is_eos"]
    assert r["pad"] == r["eos"]
    for item, plain in zip(r["items"], items["plain"]["items"], strict=True):
        for side in ("chosen", "rejected"):
            # The length, not the first pad id, says where the sequence ends.
            assert item[side]["length"] == plain[side]["length"]
            assert item[side]["trained"] == plain[side]["trained"]
            assert item[side]["last"] == r["eos"] and item[side]["padding"] == [r["eos"]]


def test_chat_template_with_added_special_tokens(items):
    string_pair, _, explicit, implicit = items["chatml"]["items"]
    head = "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n<|im_start|>assistant\n"
    assert string_pair["chosen"]["text"] == head + "Blue.<|im_end|>\n", string_pair
    assert string_pair["chosen"]["trained"] == "Blue.<|im_end|>\n", string_pair
    assert explicit["chosen"]["text"] == head + "Blue.<|im_end|>\n", explicit
    assert explicit["rejected"]["trained"] == "Green.<|im_end|>\n", explicit
    # The earlier assistant turn belongs to the shared prompt: not trained.
    assert implicit["chosen"]["trained"] == "Black.<|im_end|>\n", implicit
    assert implicit["rejected"]["trained"] == "Blue.<|im_end|>\n", implicit
    assert implicit["chosen"]["text"].startswith(head + "Blue.<|im_end|>\n<|im_start|>user\n")


def test_messages_without_a_chat_template_use_role_blocks(items):
    explicit, implicit = items["plain_messages"]["items"]
    assert explicit["chosen"]["text"] == (
        "### User:\nWhat colour is the sky?\n\n### Assistant:\nBlue.</s>"), explicit
    assert explicit["chosen"]["trained"] == "Blue.</s>"
    assert implicit["chosen"]["trained"] == "Black.</s>", implicit
    assert implicit["rejected"]["trained"] == "Blue.</s>", implicit


def test_pairs_collate_into_training_microbatches(items):
    device = items["device"]
    assert items["batch"] == {
        "chosen_tokens": [[2, 128], "torch.int64", device],
        "rejected_tokens": [[2, 128], "torch.int64", device],
        "chosen_loss_mask": [[2, 128], "torch.float32", device],
        "rejected_loss_mask": [[2, 128], "torch.float32", device],
        "chosen_length": [[2], "torch.int64", device],
        "rejected_length": [[2], "torch.int64", device],
        "margin": [[2], "torch.float32", device],
    }


def test_long_pairs_are_cut_on_the_response_side_or_skipped(items):
    r = items["truncated"]
    # The long-chosen pair is cut to 64 tokens (prompt whole); the long-prompt pair leaves no
    # response and is dropped.
    assert r["pairs"] == 2 and "2 pairs; truncated 1, skipped as too long 1" in r["summary"], r
    cut = r["items"][0]
    assert cut["chosen"]["length"] == 64 and cut["chosen"]["text"].endswith("fox fox")
    assert cut["chosen"]["trained"].startswith("fox fox") and "</s>" not in cut["chosen"]["text"]
    assert cut["rejected"]["trained"] == "dog.</s>"
    assert "1 pairs; truncated 0, skipped as too long 2" in items["skipped"]["summary"]


def _read(path: str, **kwargs):
    import transformers

    from megatron_patch.data.preference import build_preference_dataset

    tok = transformers.AutoTokenizer.from_pretrained(kwargs.pop("tokenizer"))
    try:
        dataset, summary = build_preference_dataset(path, tok, 64, **kwargs)
    except ValueError as e:
        return "error: " + str(e)
    return summary.line(path)


BAD = [
    ({"prompt": "q", "chosen": "a"}, "missing 'rejected'"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"chosen": "a", "rejected": "b"}, "need a string 'prompt'"),
    ({"prompt": "q", "chosen": "a", "rejected": ["b"]}, "both be strings or both be lists"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be"),
    ({"chosen": [USER, {"role": "assistant", "content": ""}],
      "rejected": [USER, {"role": "assistant", "content": "b"}]}, "'chosen' is empty"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [USER, {"role": "assistant", "content": "b"}]}, "share no prompt"),
    ({"prompt": [USER], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "'chosen' must continue the prompt"),
    ({"prompt": [USER], "chosen": [{"role": "robot", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "'chosen': message 1"),
]


def _bad_inputs(model_root: str, tmp: str) -> dict:
    tokenizer = os.path.join(model_root, "hf")
    good = STRING_PAIRS[0]
    out = {"cases": []}
    for k, (record, _) in enumerate(BAD):
        path = _write(os.path.join(tmp, f"bad{k}.jsonl"), [good, record])
        out["cases"].append([path, _read(path, tokenizer=tokenizer)])
    mixed = _write(os.path.join(tmp, "mixed.jsonl"),
                   [good, "{not json", BAD[1][0], {"prompt": "q", "chosen": "same",
                                                   "rejected": "same"}])
    out["skipped"] = _read(mixed, tokenizer=tokenizer, skip_bad=True)
    out["not_skipped"] = _read(mixed, tokenizer=tokenizer)
    only_identical = _write(os.path.join(tmp, "identical.json"), [])
    with open(only_identical, "w") as f:
        json.dump([{"prompt": "q", "chosen": "same", "rejected": "same"}], f)
    out["only_identical"] = [only_identical, _read(only_identical, tokenizer=tokenizer)]
    return out


def test_bad_records_name_file_and_line(llama_models, tmp_path):
    (r,) = harness.run(_bad_inputs, 1, llama_models["llama2"], str(tmp_path))
    for (path, message), (_, expected) in zip(r["cases"], BAD, strict=True):
        assert message.startswith(f"error: {path}:2: ") and expected in message, (message,
                                                                                   expected)
    assert r["not_skipped"].startswith(f"error: {tmp_path}/mixed.jsonl:2: invalid JSON")
    assert r["skipped"].endswith(
        "1 pairs; truncated 0, skipped as too long 0, identical chosen/rejected skipped 1, "
        "identical once tokenized and truncated skipped 0, "
        f"bad records skipped 2 (identical: {tmp_path}/mixed.jsonl:4)"), r["skipped"]
    path, message = r["only_identical"]
    assert message.startswith(f"error: {path}: no usable preference pairs") and (
        f"(identical: {path}: record 1)" in message), message


# ---- --prompt-format raw: TRL's standard (string) format, TRL's own preprocessing as the oracle

def _trl_sequences(records: list[dict], tok) -> dict:
    """What TRL 1.16's DPOTrainer and RewardTrainer make of the records (their _prepare_dataset,
    with no max_length): DPO's prompt ids + each side's completion ids, and the RM's sequences."""
    import types

    from datasets import Dataset
    from trl import DPOTrainer, RewardTrainer

    dpo = DPOTrainer._prepare_dataset(
        types.SimpleNamespace(_tokenizer=tok), Dataset.from_list(records), tok,
        types.SimpleNamespace(dataset_num_proc=None, max_length=None,
                              truncation_mode="keep_start"), "train")
    rm = RewardTrainer._prepare_dataset(
        None, Dataset.from_list(records), tok,
        types.SimpleNamespace(dataset_num_proc=None, max_length=None), "train")
    return {"dpo": [{side: (row["prompt_ids"] + row[f"{side}_ids"],
                            [0] * len(row["prompt_ids"]) + [1] * len(row[f"{side}_ids"]))
                     for side in ("chosen", "rejected")} for row in dpo],
            "rm": [{side: row[f"{side}_ids"] for side in ("chosen", "rejected")} for row in rm]}


def _raw_vs_trl(model_root: str, tmp: str) -> dict:
    """Per tokenizer and record set: our pairs (ids, response mask) and TRL's."""
    from megatron_patch.data.preference import build_preference_dataset

    out = {}
    for kind in ("plain", "chatml"):
        tok = _tokenizer(model_root, kind)
        # Beyond the plain pairs: a prompt ending in a space (the tokens merge across the
        # boundary), and a side that already ends with the EOS text (TRL adds none).
        strings = STRING_PAIRS + [
            {"prompt": "Q: What is two plus two?\nA: ", "chosen": "4", "rejected": "five"},
            {"prompt": "Say hi.", "chosen": " hi" + tok.eos_token, "rejected": " bye"}]
        cases = {"strings": strings}
        if kind == "chatml":  # message lists keep the chat template, in any format
            cases.update(explicit=[EXPLICIT], implicit=[IMPLICIT])
        for name, records in cases.items():
            path = _write(os.path.join(tmp, f"raw-{kind}-{name}.jsonl"), records)
            for prompt_format in ("raw", "auto"):
                dataset, _ = build_preference_dataset(path, tok, 128, prompt_format=prompt_format)
                out[f"{kind} {name} {prompt_format}"] = [
                    {"chosen": pair[0], "rejected": pair[1]} for pair in dataset.pairs]
            out[f"{kind} {name} trl"] = _trl_sequences(records, tok)
    return out


def test_raw_prompt_format_tokenizes_string_pairs_as_trl(llama_models, tmp_path):
    (r,) = harness.run(_raw_vs_trl, 1, llama_models["llama2"], str(tmp_path))
    for kind in ("plain", "chatml"):
        trl = r[f"{kind} strings trl"]
        ours = r[f"{kind} strings raw"]
        assert len(ours) == len(trl["dpo"]) == len(trl["rm"]) == 4
        for pair, dpo, rm in zip(ours, trl["dpo"], trl["rm"], strict=True):
            for side in ("chosen", "rejected"):
                ids, mask = pair[side]
                assert list(ids) == rm[side], (kind, side, ids, rm[side])
                # DPO: the same sequence, and the response where TRL's completion starts.
                assert (list(ids), list(mask)) == tuple(dpo[side]), (kind, side)
        # The default (auto: SFT's rendering of an instruction) is not TRL's string rule.
        assert all(a["chosen"][0] != b["chosen"][0]
                   for a, b in zip(r[f"{kind} strings auto"], ours, strict=True)), kind
    for name in ("explicit", "implicit"):
        trl = r[f"chatml {name} trl"]
        for prompt_format in ("raw", "auto"):
            (pair,) = r[f"chatml {name} {prompt_format}"]
            for side in ("chosen", "rejected"):
                assert list(pair[side][0]) == trl["rm"][0][side], (name, prompt_format, side)
                assert (list(pair[side][0]), list(pair[side][1])) == tuple(trl["dpo"][0][side])


def _dpo_trainer_pairs(model_root: str, train: str, prompt_format: str) -> dict:
    """The training pairs of a DPO trainer built from `megatron-patch train` flags, and the
    pairs build_preference_dataset makes of the file with that --prompt-format."""
    import transformers

    from megatron_patch.data.preference import build_preference_dataset
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.loop import Trainer

    load = os.path.join(model_root, "mcore")
    trainer = Trainer(parse_args([
        "--train-mode", "dpo", "--load", load, "--train-data-path", train, "--seq-length", "64",
        "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1",
        "--prompt-format", prompt_format]))
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(model_root, "hf"))
    expected, _ = build_preference_dataset(train, tok, 64, prompt_format=prompt_format)
    return {"trainer": trainer.datasets[0].pairs, "expected": expected.pairs}


def test_prompt_format_flag_reaches_the_training_pairs(llama_models, tmp_path):
    train = _write(str(tmp_path / "train.jsonl"), STRING_PAIRS)
    (raw,) = harness.run(_dpo_trainer_pairs, 1, llama_models["llama2"], train, "raw")
    (chat,) = harness.run(_dpo_trainer_pairs, 1, llama_models["llama2"], train, "chat")
    assert raw["trainer"] == raw["expected"] and chat["trainer"] == chat["expected"]
    assert raw["trainer"] != chat["trainer"]
