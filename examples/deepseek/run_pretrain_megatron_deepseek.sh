#!/usr/bin/env bash
# Continued pretraining (deepseek: DeepSeek-V2, V2-Lite, V3); the architecture comes from
# PRETRAIN_CHECKPOINT_PATH.
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN
# PAD_LEN EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP SAVE_INTERVAL DATASET_PATH
# PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH [EXTRA FLAGS...]
# MoE: pass --expert-model-parallel-size N after the positional arguments (EP splits the data
# parallel ranks; the number of experts must be divisible by N).
exec bash "$(dirname "$0")/../common/launch.sh" pretrain "$@"
