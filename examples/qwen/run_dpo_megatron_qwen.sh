#!/usr/bin/env bash
# DPO (--train-mode dpo) on preference pairs (qwen): PRETRAIN_CHECKPOINT_PATH is the policy's
# start and the frozen reference, and decides the architecture. See rlhf/README.md.
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
# EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH
# PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH [EXTRA FLAGS...]
exec bash "$(dirname "$0")/../common/launch.sh" dpo "$@"
