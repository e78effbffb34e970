#!/usr/bin/env bash
# The end-to-end demo on the embedded tiny Llama-2-style model, on CPU, into demo_output/:
# HF -> Megatron-Core -> parity check at TP=2 with sequence parallelism -> HF, bit-exact.
# Sets up .venv first (scripts/setup.sh). Each step is a function listed in STEPS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh

export PATH="$ROOT/.venv/bin:$PATH"
# CPU mode (gloo) even where CUDA is present; it is automatic where it is not.
export MEGATRON_PATCH_CPU="${MEGATRON_PATCH_CPU:-1}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Hide megatron-core's warnings about Transformer Engine/Apex and deprecations, which say nothing
# about the demo on CPU; PYTHONWARNINGS=default shows them.
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
OUT=demo_output

make_tiny() {
    megatron-patch make-tiny "$OUT/hf"
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

STEPS=(make_tiny hf_to_megatron verify_tp2_sp megatron_to_hf compare_roundtrip)

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
