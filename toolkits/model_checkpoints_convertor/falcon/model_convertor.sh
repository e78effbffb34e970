#!/usr/bin/env bash
# Falcon 7B/40B/180B and Falcon2 (FalconForCausalLM: parallel attention + MLP) checkpoints; the family comes from config.json.
# MEGATRON_PATH SOURCE_DIR TARGET_DIR TP PP MODEL_NAME EXTRA_VOCAB_SIZE MG2HF
exec bash "$(dirname "$0")/../common/model_convertor.sh" "$@"
