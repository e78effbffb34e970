#!/usr/bin/env bash
# Reward-model training (--train-mode rm) on preference pairs (gemma), from the language or
# reward model PRETRAIN_CHECKPOINT_PATH, which decides the architecture. See rlhf/README.md.
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
# EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH
# PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH [EXTRA FLAGS...]
exec bash "$(dirname "$0")/../common/launch.sh" rm "$@"
