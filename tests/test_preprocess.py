"""JSON lines -> Megatron-Core mmap dataset: megatron_patch/data/preprocess.py and its launcher,
toolkits/pretrain_data_preprocessing/preprocess_data.sh.

Tokenizer training, preprocessing and reading datasets back run in forked workers
(harness.run), in a forked child that the test kills, or in a subprocess (the launcher): the test
process itself runs no torch op and starts no tokenizer thread pool.
"""

import contextlib
import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import harness
import pytest

from megatron_patch.data import preprocess as pp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "toolkits", "pretrain_data_preprocessing", "preprocess_data.sh")

BASE_TEXTS = [
    "今天天气很好",
    "The quick brown fox jumps over the lazy dog.",
    "Megatron-Core 训练大模型 step 12: loss 2.31",
    "混合 mixed 文本 with 标点。",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
]


def _texts() -> list[str]:
    """A few hundred documents of varying length, Chinese, English and mixed."""
    return [" ".join([BASE_TEXTS[i % len(BASE_TEXTS)]] * (1 + i % 4)) + f" #{i}"
            for i in range(300)]


def _write_jsonl(path: str, lines: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def _train_tokenizers(root: str, texts: list[str]) -> None:
    """In a worker: the tiny HF byte-level BPE tokenizer and a small sentencepiece model."""
    import sentencepiece

    from megatron_patch import tiny

    tiny.train_tokenizer(os.path.join(root, "hf_tok"))
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=os.path.join(root, "sp"), vocab_size=300,
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """Two input files (a .jsonl and a .json) holding _texts() in order, plus one empty document,
    one blank line and objects with extra keys; and the two tokenizers."""
    root = str(tmp_path_factory.mktemp("preprocess"))
    texts = _texts()
    lines = [json.dumps({"id": i, "text": t}, ensure_ascii=i % 2 == 0)
             for i, t in enumerate(texts)]
    a = _write_jsonl(os.path.join(root, "part_a.jsonl"),
                     lines[:200] + [json.dumps({"text": ""}), ""])
    b = _write_jsonl(os.path.join(root, "part_b.json"), lines[200:])
    harness.run(_train_tokenizers, 1, root, texts)
    return {"root": root, "texts": texts, "files": [a, b],
            "hf": os.path.join(root, "hf_tok"), "sp": os.path.join(root, "sp.model")}


def _read_dataset(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    # One sequence per document, as Megatron's GPTDataset expects from this tool.
    assert ds.document_indices.tolist() == list(range(len(ds) + 1))
    return [ds[i].tolist() for i in range(len(ds))]


def _file_bytes(summary: dict) -> tuple[bytes, bytes]:
    with open(summary["bin"], "rb") as f, open(summary["idx"], "rb") as g:
        return f.read(), g.read()


def _round_trip_hf(assets: dict, out: str) -> dict:
    """In a worker: preprocess with 1 and 2 workers; the reference tokenization is computed
    independently, one document at a time."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["hf"])
    expected = [tok(t)["input_ids"] + [tok.eos_token_id] for t in assets["texts"]]
    # workers=1 with a comma list; workers=2 with a glob and small batches, so many tasks are in
    # flight and their order matters.
    one = pp.preprocess(",".join(assets["files"]), os.path.join(out, "w1"), assets["hf"],
                        workers=1)
    two = pp.preprocess(os.path.join(assets["root"], "part_*.json*"), os.path.join(out, "w2"),
                        assets["hf"], workers=2, batch_size=7)
    docs = _read_dataset(one["prefix"])
    return {"expected": expected, "eos": tok.eos_token_id, "one": one, "two": two,
            "docs_one": docs, "docs_two": _read_dataset(two["prefix"]),
            "decoded": [tok.decode(d[:-1]) for d in docs],
            "bytes_one": _file_bytes(one), "bytes_two": _file_bytes(two)}


def test_round_trip_hf_tokenizer_1_and_2_workers(assets, tmp_path):
    """Every document comes back as its own tokenization + EOS, in input order, decoding to the
    original text; 1 and 2 workers write byte-identical files; empty and blank lines counted."""
    r = harness.run(_round_trip_hf, 1, assets, str(tmp_path))[0]
    texts = assets["texts"]
    assert r["one"]["prefix"] == os.path.join(str(tmp_path), "w1_text_document")
    assert r["one"]["dtype"] == "uint16"
    assert len(r["docs_one"]) == len(texts), "one dataset document per non-empty input document"
    assert r["docs_one"] == r["expected"], "token ids differ from a per-document tokenization"
    assert all(d[-1] == r["eos"] for d in r["docs_one"]), "EOD missing at a document's end"
    assert r["decoded"] == texts, "decoding the dataset does not give the input texts back"
    assert r["docs_two"] == r["docs_one"]
    assert r["bytes_two"] == r["bytes_one"], ".bin/.idx differ between 1 and 2 workers"
    for s in (r["one"], r["two"]):
        assert (s["documents"], s["files"], s["empty_documents"], s["blank_lines"],
                s["bad_lines"]) == (len(texts), 2, 1, 1, 0), s
        assert s["tokens"] == sum(len(d) for d in r["expected"]), s


def _round_trip_sp(assets: dict, out: str) -> dict:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=assets["sp"])
    expected = [sp.encode(t) + [sp.eos_id()] for t in assets["texts"]]
    summary = pp.preprocess(assets["files"], os.path.join(out, "sp"), assets["sp"], workers=2,
                            batch_size=16)
    return {"expected": expected, "summary": summary, "docs": _read_dataset(summary["prefix"])}


def test_round_trip_sentencepiece_model(assets, tmp_path):
    """A sentencepiece .model file works as the tokenizer: ids per document + EOS, in order."""
    r = harness.run(_round_trip_sp, 1, assets, str(tmp_path))[0]
    assert r["summary"]["documents"] == len(assets["texts"])
    assert r["docs"] == r["expected"], "token ids differ from sentencepiece's own encode + EOS"


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """In a worker: the module's command line; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = pp.main(argv)
    return rc, out.getvalue(), err.getvalue()


def _bad_lines_cli(path: str, out_dir: str, tokenizer: str) -> dict:
    argv = ["--input", path, "--output-prefix", os.path.join(out_dir, "bad"),
            "--tokenizer-model", tokenizer, "--workers", "2", "--batch-size", "3"]
    failed = _cli(argv)
    left_behind = sorted(os.listdir(out_dir))
    skipped = _cli(argv + ["--skip-bad-lines", "--log-interval", "2"])
    api = pp.preprocess(path, os.path.join(out_dir, "api"), tokenizer, skip_bad_lines=True)
    return {"failed": failed, "left_behind": left_behind, "skipped": skipped, "api": api,
            "docs": len(_read_dataset(api["prefix"]))}


def test_bad_lines_fail_with_file_and_line_or_are_skipped(assets, tmp_path):
    """Bad JSON (line 4) and a missing key (line 7): the run fails naming file:line of the first
    and writes nothing; with --skip-bad-lines it succeeds and counts both."""
    good = [json.dumps({"text": t}) for t in assets["texts"][:10]]
    lines = good[:3] + ['{"text": "unterminated'] + good[3:5] + ['{"content": "no text key"}']
    lines += good[5:]
    path = _write_jsonl(str(tmp_path / "bad.jsonl"), lines)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = harness.run(_bad_lines_cli, 1, path, str(out_dir), assets["hf"])[0]

    rc, _, err = r["failed"]
    assert rc == 2, r["failed"]
    assert f"{path}:4: bad JSON" in err, err
    assert r["left_behind"] == [], "a failed run left files behind"

    rc, out, err = r["skipped"]
    assert rc == 0, r["skipped"]
    assert f"skipping {path}:4: bad JSON" in err and f"skipping {path}:7: missing key" in err
    assert "10 docs" in out and "2 bad lines" in out, out
    assert "docs/s" in err and "tokens/s" in err and "MB/s" in err, "no progress line: " + err
    assert (r["api"]["bad_lines"], r["api"]["documents"], r["docs"]) == (2, 10, 10), r["api"]


def _bad_line_reasons(tmp: str, tokenizer: str) -> list[str]:
    messages = []
    for i, line in enumerate(['[1, 2]', '{"text": 5}', b'{"text": "\xff"}', '{"text": null}']):
        path = os.path.join(tmp, f"reason{i}.jsonl")
        with open(path, "wb") as f:
            f.write(b'{"text": "ok"}\n' + (line if isinstance(line, bytes) else line.encode()))
        try:
            pp.preprocess(path, os.path.join(tmp, "out"), tokenizer)
            messages.append("no error")
        except pp.PreprocessError as e:
            messages.append(str(e))
    return messages + [str(sorted(os.listdir(tmp)))]


def test_each_kind_of_bad_line_is_reported(assets, tmp_path):
    """Not an object, a non-string value, invalid UTF-8, null: each names file:2 and why."""
    msgs = harness.run(_bad_line_reasons, 1, str(tmp_path), assets["hf"])[0]
    p = str(tmp_path / "reason")
    assert msgs[0].startswith(f"{p}0.jsonl:2: expected a JSON object, got list"), msgs[0]
    assert msgs[1].startswith(f"{p}1.jsonl:2: 'text' is int, not a string"), msgs[1]
    assert msgs[2].startswith(f"{p}2.jsonl:2: bad JSON"), msgs[2]
    assert msgs[3].startswith(f"{p}3.jsonl:2: 'text' is NoneType, not a string"), msgs[3]
    assert "out" not in msgs[4], "a failed run left output behind: " + msgs[4]


def _tokenizer_without_eos(assets: dict, tmp: str) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["hf"])
    tok.eos_token = None
    tok.save_pretrained(os.path.join(tmp, "no_eos"))
    try:
        pp.preprocess(assets["files"], os.path.join(tmp, "out", "x"), os.path.join(tmp, "no_eos"))
    except pp.PreprocessError as e:
        return str(e)
    return "no error"


def _tokenizer_appending_eos(assets: dict, tmp: str) -> dict:
    """A tokenizer whose post-processor ends every text with EOS itself (tokenizer.json's
    TemplateProcessing `$A </s>`): preprocessing must not add a second one."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["hf"])
    eos = tok.eos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, tok.eos_token_id)])
    path = os.path.join(tmp, "appends_eos")
    tok.save_pretrained(path)
    reloaded = AutoTokenizer.from_pretrained(path)
    expected = [reloaded(t)["input_ids"] for t in assets["texts"]]
    summary = pp.preprocess(assets["files"], os.path.join(tmp, "out", "x"), path)
    return {"expected": expected, "docs": _read_dataset(summary["prefix"]),
            "eos": tok.eos_token_id}


def test_a_tokenizer_that_appends_eos_gets_one_eod_per_document(assets, tmp_path):
    r = harness.run(_tokenizer_appending_eos, 1, assets, str(tmp_path))[0]
    assert all(ids[-1] == r["eos"] != ids[-2] for ids in r["expected"])  # the tokenizer's own
    assert r["docs"] == r["expected"], "EOD doubled or lost"


def test_append_eod_needs_an_eos_token(assets, tmp_path):
    msg = harness.run(_tokenizer_without_eos, 1, assets, str(tmp_path))[0]
    assert "has no EOS token" in msg and "--no-append-eod" in msg, msg
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def _failing_writes(assets: dict, out: str) -> dict:
    """In a worker (the monkeypatching stays in this process): make the writer fail mid-way, and
    while writing the index."""
    from megatron.core.datasets import indexed_dataset

    result = {}
    add_document = indexed_dataset.IndexedDatasetBuilder.add_document
    calls = []

    def failing_add_document(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 100:
            raise RuntimeError("simulated failure mid-way")
        return add_document(self, *args, **kwargs)

    def failing_index_write(self, *args, **kwargs):
        self.idx_writer.write(b"partial")
        raise RuntimeError("simulated failure while writing the index")

    fresh = os.path.join(out, "fresh")
    indexed_dataset.IndexedDatasetBuilder.add_document = failing_add_document
    try:
        pp.preprocess(assets["files"], fresh, assets["hf"], workers=2, batch_size=10)
    except RuntimeError as e:
        result["mid_way"] = str(e)
    indexed_dataset.IndexedDatasetBuilder.add_document = add_document
    result["after_mid_way"] = sorted(os.listdir(out))

    # A complete dataset from an earlier run stays as it was when a rerun fails.
    old = pp.preprocess(assets["files"][:1], os.path.join(out, "rerun"), assets["hf"])
    result["old"] = _file_bytes(old)
    indexed_dataset._IndexWriter.write = failing_index_write
    try:
        pp.preprocess(assets["files"], os.path.join(out, "rerun"), assets["hf"])
    except RuntimeError as e:
        result["in_index"] = str(e)
    result["after_in_index"] = sorted(os.listdir(out))
    result["now"] = _file_bytes(old)
    return result


def test_failed_write_leaves_no_dataset(assets, tmp_path):
    """A failure while writing tokens, or while writing the index, leaves nothing under the final
    names (and no temporaries); an older complete dataset under those names is untouched."""
    r = harness.run(_failing_writes, 1, assets, str(tmp_path))[0]
    assert r["mid_way"] == "simulated failure mid-way"
    assert r["after_mid_way"] == [], r["after_mid_way"]
    assert r["in_index"] == "simulated failure while writing the index"
    assert r["after_in_index"] == ["rerun_text_document.bin", "rerun_text_document.idx"]
    assert r["now"] == r["old"], "the failed rerun changed the earlier dataset"


def _big_input(path: str, lines: int) -> str:
    text = " ".join(BASE_TEXTS)
    return _write_jsonl(path, [json.dumps({"text": f"{text} {i}"}) for i in range(lines)])


def _run_main(argv: list[str], log: str) -> None:
    sys.stderr = open(log, "w", buffering=1)  # noqa: SIM115 (the child exits, closing it)
    sys.exit(pp.main(argv))


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_interrupted_run_leaves_no_dataset(assets, tmp_path, how):
    """A run killed mid-way (SIGKILL: no cleanup possible) leaves no .bin or .idx under the final
    names; SIGTERM stops it at the next task (long before the end), removing its temporaries,
    exit status 128 + 15."""
    lines = 100_000
    path = _big_input(str(tmp_path / "big.jsonl"), lines)
    out_dir = tmp_path / "out"
    log = str(tmp_path / "stderr.txt")
    argv = ["--input", path, "--output-prefix", str(out_dir / "big"), "--tokenizer-model",
            assets["hf"], "--workers", "2", "--batch-size", "500", "--log-interval", "500"]
    # A forked child of the test process: megatron and transformers are already imported, so
    # it is writing within a second, where a fresh interpreter would take several.
    child = mp.get_context("fork").Process(target=_run_main, args=(argv, log))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.is_alive():
            tmp = [f for f in os.listdir(out_dir)] if out_dir.exists() else []
            if any(".bin.tmp-" in f and os.path.getsize(out_dir / f) > 0 for f in tmp):
                break
            time.sleep(0.01)
        assert child.is_alive(), "the run ended before it could be interrupted"
        if how == "SIGKILL":
            child.kill()
        else:
            child.terminate()
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
    left = sorted(os.listdir(out_dir))
    assert "big_text_document.bin" not in left and "big_text_document.idx" not in left, left
    if how == "SIGKILL":
        assert child.exitcode == -9
        assert any(".tmp-" in f for f in left), "expected the killed run's temporaries"
    else:
        with open(log) as f:
            err = f.read()
        assert child.exitcode == 143, (child.exitcode, err)
        assert left == [], f"SIGTERM left temporaries behind: {left}"
        assert "stopped by SIGTERM; nothing written" in err, err
        done = [int(line.split()[1]) for line in err.splitlines() if " docs, " in line]
        assert done and done[-1] < lines // 2, f"did not stop at the next task: {done[-3:]}"


def test_launcher_usage_on_wrong_argument_count(tmp_path):
    r = subprocess.run(["bash", LAUNCHER, "only-input"], cwd=str(tmp_path), capture_output=True,
                       text=True, check=False, timeout=60)
    assert r.returncode == 2, r
    assert "usage:" in r.stderr and "OUTPUT_PREFIX TOKENIZER" in r.stderr


def test_launcher_writes_a_dataset(assets, tmp_path):
    """preprocess_data.sh INPUT OUTPUT_PREFIX TOKENIZER WORKERS JSON_KEY, in a fresh interpreter
    without megatron-patch on PYTHONPATH: the launcher provides it."""
    env = dict(os.environ, PYTHON=sys.executable, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    inputs = ",".join(assets["files"])
    prefix = str(tmp_path / "launched")
    r = subprocess.run(["bash", LAUNCHER, inputs, prefix, assets["hf"], "2", "text"],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, check=False,
                       timeout=300)
    assert r.returncode == 0, r
    assert f"wrote {prefix}_text_document.bin/.idx" in r.stdout, r.stdout
    docs = harness.run(_read_dataset, 1, prefix + "_text_document")[0]
    assert len(docs) == len(assets["texts"])
