#!/usr/bin/env bash
# The end-to-end demo on the embedded tiny Llama-2-style model, on CPU, into demo_output/:
# HF -> Megatron-Core -> parity check at TP=2 with sequence parallelism -> HF, bit-exact;
# then continued pretraining at TP=2 on a small corpus, export to HF, supervised fine-tuning on
# a few question/answer pairs, greedy generation from the fine-tuned model, then DPO towards
# enthusiastic answers and generation from the DPO policy, and GRPO towards the same style with a
# rule-based reward (rollouts from the trained model) and generation from the GRPO policy.
# Sets up .venv first (scripts/setup.sh). Each step is a function listed in STEPS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh

export PATH="$ROOT/.venv/bin:$PATH"
# CPU mode (gloo) even where CUDA is present; it is automatic where it is not.
export MEGATRON_PATCH_CPU="${MEGATRON_PATCH_CPU:-1}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=demo_output

make_tiny() {
    megatron-patch make-tiny "$OUT/hf" --demo-data "$OUT/data"
}

hf_to_megatron() {
    megatron-patch convert hf-to-megatron "$OUT/hf" "$OUT/mcore"
}

verify_tp2_sp() {
    megatron-patch verify "$OUT/hf" "$OUT/mcore" --tp 2 --sp
}

megatron_to_hf() {
    megatron-patch convert megatron-to-hf "$OUT/mcore" "$OUT/hf_roundtrip"
}

compare_roundtrip() {
    python - "$OUT/hf" "$OUT/hf_roundtrip" <<'PY'
import glob
import os
import sys

import torch
from safetensors import safe_open


def load(d):
    out = {}
    for path in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


a, b = load(sys.argv[1]), load(sys.argv[2])
assert a.keys() == b.keys(), f"names differ: {sorted(a.keys() ^ b.keys())}"
bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
       or not torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))]
assert not bad, f"tensors differ: {bad}"
n = sum(t.numel() for t in a.values())
print(f"round trip bit-exact: {len(a)} tensors, {n:,} parameters, "
      f"{sorted({str(t.dtype) for t in a.values()})}")
PY
}

preprocess() {
    megatron-patch preprocess --input "$OUT/data/corpus.jsonl" --output-prefix "$OUT/data/corpus" \
        --tokenizer-model "$OUT/hf" --workers 2
}

# The classic positional launchers: ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE
# GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP SAVE_INTERVAL
# DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH
pretrain_tp2() {
    NPROC_PER_NODE=2 bash examples/llama2/run_pretrain_megatron_llama.sh \
        dsw "" "$ROOT" tiny 4 8 3e-3 3e-4 64 64 0 fp32 2 1 sel false false true 20 \
        "$OUT/data/corpus_text_document" "$OUT/mcore" $((40 * 8 * 64)) $((4 * 8 * 64)) \
        "$OUT/pretrain"
}

