"""The shell launchers: toolkits/model_checkpoints_convertor/llama/model_convertor.sh.

Everything runs in subprocesses (the parent does no torch computation: the suite forks workers);
the parent compares tensors through safetensors' numpy loader.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
