#!/usr/bin/env bash
# JSON lines -> Megatron-Core mmap dataset (.bin/.idx), mapped onto
# `python -m megatron_patch.data.preprocess` (the same as `megatron-patch preprocess`).
#
#   preprocess_data.sh INPUT OUTPUT_PREFIX TOKENIZER [WORKERS] [JSON_KEY]
#
# INPUT          a .jsonl/.json file (one object per line), a glob or a comma-separated list
# OUTPUT_PREFIX  writes OUTPUT_PREFIX_JSON_KEY_document.bin and .idx
# TOKENIZER      an HF tokenizer directory (or hub name) or a sentencepiece .model file
# WORKERS        tokenizing processes (default 1)
# JSON_KEY       the key holding the text (default text)
#
# The tokenizer's EOS id is appended to every document. PYTHON chooses the interpreter (default:
# the first with torch of an active env, the repository's .venv, python3/python on PATH; see
# scripts/find_python.sh). The repository root goes on PYTHONPATH, so this works without
# installing megatron-patch (its dependencies must be installed).
set -euo pipefail

if [ "$#" -lt 3 ] || [ "$#" -gt 5 ]; then
    echo "usage: $0 INPUT OUTPUT_PREFIX TOKENIZER [WORKERS] [JSON_KEY]" >&2
    echo "  e.g. $0 'corpus/*.jsonl' data/corpus Llama-2-7b-hf 8 text" >&2
    exit 2
fi

INPUT=$1
OUTPUT_PREFIX=$2
TOKENIZER=$3
WORKERS=${4:-1}
JSON_KEY=${5:-text}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
. "$ROOT/scripts/find_python.sh"
find_python "$(basename "$0")" "$ROOT"

exec "$PYTHON" -m megatron_patch.data.preprocess --input "$INPUT" \
    --output-prefix "$OUTPUT_PREFIX" --tokenizer-model "$TOKENIZER" --workers "$WORKERS" \
    --json-keys "$JSON_KEY" --append-eod
