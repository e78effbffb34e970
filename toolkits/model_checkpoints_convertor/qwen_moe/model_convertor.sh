#!/usr/bin/env bash
# Qwen1.5-MoE / Qwen2-MoE (Qwen2MoeForCausalLM) checkpoints, every expert of every layer; the
# checkpoint loads at any TP/PP/EP. MEGATRON_PATH SOURCE_DIR TARGET_DIR TP PP MODEL_NAME
# EXTRA_VOCAB_SIZE MG2HF
exec bash "$(dirname "$0")/../common/model_convertor.sh" "$@"
