#!/usr/bin/env bash
# Supervised fine-tuning (gemma: Gemma 2 and Gemma 3 text); the architecture comes from
# PRETRAIN_CHECKPOINT_PATH.
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
# EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH
# PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH [EXTRA FLAGS...]
exec bash "$(dirname "$0")/../common/launch.sh" finetune "$@"
