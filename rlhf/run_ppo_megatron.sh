#!/usr/bin/env bash
# PPO: actor, critic, frozen reference and reward, with rollouts from the trained model
# itself (megatron-patch rl --algorithm ppo). REWARD: a rule-based reward function module:function
# (the module on PYTHONPATH or in the current directory) or a reward-model checkpoint directory.
# PRETRAIN_CHECKPOINT_PATH: an SFT or converted model; a run resumes from its own checkpoints
# under OUTPUT_BASEPATH when they exist. Every step logs rewards, KL, entropy, clipping, ratios
# and the rollout-vs-train log-prob difference. See rlhf/README.md.
# ENV MEGATRON_PATH MEGATRON_PATCH_PATH MODEL_SIZE BATCH_SIZE LR MIN_LR SEQ_LEN PR TP AC DO
# PROMPT_DATASET_PATH REWARD PRETRAIN_CHECKPOINT_PATH TRAIN_ITERS ROLLOUT_BATCH_SIZE NUM_SAMPLES
# MAX_NEW_TOKENS SAVE_INTERVAL OUTPUT_BASEPATH [EXTRA FLAGS...]
exec bash "$(dirname "$0")/../examples/common/launch.sh" ppo "$@"
