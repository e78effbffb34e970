#!/usr/bin/env bash
# Vocabulary extension (e.g. Chinese words for Llama), mapped onto `megatron-patch extend-vocab`.
#
#   extend_vocab.sh SOURCE_DIR TARGET_DIR MODE INPUT [VOCAB_SIZE] [EXTRA FLAGS...]
#
# SOURCE_DIR   an HF model directory, or a checkpoint made by `megatron-patch convert`/training
# TARGET_DIR   the extended model (same kind as SOURCE_DIR); must not exist or be empty
# MODE INPUT   sp CORPUS_SP.model  add the pieces of a sentencepiece model
#              words WORDS.txt     add the words of a file, one a line
#              train CORPUS.txt    learn VOCAB_SIZE sentencepiece pieces from a text file, add them
# VOCAB_SIZE   pieces to learn (MODE train only; default 20000)
# EXTRA FLAGS  passed on, e.g. --make-vocab-size-divisible-by 128 --tensor-model-parallel-size 8
#
# PYTHON chooses the interpreter (default: the first with torch of an active env, the
# repository's .venv, python3/python on PATH; see scripts/find_python.sh). The repository root
# goes on PYTHONPATH, so this works without installing megatron-patch (its dependencies must
# be installed).
set -euo pipefail

usage() {
    echo "usage: $0 SOURCE_DIR TARGET_DIR {sp|words|train} INPUT [VOCAB_SIZE] [EXTRA FLAGS...]" >&2
    echo "  e.g. $0 Llama-2-7b-hf Llama-2-7b-zh train zh_corpus.txt 20000" >&2
    exit 2
}

[ "$#" -ge 4 ] || usage
SOURCE_DIR=$1
TARGET_DIR=$2
MODE=$3
INPUT=$4
shift 4

case "$MODE" in
    sp) PIECES=(--sp-model "$INPUT") ;;
    words) PIECES=(--words "$INPUT") ;;
    train)
        VOCAB_SIZE=20000
        if [ "$#" -ge 1 ] && [[ "$1" =~ ^[0-9]+$ ]]; then
            VOCAB_SIZE=$1
            shift
        fi
        PIECES=(--train-from "$INPUT" --vocab-size "$VOCAB_SIZE") ;;
    *) usage ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
. "$ROOT/scripts/find_python.sh"
find_python "$(basename "$0")" "$ROOT"

exec "$PYTHON" -m megatron_patch extend-vocab "$SOURCE_DIR" "$TARGET_DIR" \
    "${PIECES[@]}" "$@"
