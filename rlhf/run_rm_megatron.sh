#!/usr/bin/env bash
# Reward-model training on preference pairs (--train-mode rm), any family with an HF
# *ForSequenceClassification class. PRETRAIN_CHECKPOINT_PATH: an SFT or converted language model
# (a score head is created) or a converted HF reward model; a run resumes from its own
# checkpoints under OUTPUT_BASEPATH when they exist. See rlhf/README.md.
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN
# EXTRA_VOCAB_SIZE PR TP PP AC DO FL SP TRAIN_DATASET_PATH VALID_DATASET_PATH
# PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH [EXTRA FLAGS...]
exec bash "$(dirname "$0")/../examples/common/launch.sh" rm "$@"
