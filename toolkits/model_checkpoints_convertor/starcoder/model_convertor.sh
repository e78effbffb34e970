#!/usr/bin/env bash
# StarCoder / SantaCoder (GPTBigCodeForCausalLM: learned positions, multi-query) checkpoints; the family comes from config.json.
# MEGATRON_PATH SOURCE_DIR TARGET_DIR TP PP MODEL_NAME EXTRA_VOCAB_SIZE MG2HF
exec bash "$(dirname "$0")/../common/model_convertor.sh" "$@"
