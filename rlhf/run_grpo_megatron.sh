#!/usr/bin/env bash
# GRPO: completions sampled by the trained model itself, group-normalised advantages, k3 KL
# to the frozen starting model (megatron-patch rl --algorithm grpo). REWARD: a rule-based reward function module:function
# (the module on PYTHONPATH or in the current directory) or a reward-model checkpoint directory.
# PRETRAIN_CHECKPOINT_PATH: an SFT or converted model; a run resumes from its own checkpoints
# under OUTPUT_BASEPATH when they exist. Every step logs rewards, KL, entropy, clipping, ratios
# and the rollout-vs-train log-prob difference. See rlhf/README.md.
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PR TP AC DO
# PROMPT_DATASET_PATH REWARD PRETRAIN_CHECKPOINT_PATH TRAIN_ITERS ROLLOUT_BATCH_SIZE NUM_SAMPLES
# MAX_NEW_TOKENS SAVE_INTERVAL OUTPUT_BASEPATH [EXTRA FLAGS...]
exec bash "$(dirname "$0")/../examples/common/launch.sh" grpo "$@"
