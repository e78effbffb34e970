"""Bad input of every kind ends in one line, `megatron-patch <command>: error: ...`, naming the
file (with line), tensor or flag, with a non-zero exit code, and changes nothing that existed.

The `megatron-patch` command lines run in one forked worker (tests/harness.py), each through
`cli.main` with its stderr captured; disk full and read-only outputs are simulated there by
making the system calls fail (ENOSPC, EROFS), which works without root or a tmpfs mount.
Under torchrun, a fake worker (no megatron import, so the launch is cheap) checks that one
line is printed, that it is the failing rank's own when rank 0 failed only because another rank
did, and that MEGATRON_PATCH_DEBUG=1 brings the tracebacks back.
"""

import argparse
import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import harness
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_hash(path: str) -> str:
    """sha256 over every file name and content under path (or of the file)."""
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, files in os.walk(path) for f in files)
    for p in paths:
        h.update(os.path.relpath(p, path).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def assert_one_line(stderr: str, command: str, *needles: str) -> str:
    """The error is one line, `megatron-patch <command>: error: ...`, containing each needle;
    no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if ": error:" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"megatron-patch {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The cases. Each: name, category, argv (with {placeholders}), the command, the needles its
# line must name, files that must not change, and a simulated failure (see _simulate).


def _cases() -> list[dict]:
    gen = ["generate", "--load", "{mcore}", "--input-file", "{prompts}", "--output-file",
           "{out}/gen.jsonl"]
    train = ["train", "--load", "{mcore}", "--train-iters", "1"]
    # Valid up to --save: refused before the first iteration, not at the first save after it.
    train_data = [*train, "--seq-length", "8", "--micro-batch-size", "1", "--data-path",
                  "{tokens}", "--split", "90,10,0", "--save-interval", "1"]
    cases = [
        # invalid flags
        ("train_tp_0", "flags", [*train, "--seq-length", "8", "--tensor-model-parallel-size",
                                 "0"], ["--tensor-model-parallel-size", "got 0"]),
        ("train_micro_batch_size_0", "flags", [*train, "--seq-length", "8",
                                               "--micro-batch-size", "0"],
         ["--micro-batch-size", "got 0"]),
        ("train_seq_length_0", "flags", [*train, "--seq-length", "0"], ["--seq-length", "got 0"]),
        ("train_split_0_0_0", "flags", [*train, "--seq-length", "8", "--split", "0,0,0"],
         ["--split 0,0,0"]),
        ("train_unknown_flag", "flags", [*train, "--seq-length", "8", "--no-such-flag"],
         ["--no-such-flag"]),
        # issue 28, 7: a LoRA flag that has nothing to apply to is refused, not dropped
        ("train_lora_targets_without_lora", "flags",
         [*train, "--seq-length", "8", "--lora-target-modules", "q_proj"],
         ["--lora-target-modules", "LoRA is off"]),
        ("convert_lora_base_name_without_lora", "flags",
         ["convert", "megatron-to-hf", "{mcore}", "{out}/nl", "--lora-base-model-name-or-path",
          "{hf}"], ["--lora-base-model-name-or-path", "only the PEFT adapter"]),
        ("convert_tp_0", "flags", ["convert", "hf-to-megatron", "{hf}", "{out}/m",
                                   "--tensor-model-parallel-size", "0"],
         ["--tensor-model-parallel-size", "got 0"]),
        ("convert_flag_of_another_direction", "flags",
         ["convert", "hf-to-megatron", "{hf}", "{out}/m", "--merge-lora"],
         ["unrecognized arguments: --merge-lora"]),
        ("generate_repetition_penalty_0", "flags", [*gen, "--repetition-penalty", "0"],
         ["--repetition-penalty", "got 0"]),
        ("generate_repetition_penalty_negative", "flags", [*gen, "--repetition-penalty", "-1"],
         ["--repetition-penalty", "got -1"]),
        ("generate_top_p_above_1", "flags", [*gen, "--top-p", "1.5"], ["--top-p", "got 1.5"]),
        ("generate_top_p_negative", "flags", [*gen, "--top-p", "-0.1"], ["--top-p", "got -0.1"]),
        ("generate_max_input_length_negative", "flags", [*gen, "--max-input-length", "-3"],
         ["--max-input-length", "got -3"]),
        ("generate_micro_batch_size_0", "flags", [*gen, "--micro-batch-size", "0"],
         ["--micro-batch-size", "got 0"]),
        # a --load or source directory that is not there: named, not a file inside it
        ("train_load_missing", "flags", [*train[:2], "{out}/no_such_ckpt", *train[3:],
                                         "--seq-length", "8"],
         ["--load {out}/no_such_ckpt: no such directory"]),
        ("generate_load_missing", "flags", [*gen[:2], "{out}/no_such_ckpt", *gen[3:]],
         ["--load {out}/no_such_ckpt: no such directory"]),
        ("generate_tokenizer_missing", "flags", [*gen, "--tokenizer-model", "{out}/no_tok"],
         ["--tokenizer-model {out}/no_tok: no such directory"]),
        ("convert_source_missing", "files", ["convert", "megatron-to-hf", "{out}/no_such_ckpt",
                                             "{out}/x"],
         ["{out}/no_such_ckpt: no such checkpoint directory"]),
        ("verify_tp_0", "flags", ["verify", "{hf}", "{mcore}", "--tp", "0"], ["--tp", "got 0"]),
        ("preprocess_workers_0", "flags", ["preprocess", "--input", "{corpus}",
                                           "--output-prefix", "{out}/p", "--tokenizer-model",
                                           "{hf}", "--workers", "0"], ["workers"]),
        # bad records
        ("generate_empty_messages", "records",
         [*gen[:4], "{prompts_empty_messages}", *gen[5:]], ["prompts_empty_messages.jsonl:2"]),
        ("generate_message_without_content", "records",
         [*gen[:4], "{prompts_no_content}", *gen[5:]], ["prompts_no_content.jsonl:2", "content"]),
        ("generate_unknown_role", "records", [*gen[:4], "{prompts_bad_role}", *gen[5:]],
         ["prompts_bad_role.jsonl:1", "role"]),
        ("preprocess_lone_surrogate", "records",
         ["preprocess", "--input", "{corpus_surrogate}", "--output-prefix", "{out}/s",
          "--tokenizer-model", "{hf}"], ["corpus_surrogate.jsonl:2", "surrogate",
                                         "--skip-bad-lines"]),
        ("preprocess_invalid_json", "records",
         ["preprocess", "--input", "{corpus_bad_json}", "--output-prefix", "{out}/j",
          "--tokenizer-model", "{hf}"], ["corpus_bad_json.jsonl:3"]),
        # truncated or corrupt files
        ("safetensors_truncated", "files", ["convert", "hf-to-megatron", "{hf_truncated}",
                                            "{out}/t"], ["hf_truncated/model.safetensors"]),
        ("safetensors_corrupt_header", "files", ["convert", "hf-to-megatron", "{hf_garbage}",
                                                 "{out}/g"], ["hf_garbage/model.safetensors"]),
        ("distcp_truncated", "files", ["convert", "megatron-to-hf", "{mcore_truncated}",
                                       "{out}/d"], ["release/__0_0.distcp", "truncated"]),
        ("distcp_truncated_generate", "files",
         [*gen[:2], "{mcore_truncated}", *gen[3:]], ["release/__0_0.distcp", "truncated"]),
        ("metadata_names_outside_file", "files",
         ["convert", "megatron-to-hf", "{mcore_outside}", "{out}/mo"],
         ["mcore_outside/release/.metadata", "'../../outside.distcp'"]),
        ("metadata_names_outside_file_generate", "files",
         [*gen[:2], "{mcore_outside}", *gen[3:]],
         ["mcore_outside/release/.metadata", "'../../outside.distcp'"]),
        ("metadata_dtype_tampered", "files",
         ["convert", "megatron-to-hf", "{mcore_dtype}", "{out}/md"],
         ["mcore_dtype/release/.metadata", "decoder.layers.mlp.linear_fc2.weight",
          "torch.float16", "torch.float32"]),
        ("safetensors_nan", "files", ["convert", "hf-to-megatron", "{hf_nan}", "{out}/n"],
         ["hf_nan/model.safetensors", "model.layers.1.mlp.up_proj.weight", "nan"]),
        ("safetensors_inf", "files", ["convert", "hf-to-megatron", "{hf_inf}", "{out}/i"],
         ["hf_inf/model.safetensors", "model.embed_tokens.weight", "-inf"]),
        ("common_pt_missing", "files", ["convert", "megatron-to-hf", "{mcore_no_common}",
                                        "{out}/nc"], ["mcore_no_common/release/common.pt",
                                                      "missing"]),
        ("common_pt_missing_generate", "files", [*gen[:2], "{mcore_no_common}", *gen[3:]],
         ["mcore_no_common/release/common.pt", "missing"]),
        ("convert_iteration_not_a_number", "flags",
         ["convert", "megatron-to-hf", "{mcore}", "{out}/it", "--iteration", "abc"],
         ["--iteration", "'abc'"]),
        ("generate_txt_invalid_utf8", "records",
         [*gen[:4], "{prompts_bad_utf8}", *gen[5:]], ["prompts_bad_utf8.txt:2", "invalid UTF-8"]),
        ("generate_output_is_input", "records", [*gen[:4], "{prompts}", "--output-file",
                                                  "{prompts}"],
         ["--output-file {prompts} is the --input-file"]),
        ("generate_output_dir_missing", "disk", [*gen[:4], "{prompts}", "--output-file",
                                                 "{out}/no_dir/gen.jsonl"],
         ["--output-file {out}/no_dir/gen.jsonl", "{out}/no_dir does not exist"]),
        # wrong configs
        ("config_json_malformed", "configs", ["convert", "hf-to-megatron", "{hf_bad_config}",
                                              "{out}/c"], ["hf_bad_config/config.json:2"]),
        ("checkpoint_meta_malformed", "configs", ["convert", "megatron-to-hf", "{mcore_bad_meta}",
                                                  "{out}/bm"], ["megatron_patch.json:1"]),
        ("rope_type_unsupported", "configs", ["convert", "hf-to-megatron", "{hf_yarn}",
                                              "{out}/y"], ["rope_parameters", "'yarn'"]),
        # disk full, read-only output, pre-existing output
        ("disk_full", "disk", ["convert", "megatron-to-hf", "{mcore}", "{out}/full"],
         ["{out}/full", "No space left on device"]),
        ("read_only_output", "disk", ["convert", "hf-to-megatron", "{hf}", "{out}/ro"],
         ["{out}/ro", "Read-only file system"]),
        ("existing_output", "disk", ["convert", "megatron-to-hf", "{mcore}", "{existing}"],
         ["{existing}"]),
        ("train_save_is_a_file", "disk", [*train_data, "--save", "{existing}/keep.txt"],
         ["--save {existing}/keep.txt is a file"]),
        ("train_save_read_only", "disk", [*train_data, "--save", "{out}/ro_save"],
         ["{out}/ro_save", "--save cannot be written", "Read-only file system"]),
        ("make_tiny_existing_output", "disk", ["make-tiny", "{existing}"], ["{existing}"]),
        ("make_tiny_existing_demo_data", "disk",
         ["make-tiny", "{out}/tiny", "--demo-data", "{existing}"], ["{existing}"]),
    ]
    return [dict(name=n, category=c, argv=a, needles=k) for n, c, a, k in cases]


CASES = _cases()
SIMULATE = {"disk_full": errno.ENOSPC, "read_only_output": errno.EROFS,
            "train_save_read_only": errno.EROFS}


@contextlib.contextmanager
def _simulate(name: str, out: str):
    """Make writes under `out` fail as on a full (ENOSPC) or read-only (EROFS) file system."""
    if name not in SIMULATE:
        yield
        return
    code = SIMULATE[name]
    real = {f: getattr(os, f) for f in ("open", "mkdir", "write", "pwrite")}

    def failing_open(path, flags, *args, **kwargs):
        if str(path).startswith(out) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code), str(path))
        return real["open"](path, flags, *args, **kwargs)

    def failing_mkdir(path, *args, **kwargs):
        if code == errno.EROFS and str(path).startswith(out):
            raise OSError(code, os.strerror(code), str(path))
        return real["mkdir"](path, *args, **kwargs)

    def no_space(fd, data, *args):
        raise OSError(code, os.strerror(code))  # as the kernel reports it: no file name

    patched = {"mkdir": failing_mkdir}
    patched.update({"open": failing_open} if code == errno.EROFS
                   else {"write": no_space, "pwrite": no_space})
    try:
        for f, fn in patched.items():
            setattr(os, f, fn)
        yield
    finally:
        for f, fn in real.items():
            setattr(os, f, fn)


def _run_cases(cases: list[dict], out: str) -> dict[str, tuple[int, str]]:
    """In a forked worker: each case through cli.main, stderr captured."""
    from megatron_patch import cli

    results = {}
    for case in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            with _simulate(case["name"], out):
                try:
                    rc = cli.main(case["argv"])
                except SystemExit as e:  # argparse
                    rc = e.code
        results[case["name"]] = (rc, err.getvalue())
    return results


def _write(path: str, text: str | bytes) -> str:
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return path


def _inputs(tmp: str, hf: str, mcore: str) -> dict[str, str]:
    """The broken inputs, each a copy of the tiny model or a small file."""
    p = {"hf": hf, "mcore": mcore, "out": os.path.join(tmp, "out")}
    os.makedirs(p["out"])
    lines = {"prompts": ['{"prompt": "hi"}'],
             "prompts_empty_messages": ['{"prompt": "hi"}', '{"messages": []}'],
             "prompts_no_content": ['{"prompt": "hi"}', '{"messages": [{"role": "user"}]}'],
             "prompts_bad_role": ['{"messages": [{"role": "robot", "content": "hi"}]}'],
             "corpus": ['{"text": "hello"}'],
             "corpus_surrogate": ['{"text": "hello"}', '{"text": "bad \\ud800 text"}'],
             "corpus_bad_json": ['{"text": "a"}', '', '{"text": "b"']}
    for name, body in lines.items():
        p[name] = _write(os.path.join(tmp, name + ".jsonl"), "\n".join(body) + "\n")

    def copy(src: str, name: str) -> str:
        p[name] = os.path.join(tmp, name)
        shutil.copytree(src, p[name])
        return p[name]

    weights = os.path.join(copy(hf, "hf_truncated"), "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)
    with open(os.path.join(copy(hf, "hf_garbage"), "model.safetensors"), "r+b") as f:
        f.write(b"\xff" * 16)
    _write(os.path.join(copy(hf, "hf_bad_config"), "config.json"), '{"model_type":\n')
    config_path = os.path.join(copy(hf, "hf_yarn"), "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    _write(config_path, json.dumps(config))
    distcp = os.path.join(copy(mcore, "mcore_truncated"), "release", "__0_0.distcp")
    os.truncate(distcp, os.path.getsize(distcp) - 1000)
    _write(os.path.join(copy(mcore, "mcore_bad_meta"), "megatron_patch.json"), "{oops")
    _crafted_metadata(copy(mcore, "mcore_outside"), copy(mcore, "mcore_dtype"))
    os.remove(os.path.join(copy(mcore, "mcore_no_common"), "release", "common.pt"))
    p["prompts_bad_utf8"] = _write(os.path.join(tmp, "prompts_bad_utf8.txt"),
                                   b"hello\nbad \xff byte\n")
    _non_finite(copy(hf, "hf_nan"), "model.layers.1.mlp.up_proj.weight", 7, b"\x00\x00\xc0\x7f")
    _non_finite(copy(hf, "hf_inf"), "model.embed_tokens.weight", 0, b"\x00\x00\x80\xff")
    p["existing"] = os.path.join(tmp, "existing")
    os.makedirs(p["existing"])
    _write(os.path.join(p["existing"], "keep.txt"), "mine")
    return p


def _crafted_metadata(outside: str, tampered: str) -> None:
    """outside: its .metadata names a copy of its data file two directories up (a crafted
    `relative_path` reading any file); tampered: one tensor's recorded dtype is float16, its
    record float32."""
    import pickle

    import torch

    shutil.copy(os.path.join(outside, "release", "__0_0.distcp"),
                os.path.join(os.path.dirname(outside), "outside.distcp"))
    for root, craft in ((outside, "path"), (tampered, "dtype")):
        path = os.path.join(root, "release", ".metadata")
        with open(path, "rb") as f:
            metadata = pickle.load(f)
        if craft == "path":
            for info in metadata.storage_data.values():
                info.relative_path = "../../outside.distcp"
        else:
            metadata.state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"] \
                .properties.dtype = torch.float16
        with open(path, "wb") as f:
            pickle.dump(metadata, f)


def _non_finite(hf_dir: str, tensor: str, element: int, value: bytes) -> None:
    """Overwrite one float32 element of `tensor` in model.safetensors with `value`'s bytes."""
    path = os.path.join(hf_dir, "model.safetensors")
    with open(path, "r+b") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        assert header[tensor]["dtype"] == "F32"
        f.seek(8 + header_size + header[tensor]["data_offsets"][0] + 4 * element)
        f.write(value)


def _fill(value: str, paths: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: paths[m.group(1)], value)


@pytest.fixture(scope="module")
def outcomes(llama_models, tmp_path_factory):
    """Every case run once, in one worker; also the hashes of all inputs before and after."""
    root = llama_models["llama2"]
    tmp = str(tmp_path_factory.mktemp("bad_inputs"))
    paths = _inputs(tmp, os.path.join(root, "hf"), os.path.join(root, "mcore"))
    paths["tokens"] = os.path.join(tmp, "tokens")
    harness.run(harness.make_token_dataset, 1, paths["tokens"])
    cases = [dict(c, argv=[_fill(a, paths) for a in c["argv"]],
                  needles=[_fill(n, paths) for n in c["needles"]]) for c in CASES]
    inputs = {k: v for k, v in paths.items() if k not in ("out", "tokens")}
    before = {k: tree_hash(v) for k, v in inputs.items()}
    results = harness.run(_run_cases, 1, cases, paths["out"])[0]
    after = {k: tree_hash(v) for k, v in inputs.items()}
    return {c["name"]: c for c in cases}, results, before, after, paths


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(outcomes, name):
    cases, results, before, after, paths = outcomes
    case = cases[name]
    rc, stderr = results[name]
    assert rc == 2, (rc, stderr[-3000:])
    # convert's line names its direction: `megatron-patch convert hf-to-megatron: error: ...`
    command = " ".join(case["argv"][:2 if case["argv"][0] == "convert" else 1])
    assert_one_line(stderr, command, *case["needles"])
    assert before == after  # no input (model, checkpoint, data file, existing output) changed
    # Nothing complete-looking appeared where the command was to write.
    written = [os.path.basename(a) for a in case["argv"] if a.startswith(paths["out"] + "/")]
    for entry in os.listdir(paths["out"]):
        assert not any(entry == w or entry.startswith(w + "_") for w in written), entry


def test_disk_full_names_the_output_once(outcomes):
    """The line said `OUT: writing OUT failed, ...`."""
    cases, results, _, _, paths = outcomes
    line = assert_one_line(results["disk_full"][1], "convert megatron-to-hf")
    assert line.count(os.path.join(paths["out"], "full")) == 1, line


# ---------------------------------------------------------------------------------------------
# Records: one bad line is one bad record, skipped and counted with --skip-bad-lines.


def test_sft_reads_line_by_line_and_skips_surrogates_and_bad_bytes(tmp_path):
    from megatron_patch.data.sft import BadRecord, read_records

    good = json.dumps({"instruction": "q", "output": "a"}).encode()
    path = _write(str(tmp_path / "sft.jsonl"), b"\n".join([
        good, b'{"instruction": "q \\ud800", "output": "a"}', b'{"instruction": "\xff"}', good,
    ]) + b"\n")
    with pytest.raises(BadRecord, match=re.escape(f"{path}:2: lone UTF-16 surrogate")):
        read_records(path)
    records, bad = read_records(path, skip_bad=True)
    assert (len(records), bad) == (2, 2)
    third = _write(str(tmp_path / "bytes.jsonl"), good + b"\n" + b'{"instruction": "\xff"}\n')
    with pytest.raises(BadRecord, match=re.escape(f"{third}:2: invalid UTF-8")):
        read_records(third)


def test_generation_prompts_are_held_to_sft_message_rules(tmp_path):
    from megatron_patch.data.sft import BadRecord, read_records, validate_prompt

    path = _write(str(tmp_path / "p.jsonl"),
                  '{"prompt": "x"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert len(read_records(path, check=validate_prompt)[0]) == 2
    for bad in ('{"messages": []}', '{"messages": [{"content": "x"}]}',
                '{"messages": [{"role": "narrator", "content": "x"}]}'):
        path = _write(str(tmp_path / "b.jsonl"), '{"prompt": "x"}\n' + bad + "\n")
        with pytest.raises(BadRecord, match=re.escape(f"{path}:2: ")):
            read_records(path, check=validate_prompt)


def test_a_utf8_byte_order_mark_is_accepted_by_every_record_reader(tmp_path):
    """SFT records, preference pairs and prompts (generate, RL), as JSON lines, a JSON list or
    a .txt file, read the same with a leading UTF-8 BOM as without (Python's utf-8-sig;
    preprocess already did); they used to be refused as invalid JSON on line 1."""
    from megatron_patch.data.preference import validate_pair
    from megatron_patch.data.sft import read_located_records, read_records
    from megatron_patch.prompts import read_prompts

    bom = b"\xef\xbb\xbf"
    sft = b'{"instruction": "q", "output": "a"}\n{"instruction": "r", "output": "b"}\n'
    pair = b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
    texts = {"sft.jsonl": sft, "sft.json": b"[" + sft.replace(b"\n", b",", 1).strip() + b"]",
             "pairs.jsonl": pair, "prompts.jsonl": b'{"prompt": "hi"}\n', "prompts.txt": b"hi\n"}
    for name, text in texts.items():
        plain = _write(str(tmp_path / name), text)
        marked = _write(str(tmp_path / ("bom_" + name)), bom + text)
        if name.startswith("sft"):
            assert read_records(marked) == read_records(plain), name
        elif name.startswith("pairs"):
            assert (read_located_records(marked, check=validate_pair)[0][0][1]
                    == read_located_records(plain, check=validate_pair)[0][0][1])
        else:
            assert ([p.record for p in read_prompts(marked)]
                    == [p.record for p in read_prompts(plain)]), name


def _sft_refusals(hf_dir: str, tmp: str) -> dict[str, str]:
    from transformers import AutoTokenizer

    from megatron_patch.data.sft import build_sft_dataset

    tok = AutoTokenizer.from_pretrained(hf_dir)
    long = json.dumps({"instruction": "word " * 200, "output": "a"})
    files = {"empty": "", "long": f"{long}\n{long}\n", "bad_and_long": f"{long}\n{{oops\n",
             "long_skipped": f"{long}\n{long}\n"}
    out = {}
    for name, text in files.items():
        path = _write(os.path.join(tmp, name + ".jsonl"), text)
        try:
            build_sft_dataset(path, tok, 16, skip_bad=True,
                              skip_long=name == "long_skipped")
            out[name] = "accepted"
        except ValueError as e:
            out[name] = str(e)
    return out


def test_sft_no_usable_samples_says_why(llama_models, tmp_path):
    """Each record's cause is counted (it said only "no usable samples")."""
    out = harness.run(_sft_refusals, 1, os.path.join(llama_models["llama2"], "hf"),
                      str(tmp_path))[0]
    assert out["empty"] == f"{tmp_path}/empty.jsonl: no usable samples: the file holds no records"
    assert out["long"] == (f"{tmp_path}/long.jsonl: no usable samples: of 2 record(s): 2 with "
                           "no response token within --seq-length 16"), out
    assert out["bad_and_long"].endswith("of 2 record(s): 1 bad record(s) skipped "
                                        "(--skip-bad-lines), 1 with no response token within "
                                        "--seq-length 16"), out
    assert out["long_skipped"].endswith("of 2 record(s): 2 longer than --seq-length 16 skipped "
                                        "(--skip-long-samples)"), out


def test_preprocess_skips_a_surrogate_line_with_skip_bad_lines(llama_models, tmp_path):
    from megatron_patch.data import preprocess

    corpus = _write(str(tmp_path / "c.jsonl"),
                    '{"text": "one"}\n{"text": "bad \\ud800"}\n{"text": "three"}\n')
    summary = harness.run(preprocess.preprocess, 1, corpus, str(tmp_path / "o"),
                          os.path.join(llama_models["llama2"], "hf"), skip_bad_lines=True,
                          log_interval=0)[0]
    assert (summary["documents"], summary["bad_lines"]) == (2, 1)


# ---------------------------------------------------------------------------------------------
# Under torchrun.

# Ranks not named fail too, as under data parallelism: their collective loses its peer.
FAKE_WORKER = """
import os, sys
import torch.distributed as dist
from megatron_patch import errors

def main():
    dist.init_process_group("gloo")
    if os.environ["RANK"] in sys.argv[1].split(","):
        raise ValueError("data.jsonl:7: a bad record on rank " + os.environ["RANK"])
    dist.barrier()
    return 0

sys.exit(errors.run_main("megatron-patch train", main))
"""


def test_torchrun_error_is_one_line_from_one_rank(tmp_path):
    """All ranks fail: one line (rank 0's, or rank 1's when torchrun stopped rank 0 before it
    failed itself), no torchrun report. Only rank 1 fails, and rank 0's barrier with it then
    fails too ("Connection closed by peer"): the launcher prints rank 1's line alone.
    MEGATRON_PATCH_DEBUG=1: tracebacks are back."""
    worker = _write(str(tmp_path / "worker.py"), FAKE_WORKER)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("MEGATRON_PATCH_DEBUG", None)
    cmd = [sys.executable, "-m", "megatron_patch.launch", "torchrun", "--standalone",
           "--nproc_per_node=2", worker]
    every = harness.run_command([*cmd, "0,1"], env=env, timeout=300)
    assert every.returncode == 2, every.stderr
    line = assert_one_line(every.stderr, "train", "data.jsonl:7")
    assert line.endswith(("rank 0", "rank 1")), line
    assert "ChildFailedError" not in every.stderr and "FAILED" not in every.stderr

    other = harness.run_command([*cmd, "1"], env=env, timeout=300)
    assert other.returncode == 2, other.stderr
    assert assert_one_line(other.stderr, "train", "data.jsonl:7").endswith("rank 1")

    debug = harness.run_command([*cmd, "0,1"], env=dict(env, MEGATRON_PATCH_DEBUG="1"),
                                timeout=300)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "ValueError" in debug.stderr


def test_launcher_refuses_zero_sizes_in_one_line(capsys):
    from megatron_patch import launch

    args = ["dsw", "", ROOT, "tiny", "2", "4", "1e-3", "1e-5", "32", "32", "0", "fp32", "0",
            "1", "sel", "true", "false", "true", "4", "data", "ckpt", "768", "64", "out"]
    assert launch.main(["pretrain", *args]) == 2
    assert_one_line(capsys.readouterr().err, "pretrain", "TP", "'0'")


# ---------------------------------------------------------------------------------------------
# Every command line the README shows.


def readme_commands() -> list[str]:
    """`megatron-patch ...` and `bash examples/...`/`bash toolkits/...` lines of README.md's
    bash blocks, and `megatron-patch ...` inline code spans (which may wrap a line)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("megatron-patch ", "bash examples/", "bash toolkits/")):
                commands.append(line)
    for span in re.findall(r"`(megatron-patch [^`]+)`", text):
        span = " ".join(span.split())
        # Not `megatron-patch <command> --help`, nor a command named in passing.
        if "<" not in span and len(span.split()) > 2 and span not in commands:
            commands.append(span)
    return commands


def _parse(argv: list[str]) -> None:
    """What `megatron-patch` does before any work: parse, then (train) validate."""
    from megatron_patch import cli
    from megatron_patch.training import arguments

    args = cli.build_parser().parse_args(argv)
    if args.command == "train":
        arguments.validate(args)


def test_readme_command_lines(llama_models, tmp_path):
    """Each README command line is parsed by the `megatron-patch` parser; launcher lines run
    their script with a PYTHON that records the command they build, which is parsed in turn.
    `--help` lines and the quick start's first two steps (make-tiny, convert hf-to-megatron of
    the tiny model) run for real through the installed `megatron-patch` entry point."""
    commands = readme_commands()
    assert any(c.startswith("bash toolkits/") for c in commands), commands
    assert "megatron-patch train --help" in commands and len(commands) >= 10, commands
    recorder = _write(str(tmp_path / "record.sh"),
                      '#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD"\n')
    os.chmod(recorder, 0o755)
    # The entry point installed beside this interpreter (scripts/test.sh runs .venv/bin/python
    # without activating the venv, so PATH may not have it).
    entry = (shutil.which("megatron-patch", path=os.path.dirname(sys.executable))
             or pytest.fail(f"megatron-patch is not installed beside {sys.executable}"))
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "bash":
            record = str(tmp_path / "argv.txt")
            proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                                  env=dict(os.environ, PYTHON=recorder, RECORD=record))
            assert proc.returncode == 0, (command, proc.stderr)
            with open(record) as f:
                built = f.read().splitlines()
            assert built[:2] == ["-m", "megatron_patch"], (command, built)
            _parse(built[2:])
        elif argv[-1] == "--help":
            proc = harness.run_command([entry, *argv[1:]], timeout=120)
            assert proc.returncode == 0 and "--debug" in proc.stdout, (command, proc.stderr)
        else:
            _parse(argv[1:])
    demo = [c for c in commands if c.startswith(("megatron-patch make-tiny",
                                                  "megatron-patch convert hf-to-megatron demo"))]
    assert len(demo) == 2, demo
    for command in demo:
        argv = [a.replace("demo_output", str(tmp_path / "demo")) for a in shlex.split(command)]
        harness.run_command([entry, *argv[1:]], timeout=300, check=True)
    assert os.path.isfile(tmp_path / "demo" / "mcore" / "latest_checkpointed_iteration.txt")


def test_train_subcommand_takes_its_flags(capsys):
    """`megatron-patch train` used to reject every flag (argparse.REMAINDER in a subparser)."""
    from megatron_patch import cli

    args = cli.build_parser().parse_args(["train", "--load", "ckpt", "--seq-length", "8",
                                          "--train-iters", "2", "--micro-batch-size", "2"])
    assert (args.load, args.seq_length, args.train_iters, args.micro_batch_size) == (
        "ckpt", 8, 2, 2)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0 and "--tensor-model-parallel-size" in capsys.readouterr().out


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    from megatron_patch import errors

    def boom() -> int:
        raise RuntimeError("the internals broke")

    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert errors.run_main("megatron-patch convert", boom) == 1
    err = capsys.readouterr().err
    assert_one_line(err, "convert", "RuntimeError: the internals broke", errors.DEBUG_ENV)
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    assert errors.run_main("megatron-patch convert", boom) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv(errors.DEBUG_ENV)
    assert errors.run_main("megatron-patch convert", boom) == 1
    assert capsys.readouterr().err == ""  # only rank 0 speaks


# ---------------------------------------------------------------------------------------------
# Float flags: no NaN or infinity anywhere, and each flag's range (issue 28, items 1 and 2).


def _takes_float(action) -> bool:
    """An option whose value is a float: a float default, or a type that makes one of a
    number's text (whatever the type is called)."""
    if not action.option_strings or action.nargs == 0:
        return False
    if isinstance(action.default, float):
        return True
    for text in ("0.5", "0.25", "2"):
        try:
            if isinstance(action.type(text), float):
                return True
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            continue
    return False


def float_flags() -> list[tuple[str, str, str]]:
    """(command, flag, argparse's name of the flag) of every float option of every
    `megatron-patch` command."""
    from megatron_patch import cli

    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [(command, action.option_strings[0], "/".join(action.option_strings))
            for command, sub in commands.choices.items() for action in sub._actions
            if _takes_float(action)]


def _parse_error(argv: list[str]) -> str:
    """argparse's error for argv, or 'accepted'."""
    from megatron_patch import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.build_parser().parse_args(argv)
        except SystemExit:
            return err.getvalue()
    return "accepted"


def test_no_float_flag_accepts_nan_or_inf():
    flags = float_flags()
    found = {(c, f) for c, f, _ in flags}
    # The walk finds the float flags of every kind of command (a sample, not the list).
    for expected in (("train", "--lr"), ("train", "--dpo-beta"), ("train", "--lora-alpha"),
                     ("train", "--center-rewards-coefficient"), ("rl", "--kl-coef"),
                     ("rl", "--clip-eps"), ("rl", "--lora-dropout"), ("generate", "--top-p"),
                     ("verify", "--atol")):
        assert expected in found, (expected, sorted(found))
    accepted = []
    for command, flag, name in flags:
        for value in ("nan", "inf", "-inf", "NaN"):
            error = _parse_error([command, flag, value])
            if f"error: argument {name}: " not in error:
                accepted.append((command, flag, value, error.strip()[-200:]))
    assert not accepted, accepted


@pytest.mark.parametrize("command, flag, value, expected", [
    ("rl", "--clip-eps", "-0.5", "(0, 1)"), ("rl", "--clip-eps", "1", "(0, 1)"),
    ("rl", "--temperature", "0", "> 0"), ("rl", "--lam", "2", "[0, 1]"),
    ("rl", "--gamma", "-1", "[0, 1]"), ("rl", "--value-clip-eps", "-1", "> 0"),
    ("rl", "--kl-coef", "-0.1", ">= 0"), ("rl", "--top-p", "0", "(0, 1]"),
    ("rl", "--kl-horizon", "0", "> 0"), ("train", "--dpo-beta", "0", "> 0"),
    ("train", "--lora-alpha", "-8", "> 0"), ("train", "--lora-dropout", "1", "[0, 1)"),
    ("train", "--adam-beta2", "1", "[0, 1)"), ("train", "--lr", "-0.0001", ">= 0"),
    ("train", "--center-rewards-coefficient", "-0.01", ">= 0"),
    ("train", "--dpo-label-smoothing", "0.5", "[0, 0.5)"),
    ("generate", "--repetition-penalty", "0", "> 0"),
])
def test_float_flags_are_range_checked_by_argparse(command, flag, value, expected):
    error = _parse_error([command, flag, value])
    assert f"error: argument {flag}: " in error and expected in error, error
    assert f"got {value}" in error, error


def test_split_refuses_non_finite_weights():
    from megatron_patch.training import arguments

    for split in ("nan,1,0", "98,inf,0"):
        with pytest.raises(ValueError, match=re.escape(f"--split {split}")):
            arguments.parse_args(["--seq-length", "8", "--train-iters", "1", "--split", split])


# ---------------------------------------------------------------------------------------------
# Reward functions (issue 28, item 10): whatever one does, an error naming it and the record.


def _reward_errors() -> dict:
    """In a worker (torch runs only there): what each misbehaving reward function raises, and
    a reward sum that overflows float32 though its parts are finite (a reward model's score
    plus a function's value), refused naming the prompt, or with --skip-bad-rewards left out."""
    import types

    import torch

    from megatron_patch.rlhf.rewards import Rewards, load_reward_function

    out = {}
    for name in ("exits", "huge_int", "beyond_float32"):
        out[name] = _error_of(load_reward_function(f"rl_rewards:{name}"), {"text": "hi"}, "hi",
                              "there", "prompts.jsonl: record 3")
    prompts = types.SimpleNamespace(prompts=[types.SimpleNamespace(where="p.jsonl:1"),
                                             types.SimpleNamespace(where="p.jsonl:2")])
    rollouts = [types.SimpleNamespace(prompt_index=i) for i in (0, 0, 1, 1)]
    big = torch.finfo(torch.float32).max
    for skip in (False, True):
        rewards = Rewards(types.SimpleNamespace(reward_model=None, skip_bad_rewards=skip), None,
                          prompts, None, 2, None)
        sums = torch.tensor([1.0, 2.0, big, 0.5]) + torch.tensor([0.0, 0.0, big, 0.0])
        valid = [True] * 4
        out[f"sum_skip_{skip}"] = _error_of(rewards._check_sums, rollouts, sums, valid)
        out[f"sum_skip_{skip}_kept"] = [valid, sums.tolist()]
    return out


def _error_of(fn, *args) -> str:
    try:
        fn(*args)
    except Exception as e:  # the type is part of what is checked
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.fixture(scope="module")
def reward_errors() -> dict:
    return harness.run(_reward_errors, 1)[0]


@pytest.mark.parametrize("name, needle", [
    ("exits", "raised SystemExit"), ("huge_int", "returned 10000000000000000000...0000000000 "
                                                 "(401 characters)"),
    ("beyond_float32", "returned 1e+39")])
def test_reward_function_misbehaviour_is_an_error_naming_it_and_the_record(reward_errors, name,
                                                                          needle):
    message = reward_errors[name]
    assert message.startswith(f"RewardError: reward function rl_rewards:{name} "), message
    assert needle in message and "prompts.jsonl: record 3" in message, message
    if name != "exits":
        assert "float32" in message, message


def test_a_non_finite_reward_sum_names_the_prompt_or_is_skipped(reward_errors):
    assert reward_errors["sum_skip_False"].startswith(
        "RewardError: the reward of a completion of p.jsonl:2 is inf"), reward_errors
    assert reward_errors["sum_skip_True"] == "no error", reward_errors
    assert reward_errors["sum_skip_True_kept"] == [[True, True, False, True],
                                                   [1.0, 2.0, 0.0, 0.5]], reward_errors


# ---------------------------------------------------------------------------------------------
# Preference pairs (issue 28, item 9): pairs that truncation makes identical are skipped and
# counted (reward models and DPO read the same data), and none left is an error.


def _truncated_pairs(hf_dir: str, tmp: str) -> dict:
    from transformers import AutoTokenizer

    from megatron_patch.data.preference import build_preference_dataset

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    shared = "fox " * 60  # longer than the sequence: what follows it is cut off on both sides
    same_once_cut = {"prompt": "Say fox.", "chosen": shared + "yes", "rejected": shared + "no"}
    different = {"prompt": "Say fox.", "chosen": "fox", "rejected": "dog"}
    out = {}
    mixed = _write(os.path.join(tmp, "mixed.jsonl"),
                   "\n".join(json.dumps(r) for r in (different, same_once_cut)) + "\n")
    dataset, summary = build_preference_dataset(mixed, tokenizer, 64)
    out["mixed"] = {"pairs": len(dataset), "line": summary.line(mixed),
                    "sides_differ": [c[0] != r[0] for c, r, _ in dataset.pairs]}
    only = _write(os.path.join(tmp, "only.jsonl"), json.dumps(same_once_cut) + "\n")
    try:
        build_preference_dataset(only, tokenizer, 64)
        out["only"] = "no error"
    except ValueError as e:
        out["only"] = str(e)
    return out


def test_preference_pairs_identical_once_truncated_are_skipped_and_counted(llama_models,
                                                                           tmp_path):
    hf_dir = os.path.join(llama_models["llama2"], "hf")
    (r,) = harness.run(_truncated_pairs, 1, hf_dir, str(tmp_path))
    mixed, only = tmp_path / "mixed.jsonl", tmp_path / "only.jsonl"
    assert r["mixed"]["pairs"] == 1 and r["mixed"]["sides_differ"] == [True], r
    assert "1 pairs; truncated 0," in r["mixed"]["line"], r
    assert ("identical once tokenized and truncated skipped 1" in r["mixed"]["line"]
            and f"(identical tokens: {mixed}:2)" in r["mixed"]["line"]), r
    assert r["only"].startswith(f"{only}: no usable preference pairs"), r
    assert "identical once tokenized and truncated skipped 1" in r["only"], r



def test_an_iteration_asked_for_and_missing_names_what_the_checkpoint_holds(tmp_path):
    """`--iteration 3` on a checkpoint without it: the error said the iteration was named by
    latest_checkpointed_iteration.txt, which named another."""
    from megatron_patch import checkpoint

    root = tmp_path / "ckpt"
    (root / "iter_0000001").mkdir(parents=True)
    (root / "iter_0000002").mkdir()
    (root / checkpoint.TRACKER).write_text("2")
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"iteration 3 was asked for, and {root} holds iter_0000001, iter_0000002")):
        checkpoint.existing_iteration_dir(str(root), 3)
    (root / "iter_0000002").rmdir()  # the latest, named by the tracker, is gone
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"(named by {root / checkpoint.TRACKER})")):
        checkpoint.existing_iteration_dir(str(root))
