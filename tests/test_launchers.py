"""The shell entry points: toolkits/model_checkpoints_convertor/<family>/model_convertor.sh and
examples/<family>/run_{pretrain,finetune,text_generation}_*.sh, Pai-Megatron-Patch's positional
interfaces, as thin aliases over `megatron-patch`: argument mapping (with a stand-in interpreter
that prints what it was given), then end to end (conversion round trip, pretraining at TP=2,
fine-tuning then generation).

Everything runs in subprocesses (the parent does no torch computation: the suite forks workers);
the parent compares tensors through safetensors' numpy loader.
"""

import glob
import json
import os
import subprocess
import sys

import harness
import numpy as np
import pytest
from safetensors.numpy import load_file

from megatron_patch.tiny import QA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The Llama convertor: model_convertor.sh.

CONVERTOR = os.path.join(ROOT, "toolkits", "model_checkpoints_convertor", "llama",
                         "model_convertor.sh")


def _env(**extra: str) -> dict[str, str]:
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PYTHON=sys.executable, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def _convertor(*args: str, cwd: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", CONVERTOR, *args], cwd=cwd, env=_env(**env), check=False,
                          capture_output=True, text=True, timeout=300)


def _tensors(model_dir: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        out.update(load_file(path))
    return out


def test_convertor_usage_on_wrong_argument_count(tmp_path):
    r = _convertor("", "a", "b", "1", cwd=str(tmp_path))
    assert r.returncode == 2, r
    assert "usage:" in r.stderr and "MG2HF" in r.stderr


def test_convertor_maps_arguments_to_flags(tmp_path):
    """With a stand-in interpreter that prints what it was given: no conversion runs."""
    fake = tmp_path / "fake-python"
    fake.write_text('#!/usr/bin/env bash\necho "PYTHONPATH=$PYTHONPATH"\necho "ARGS=$*"\n')
    fake.chmod(0o755)
    megatron_lm = str(tmp_path / "Megatron-LM")

    r = _convertor(megatron_lm, "src", "dst", "4", "2", "llama2-7b", "64", "false",
                   cwd=str(tmp_path), PYTHON=str(fake))
    assert r.returncode == 0, r
    assert f"PYTHONPATH={megatron_lm}:{ROOT}\n" in r.stdout
    assert ("ARGS=-m megatron_patch convert hf-to-megatron src dst "
            "--tensor-model-parallel-size 4 --extra-vocab-size 64\n") in r.stdout
    assert "llama2-7b" in r.stdout and "PP=2 ignored" in r.stdout

    r = _convertor("", "src", "dst", "4", "2", "llama2-7b", "64", "true",
                   cwd=str(tmp_path), PYTHON=str(fake), PYTHONPATH="/elsewhere")
    assert r.returncode == 0, r
    assert f"PYTHONPATH={ROOT}:/elsewhere\n" in r.stdout
    assert "ARGS=-m megatron_patch convert megatron-to-hf src dst\n" in r.stdout


def test_convertor_round_trip_is_bit_exact(tmp_path):
    hf, mcore, hf2 = (str(tmp_path / d) for d in ("hf", "mcore", "hf2"))
    make = ("import sys; from megatron_patch.tiny import make_hf_model; "
            "make_hf_model(sys.argv[1], 'llama1_tied')")
    subprocess.run([sys.executable, "-c", make, hf], cwd=ROOT, env=_env(), check=True,
                   capture_output=True, timeout=300)

    # TP=2 and 30 extra rows: 1030 rows padded to a multiple of 128 * 2.
    r = _convertor("", hf, mcore, "2", "2", "llama-tiny", "30", "false", cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "llama-tiny" in r.stdout
    with open(os.path.join(mcore, "megatron_patch.json")) as f:
        meta = json.load(f)
    assert (meta["vocab_size"], meta["padded_vocab_size"]) == (1000, 1280)

    r = _convertor("", mcore, hf2, "2", "2", "llama-tiny", "30", "true", cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr

    a, b = _tensors(hf), _tensors(hf2)
    assert a and a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


# Every zoo family's launchers and convertor exist, are executable and hand their arguments to
# the common scripts.

FAMILIES = ("qwen", "baichuan", "chatglm", "starcoder2")
# Families with launchers but no Pai-Megatron-Patch convertor script to keep compatible.
LAUNCHER_ONLY = ("qwen3_moe", "gemma", "deepseek", "gpt_oss")
MODES = {"pretrain": "pretrain", "finetune": "finetune", "text_generation": "generate"}


@pytest.fixture
def fake_python(tmp_path) -> str:
    fake = tmp_path / "fake-python"
    fake.write_text('#!/usr/bin/env bash\necho "ARGS=$*"\n')
    fake.chmod(0o755)
    return str(fake)


def _run(script: str, args: list[str], python: str, cwd: str) -> subprocess.CompletedProcess:
    assert os.access(script, os.X_OK), f"{script} is not executable"
    env = dict(os.environ, PYTHON=python)
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", script, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize("family", FAMILIES + LAUNCHER_ONLY)
def test_launchers_delegate_to_the_common_launcher(family, fake_python, tmp_path):
    for mode, command in MODES.items():
        script = os.path.join(ROOT, "examples", family, f"run_{mode}_megatron_{family}.sh")
        r = _run(script, ["dsw", "", ROOT, "7B", "1"], fake_python, str(tmp_path))
        assert r.returncode == 0, r
        assert r.stdout == f"ARGS=-m megatron_patch.launch {command} dsw  {ROOT} 7B 1\n", r


def test_every_family_with_sft_launchers_has_rm_and_dpo_launchers(fake_python, tmp_path):
    """rlhf/run_{rm,dpo}_megatron.sh per family, beside each family's SFT launcher."""
    import glob

    finetune = sorted(glob.glob(os.path.join(ROOT, "examples", "*",
                                             "run_finetune_megatron_*.sh")))
    assert len(finetune) >= 18, finetune
    for path in finetune:
        for mode in ("rm", "dpo"):
            script = path.replace("run_finetune_", f"run_{mode}_")
            assert os.path.isfile(script), f"{script} is missing"
            r = _run(script, ["dsw", "", ROOT, "7B", "1"], fake_python, str(tmp_path))
            assert r.returncode == 0, r
            assert r.stdout == f"ARGS=-m megatron_patch.launch {mode} dsw  {ROOT} 7B 1\n", r


@pytest.mark.parametrize("family", FAMILIES)
def test_convertor_delegates_to_the_common_convertor(family, fake_python, tmp_path):
    script = os.path.join(ROOT, "toolkits", "model_checkpoints_convertor", family,
                          "model_convertor.sh")
    r = _run(script, ["", "src", "dst", "2", "1", f"{family}-7b", "0", "false"], fake_python,
             str(tmp_path))
    assert r.returncode == 0, r
    assert ("ARGS=-m megatron_patch convert hf-to-megatron src dst "
            "--tensor-model-parallel-size 2 --extra-vocab-size 0\n") in r.stdout, r


# The interpreter a launcher runs without $PYTHON (scripts/find_python.sh), on a copy of the
# repository's launchers whose PATH holds only bash, dirname and the stand-ins below.

LOOKUP_SCRIPTS = ("scripts/find_python.sh", "examples/common/launch.sh",
                  "examples/llama2/run_pretrain_megatron_llama.sh",
                  "toolkits/model_checkpoints_convertor/common/model_convertor.sh",
                  "toolkits/model_checkpoints_convertor/llama/model_convertor.sh",
                  "toolkits/pretrain_data_preprocessing/preprocess_data.sh",
                  "toolkits/vocab_extension/extend_vocab.sh")
# A stand-in interpreter: `-c` is the launcher's torch probe (exit status TORCH), anything else
# is the run, printed.
STAND_IN = '#!/bin/bash\nif [ "$1" = -c ]; then exit {torch}; fi\necho "{name} ARGS=$*"\n'


def _stand_in(path, name: str, torch: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STAND_IN.format(torch=0 if torch else 1, name=name))
    path.chmod(0o755)


def _lookup_tree(tmp_path, venv: bool, path_torch: bool):
    import shutil

    tree = tmp_path / "repo"
    for rel in LOOKUP_SCRIPTS:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), tree / rel)
    if venv:
        _stand_in(tree / ".venv" / "bin" / "python", "venv", torch=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "basename"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    _stand_in(bin_dir / "python3", "path", torch=path_torch)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH")}
    env["PATH"] = str(bin_dir)
    return tree, env


LOOKUP_CALLS = {
    "examples/llama2/run_pretrain_megatron_llama.sh": ["dsw", "", "", "7B"],
    "toolkits/model_checkpoints_convertor/llama/model_convertor.sh":
        ["", "src", "dst", "1", "1", "llama2-7b", "0", "true"],
    "toolkits/pretrain_data_preprocessing/preprocess_data.sh": ["in.jsonl", "out", "tok"],
    "toolkits/vocab_extension/extend_vocab.sh": ["src", "dst", "words", "words.txt"],
}


@pytest.mark.parametrize("script", sorted(LOOKUP_CALLS))
def test_launchers_find_the_repository_venv_when_path_has_no_torch(script, tmp_path):
    """After scripts/demo.sh, without `source .venv/bin/activate`: the system python (no torch)
    is first on PATH, and the launcher must run .venv's interpreter instead."""
    tree, env = _lookup_tree(tmp_path, venv=True, path_torch=False)
    r = subprocess.run(["bash", str(tree / script), *LOOKUP_CALLS[script]], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r
    assert "venv ARGS=-m megatron_patch" in r.stdout, r


@pytest.mark.parametrize("script", sorted(LOOKUP_CALLS))
def test_launchers_without_a_torch_python_fail_in_one_line(script, tmp_path):
    tree, env = _lookup_tree(tmp_path, venv=False, path_torch=False)
    r = subprocess.run(["bash", str(tree / script), *LOOKUP_CALLS[script]], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 127, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Python with torch" in lines[0], r
    assert "source .venv/bin/activate" in lines[0] and "PYTHON" in lines[0], r
    assert "ARGS=" not in r.stdout, r


def test_launchers_prefer_an_activated_environment(tmp_path):
    tree, env = _lookup_tree(tmp_path, venv=True, path_torch=True)
    _stand_in(tmp_path / "active" / "bin" / "python", "active", torch=True)
    env["VIRTUAL_ENV"] = str(tmp_path / "active")
    script = "toolkits/model_checkpoints_convertor/llama/model_convertor.sh"
    r = subprocess.run(["bash", str(tree / script), *LOOKUP_CALLS[script]], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and "active ARGS=" in r.stdout, r


# run_pretrain_*.sh: the classic positional interface, end to end.

PRETRAIN_LAUNCHER = os.path.join(ROOT, "examples", "llama2", "run_pretrain_megatron_llama.sh")


def _positional(data: str, ckpt: str, out: str, **over: str) -> list[str]:
    v = dict(ENV="dsw", MEGATRON_PATH="", MEGATRON_PATCH_PATH=ROOT, MODEL_SIZE="tiny",
             BATCH_SIZE="2", GLOBAL_BATCH_SIZE="4", LR="1e-3", MIN_LR="1e-5", SEQ_LEN="32",
             PAD_LEN="32", EXTRA_VOCAB_SIZE="0", PR="fp32", TP="2", PP="1", AC="sel", DO="true",
             FL="false", SP="true", SAVE_INTERVAL="4", DATASET_PATH=data,
             PRETRAIN_CHECKPOINT_PATH=ckpt, TRAIN_TOKENS=str(6 * 4 * 32), WARMUP_TOKENS="64",
             OUTPUT_BASEPATH=out)
    v.update(over)
    from megatron_patch.launch import PRETRAIN_FIELDS

    return [v[k] for k in PRETRAIN_FIELDS]


def test_pretrain_switches_map_to_megatron_flags(monkeypatch):
    from megatron_patch import launch

    monkeypatch.setenv("NPROC_PER_NODE", "2")
    cmd = launch.pretrain_command(_positional("d", "c", "o", PR="bf16", AC="full", SP="false"))
    joined = " ".join(cmd)
    assert "--bf16" in cmd and "--use-distributed-optimizer" in cmd
    assert "--recompute-granularity full" in joined and "--sequence-parallel" not in cmd
    assert "--nproc_per_node=2" in joined and "--standalone" in cmd
    assert cmd[cmd.index("--train-tokens") + 1] == "768"
    fp8 = launch.pretrain_command(_positional("d", "c", "o", PR="fp8"))
    assert "--fp8-format" in fp8
    for bad in (dict(PR="fp64"), dict(AC="some"), dict(DO="maybe"), dict(ENV="k8s")):
        with pytest.raises(ValueError):
            launch.pretrain_command(_positional("d", "c", "o", **bad))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        launch.pretrain_command(_positional("d", "c", "o", ENV="dlc"))


def test_extra_flags_replace_the_launchers_own(monkeypatch):
    """The demo's fine-tuning passes --log-interval 20: the printed command held the launcher's
    --log-interval 1 too. Each flag once, with the extra flag's value."""
    from megatron_patch import launch

    monkeypatch.setenv("NPROC_PER_NODE", "1")
    finetune = dict(ENV="dsw", MEGATRON_PATH="", MEGATRON_PATCH_PATH=ROOT, MODEL_SIZE="tiny",
                    BATCH_SIZE="2", LR="1e-3", MIN_LR="1e-5", SEQ_LEN="32", PAD_LEN="32",
                    EXTRA_VOCAB_SIZE="0", PR="fp32", TP="1", PP="1", AC="none", DO="false",
                    FL="false", SP="false", TRAIN_DATASET_PATH="sft.jsonl",
                    VALID_DATASET_PATH="none", PRETRAIN_CHECKPOINT_PATH="c", EPOCH="1",
                    OUTPUT_BASEPATH="o")
    commands = {
        "pretrain": launch.pretrain_command(
            [*_positional("d", "c", "o"), "--log-interval", "20", "--lr=5e-4"]),
        "finetune": launch.finetune_command(
            [finetune[k] for k in launch.FINETUNE_FIELDS] + ["--log-interval", "20",
                                                             "--lr=5e-4"]),
    }
    for name, cmd in commands.items():
        assert cmd.count("--log-interval") == 1, (name, cmd)
        assert cmd[cmd.index("--log-interval") + 1] == "20", (name, cmd)
        assert "--lr" not in cmd and "--lr=5e-4" in cmd, (name, cmd)
        assert cmd.count("--min-lr") == 1, (name, cmd)


def test_pretrain_launcher_trains_saves_logs_and_exports(llama_models, tmp_path):
    data, out = str(tmp_path / "tokens"), str(tmp_path / "out")
    harness.run(harness.make_token_dataset, 1, data)
    ckpt = os.path.join(llama_models["llama2"], "mcore")
    env = dict(os.environ, PYTHON=sys.executable, NPROC_PER_NODE="2")
    proc = harness.run_command(["bash", PRETRAIN_LAUNCHER, *_positional(data, ckpt, out)],
                               env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = [line for line in proc.stdout.splitlines() if line.startswith("iteration")]
    assert len(logs) == 6, proc.stdout[-3000:]
    # Quiet without --verbose: no Megatron-Core INFO lines (DDP buckets, dataset builder) and
    # no library warnings before the first iteration.
    for noise in ("INFO megatron.core", "Params for bucket", "Warning:"):
        assert noise not in proc.stdout + proc.stderr, noise
    for field in ("consumed tokens", "lm loss", "lr", "grad norm", "loss scale", "tokens/s",
                  "TFLOP/s/device"):
        assert field in logs[-1], logs[-1]
    (save,) = glob.glob(os.path.join(out, "checkpoint", "*"))
    assert sorted(os.listdir(save)) == sorted(
        ["hf", "iter_0000004", "iter_0000006", "latest_checkpointed_iteration.txt",
         "megatron_patch.json"])
    assert glob.glob(os.path.join(out, "tensorboard", "*", "events.out.tfevents.*"))

    # The trained checkpoint exports to a directory transformers loads.
    hf_out = str(tmp_path / "hf_out")
    harness.run_command([sys.executable, "-m", "megatron_patch", "convert", "megatron-to-hf", save,
                         hf_out], check=True, timeout=300)
    check = ("import sys, torch, transformers; m = transformers.AutoModelForCausalLM"
             ".from_pretrained(sys.argv[1]); print(m(torch.tensor([[1, 2, 3]])).logits.shape)")
    shape = harness.run_command([sys.executable, "-c", check, hf_out], timeout=300,
                                check=True).stdout
    assert "torch.Size([1, 3, 1000])" in shape


def test_pretrain_launcher_usage_on_wrong_argument_count():
    proc = harness.run_command(["bash", PRETRAIN_LAUNCHER, "dsw"],
                               env=dict(os.environ, PYTHON=sys.executable), timeout=120)
    assert proc.returncode == 2 and "usage: run_pretrain_" in proc.stderr


# run_finetune_* and run_text_generation_*: end to end (TP=2).

def _launch(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, NPROC_PER_NODE="2")
    proc = harness.run_command(["bash", os.path.join(ROOT, "examples", "llama2", script), *args],
                               env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_finetune_then_generate(llama_models, tmp_path):
    train, out = str(tmp_path / "train.jsonl"), str(tmp_path / "out")
    harness.write_sft_records(train)
    ckpt = os.path.join(llama_models["llama2"], "mcore")
    # ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
    # EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN VALID CKPT EPOCH OUTPUT_BASEPATH
    proc = _launch("run_finetune_megatron_llama.sh",
                   ["dsw", "", ROOT, "tiny", "3", "1e-3", "1e-4", "128", "64", "0", "fp32", "2",
                    "1", "sel", "false", "false", "true", train, train, ckpt, "2", out])
    assert "SFT data" in proc.stdout and "validation at iteration" not in proc.stdout
    iterations = [line for line in proc.stdout.splitlines() if line.startswith("iteration")]
    assert len(iterations) == 4  # 6 samples x 2 epochs / (3 per batch x DP 1)
    (run,) = os.listdir(os.path.join(out, "checkpoint"))
    tuned = os.path.join(out, "checkpoint", run)

    prompts, completions = str(tmp_path / "prompts.jsonl"), str(tmp_path / "completions.jsonl")
    with open(prompts, "w") as f:
        for q, _ in QA[:5]:
            f.write(json.dumps({"instruction": q}) + "\n")
    # ... CHECKPOINT_PATH MODEL_SIZE TP BS SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TOP_K
    # INPUT_SEQ_LEN OUTPUT_SEQ_LEN INPUT_FILE OUTPUT_FILE TOP_P TEMPERATURE REPETITION_PENALTY
    _launch("run_text_generation_megatron_llama.sh",
            ["dsw", "", ROOT, tuned, "tiny", "2", "2", "128", "64", "0", "fp32", "0", "64", "8",
             prompts, completions, "0", "1.0", "1.0"])
    with open(completions) as f:
        rows = [json.loads(line) for line in f]
    assert [r["instruction"] for r in rows] == [q for q, _ in QA[:5]]
    assert all(isinstance(r["completion"], str) for r in rows)
