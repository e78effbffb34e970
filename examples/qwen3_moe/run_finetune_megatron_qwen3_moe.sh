#!/usr/bin/env bash
# Supervised fine-tuning (qwen3_moe); the architecture comes from PRETRAIN_CHECKPOINT_PATH.
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
# EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH
# PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH [EXTRA FLAGS...]
# MoE: pass --expert-model-parallel-size N after the positional arguments (EP splits the data
# parallel ranks; the number of experts must be divisible by N).
exec bash "$(dirname "$0")/../common/launch.sh" finetune "$@"
