"""Importing this module registers rlhf's training modes with the Trainer's registry
(`training.modes.register_mode`): rm and dpo, which --train-mode offers (in this order, after
pretrain and finetune) and whose own flags `megatron-patch train` shows, and RL's policy and
critic, which `megatron-patch rl` runs. The entry points that offer or run them (the train and
rl commands) import it; `training` never names them."""

from megatron_patch.rlhf.dpo import DPOMode
from megatron_patch.rlhf.policy import PolicyMode
from megatron_patch.rlhf.ppo import CriticMode
from megatron_patch.rlhf.reward import RewardMode
from megatron_patch.training.modes import register_mode

register_mode(RewardMode.name, RewardMode)
register_mode(DPOMode.name, DPOMode)
register_mode("policy", PolicyMode, selectable=False)
register_mode(CriticMode.name, CriticMode, selectable=False)
