#!/usr/bin/env bash
# DPO on preference pairs (--train-mode dpo), any family. PRETRAIN_CHECKPOINT_PATH: an SFT or
# converted language model, which is both the policy's start and the frozen reference; a run
# resumes from its own checkpoints under OUTPUT_BASEPATH when they exist (keeping that
# reference). DPO's settings go among the extra flags: --dpo-beta 0.1 --dpo-loss sigmoid|ipo
# --dpo-label-smoothing 0.0. See rlhf/README.md.
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
# EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH
# PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH [EXTRA FLAGS...]
exec bash "$(dirname "$0")/../examples/common/launch.sh" dpo "$@"
