"""Every zoo family's shell entry points exist, are executable and hand their arguments to the
common scripts: run with a stand-in interpreter that prints what it was given (no torch runs)."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


@pytest.mark.parametrize("family", FAMILIES)
def test_convertor_delegates_to_the_common_convertor(family, fake_python, tmp_path):
    script = os.path.join(ROOT, "toolkits", "model_checkpoints_convertor", family,
                          "model_convertor.sh")
    r = _run(script, ["", "src", "dst", "2", "1", f"{family}-7b", "0", "false"], fake_python,
             str(tmp_path))
    assert r.returncode == 0, r
    assert ("ARGS=-m megatron_patch convert hf-to-megatron src dst "
            "--tensor-model-parallel-size 2 --extra-vocab-size 0\n") in r.stdout, r
