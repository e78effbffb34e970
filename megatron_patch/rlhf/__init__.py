"""Reinforcement learning from feedback on Megatron-Core models (reward models, DPO, PPO, GRPO)."""
