#!/usr/bin/env bash
# Pai-Megatron-Patch's classic converter interface, mapped onto `megatron-patch convert`,
# shared by every family (toolkits/model_checkpoints_convertor/<family>/model_convertor.sh).
#
#   model_convertor.sh MEGATRON_PATH SOURCE_DIR TARGET_DIR TP PP MODEL_NAME EXTRA_VOCAB_SIZE MG2HF
#
# MEGATRON_PATH      "" or a Megatron-LM tree, put first on PYTHONPATH
# TP                 HF -> Megatron: pad the vocabulary for this TP size (the checkpoint loads at
#                    any TP/PP; it is resharded on load)
# PP                 accepted and ignored
# MODEL_NAME         informational, e.g. llama2-7b
# EXTRA_VOCAB_SIZE   HF -> Megatron: extra embedding rows before padding
# MG2HF              true: Megatron -> HF; anything else: HF -> Megatron
#
# PYTHON chooses the interpreter (default: the first with torch of an active env, the
# repository's .venv, python3/python on PATH; see scripts/find_python.sh). The repository root
# goes on PYTHONPATH, so this works without installing megatron-patch (its dependencies must
# be installed).
set -euo pipefail

if [ "$#" -ne 8 ]; then
    echo "usage: $0 MEGATRON_PATH SOURCE_DIR TARGET_DIR TP PP MODEL_NAME EXTRA_VOCAB_SIZE MG2HF" >&2
    echo "  e.g. $0 \"\" Llama-2-7b-hf llama2-7b-mcore 1 1 llama2-7b 0 false" >&2
    exit 2
fi

MEGATRON_PATH=$1
SOURCE_DIR=$2
TARGET_DIR=$3
TP=$4
PP=$5
MODEL_NAME=$6
EXTRA_VOCAB_SIZE=$7
MG2HF=$8

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
export PYTHONPATH="${MEGATRON_PATH:+$MEGATRON_PATH:}$ROOT${PYTHONPATH:+:$PYTHONPATH}"
. "$ROOT/scripts/find_python.sh"
find_python "$(basename "$0")" "$ROOT"

if [ "$MG2HF" = true ]; then
    echo "model_convertor: $MODEL_NAME: Megatron-Core $SOURCE_DIR -> HF $TARGET_DIR" \
         "(TP, PP and EXTRA_VOCAB_SIZE come from the checkpoint)"
    exec "$PYTHON" -m megatron_patch convert megatron-to-hf "$SOURCE_DIR" "$TARGET_DIR"
fi

echo "model_convertor: $MODEL_NAME: HF $SOURCE_DIR -> Megatron-Core $TARGET_DIR" \
     "(vocab padded for TP=$TP; PP=$PP ignored: the checkpoint loads at any TP/PP)"
exec "$PYTHON" -m megatron_patch convert hf-to-megatron "$SOURCE_DIR" "$TARGET_DIR" \
    --tensor-model-parallel-size "$TP" --extra-vocab-size "$EXTRA_VOCAB_SIZE"