export_pretrained() {
    megatron-patch convert megatron-to-hf "$OUT"/pretrain/checkpoint/* "$OUT/hf_pretrained"
}

# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
# EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH
# PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH
finetune() {
    NPROC_PER_NODE=1 bash examples/llama2/run_finetune_megatron_llama.sh \
        dsw "" "$ROOT" tiny 6 3e-3 3e-4 64 64 0 fp32 1 1 none false false false \
        "$OUT/data/sft.jsonl" none "$(echo "$OUT"/pretrain/checkpoint/*)" 60 "$OUT/finetune" \
        --log-interval 20
}

# ENV MEGATRON_PATH MEGATRON_PATCH_PATH CHECKPOINT_PATH MODEL_SIZE TP BS SEQ_LEN PAD_LEN
# EXTRA_VOCAB_SIZE PR TOP_K INPUT_SEQ_LEN OUTPUT_SEQ_LEN INPUT_FILE OUTPUT_FILE TOP_P TEMPERATURE
# REPETITION_PENALTY  (TOP_K=0 and TOP_P=0: greedy)
generate_tp2() {
    NPROC_PER_NODE=2 bash examples/llama2/run_text_generation_megatron_llama.sh \
        dsw "" "$ROOT" "$(echo "$OUT"/finetune/checkpoint/*)" tiny 2 6 64 64 0 fp32 0 64 12 \
        "$OUT/data/prompts.jsonl" "$OUT/generated.jsonl" 0 1.0 1.0
    cat "$OUT/generated.jsonl"
}

# DPO from the fine-tuned model (policy start and frozen reference), which answers in either
# style, on pairs that prefer the enthusiastic answer; the fine-tuning fields, as the SFT
# launcher takes them.
dpo() {
    NPROC_PER_NODE=1 bash rlhf/run_dpo_megatron.sh \
        dsw "" "$ROOT" tiny 6 5e-4 5e-4 64 64 0 fp32 1 1 none false false false \
        "$OUT/data/preferences.jsonl" none "$(echo "$OUT"/finetune/checkpoint/*)" 10 "$OUT/dpo" \
        --log-interval 5
}

# Greedy answers of RUN's policy (its checkpoint under $OUT/RUN), which must all be in the
# enthusiastic style. Arguments: RUN NAME (as printed).
generate_enthusiastic() {
    NPROC_PER_NODE=1 bash examples/llama2/run_text_generation_megatron_llama.sh \
        dsw "" "$ROOT" "$(echo "$OUT"/"$1"/checkpoint/*)" tiny 1 6 64 64 0 fp32 0 64 12 \
        "$OUT/data/prompts.jsonl" "$OUT/generated_$1.jsonl" 0 1.0 1.0
    cat "$OUT/generated_$1.jsonl"
    python - "$OUT/generated_$1.jsonl" "$2" <<'PY'
import json
import sys

answers = [json.loads(line)["completion"] for line in open(sys.argv[1])]
plain = [a for a in answers if not a.startswith("Wow!")]
assert not plain, f"the {sys.argv[2]} policy still answers plainly: {plain}"
print(f"all {len(answers)} answers of the {sys.argv[2]} policy are in the enthusiastic style")
PY
}

generate_dpo() {
    generate_enthusiastic dpo DPO
}

# GRPO from the fine-tuned model with a rule-based reward (1 for an answer in the enthusiastic
# style): reinforcement learning with rollouts from the trained model itself, towards the style
# DPO learned from pairs above. Fields: ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE
# BATCH_SIZE LR MIN_LR SEQ_LEN PR TP AC DO PROMPT_DATASET_PATH REWARD PRETRAIN_CHECKPOINT_PATH
# TRAIN_ITERS ROLLOUT_BATCH_SIZE NUM_SAMPLES MAX_NEW_TOKENS SAVE_INTERVAL OUTPUT_BASEPATH
grpo() {
    cat > "$OUT/demo_rewards.py" <<'PY'
def enthusiastic(record, prompt, completion):
    """1.0 for an answer in the enthusiastic style, else 0.0."""
    return float(completion.lstrip().startswith("Wow!"))
PY
    PYTHONPATH="$OUT" NPROC_PER_NODE=1 bash rlhf/run_grpo_megatron.sh \
        dsw "" "$ROOT" tiny 8 2e-4 2e-4 64 fp32 1 none false "$OUT/data/prompts.jsonl" \
        demo_rewards:enthusiastic "$(echo "$OUT"/finetune/checkpoint/*)" 10 3 8 8 10 \
        "$OUT/grpo" --lr-decay-style constant
}

generate_grpo() {
    generate_enthusiastic grpo GRPO
}

STEPS=(make_tiny hf_to_megatron verify_tp2_sp megatron_to_hf compare_roundtrip preprocess
       pretrain_tp2 export_pretrained finetune generate_tp2 dpo generate_dpo grpo generate_grpo)

rm -rf "$OUT"
mkdir -p "$OUT"
start=$SECONDS
for i in "${!STEPS[@]}"; do
    echo
    echo "=== [$((i + 1))/${#STEPS[@]}] ${STEPS[$i]}"
    "${STEPS[$i]}"
done
echo
echo "=== demo finished in $((SECONDS - start)) s; outputs in $OUT/"
