"""run_finetune_* and run_text_generation_*: classic positional interfaces, end to end (TP=2)."""

import json
import os
import subprocess
import sys

import harness
from test_sft import QA, _write_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, NPROC_PER_NODE="2")
    proc = harness.run_command(["bash", os.path.join(ROOT, "examples", "llama2", script), *args],
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_finetune_then_generate(llama_models, tmp_path):
    train, out = str(tmp_path / "train.jsonl"), str(tmp_path / "out")
    _write_records(train)
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
