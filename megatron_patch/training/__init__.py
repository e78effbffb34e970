"""One training loop on Megatron-Core, shared by pretraining, SFT and RLHF.

A mode plugs in a dataset and a forward-step/loss function; the loop owns parallelism,
optimizer, schedule, checkpoints and logging.
"""
