"""examples/<family>/run_pretrain_*.sh: the classic positional interface, end to end."""

import glob
import os
import sys

import harness
import pytest
from test_training import _make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "examples", "llama2", "run_pretrain_megatron_llama.sh")


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


def test_switches_map_to_megatron_flags(monkeypatch):
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


def test_launcher_trains_saves_logs_and_exports(llama_models, tmp_path):
    data, out = str(tmp_path / "tokens"), str(tmp_path / "out")
    harness.run(_make_dataset, 1, data)
    ckpt = os.path.join(llama_models["llama2"], "mcore")
    env = dict(os.environ, PYTHON=sys.executable, NPROC_PER_NODE="2")
    proc = harness.run_command(["bash", LAUNCHER, *_positional(data, ckpt, out)], env=env,
                          timeout=600)
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


def test_wrong_argument_count_prints_usage():
    proc = harness.run_command(["bash", LAUNCHER, "dsw"],
                          env=dict(os.environ, PYTHON=sys.executable), timeout=120)
    assert proc.returncode == 2 and "usage: run_pretrain_" in proc.stderr
