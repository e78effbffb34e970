"""RLHF on Megatron-Core models: reward models (reward.py) and preference optimisation."""
