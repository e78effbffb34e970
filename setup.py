from setuptools import find_packages, setup

setup(
    name="megatron-patch",
    version="0.1.0",
    description="Hugging Face LLMs on Megatron-Core: conversion, training and generation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_patch", "megatron_patch.*"]),
    install_requires=[
        "torch>=2.4",
        # 0.17 and later need Python 3.12.
        "megatron-core>=0.16,<0.17",
        "transformers>=4.45",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        # extend-vocab edits tokenizer.model through sentencepiece's sentencepiece_model_pb2 (a
        # sentencepiece release checks that protobuf is at least the version it was built with).
        "protobuf>=3.20,<8",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "tqdm>=4.60",
        # megatron-core's dist_checkpointing needs it (and hangs on save without it) but does
        # not declare it.
        "psutil>=5.9",
        "tensorboard>=2.10",
    ],
    # accelerate: transformers needs it to load (and dequantise) an FP8 checkpoint, the oracle
    # of tests/test_moe.py's FP8 import test. wandb: the offline W&B logging test. trl: the
    # oracle of the DPO losses (tests/test_dpo.py) and benchmarks/dpo_bench.py's baseline. peft:
    # the oracle of tests/test_lora.py (the runtime writes and reads PEFT adapters without it).
    extras_require={"test": ["pytest>=8", "ruff>=0.5", "accelerate>=1.0", "wandb>=0.16",
                             "trl>=1.0", "peft>=0.13"]},
    entry_points={"console_scripts": ["megatron-patch=megatron_patch.cli:main"]},
)
