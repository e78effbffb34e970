#!/usr/bin/env bash
# Supervised fine-tuning (gpt_oss: GPT-OSS); the architecture comes from PRETRAIN_CHECKPOINT_PATH.
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
# EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH
# PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH [EXTRA FLAGS...]
# MoE: pass --expert-model-parallel-size N after the positional arguments (EP splits the data
# parallel ranks; the number of experts must be divisible by N). Training runs at TP=1 for now:
# GPT-OSS's biased experts need expert tensor parallel size 1, which the trainer does not set.
exec bash "$(dirname "$0")/../common/launch.sh" finetune "$@"
