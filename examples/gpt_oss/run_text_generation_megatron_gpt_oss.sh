#!/usr/bin/env bash
# Offline text generation (gpt_oss: GPT-OSS) from a JSON-lines prompt file.
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH CHECKPOINT_PATH MODEL_SIZE TP BS SEQ_LEN PAD_LEN
# EXTRA_VOCAB_SIZE PR TOP_K INPUT_SEQ_LEN OUTPUT_SEQ_LEN INPUT_FILE OUTPUT_FILE TOP_P
# TEMPERATURE REPETITION_PENALTY [EXTRA FLAGS...]
exec bash "$(dirname "$0")/../common/launch.sh" generate "$@"
