"""Process groups: torch.distributed (NCCL on GPU, gloo in CPU mode) and Megatron-Core's layout."""

from __future__ import annotations

import os

import torch

from megatron_patch import cpu_mode, launch


def initialize(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
               virtual_pipeline_model_parallel_size: int | None = None,
               expert_model_parallel_size: int = 1, seed: int = 1234,
               expert_tensor_parallel_size: int | None = None) -> None:
    """Join (or create, for a lone process) the process group and set up Megatron's layout.

    Without CUDA (or with MEGATRON_PATCH_CPU=1) this first switches CPU mode on. Under torchrun
    the usual RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT variables are used;
    a process started without them becomes a world of one, and the environment is left as it
    is. expert_tensor_parallel_size:
    Megatron-Core's (default: TP); a model with expert biases (GPT-OSS) needs 1
    (models.expert_tensor_parallel_size).
    """
    from megatron.core import parallel_state

    # Every entry point (the CLI's commands, the trainer, generation, verify workers, the API)
    # sets up its process here, before building a model: CPU mode is switched on here, not as a
    # side effect of an import.
    cpu_mode.maybe_enable()
    if launch.under_torchrun():
        launch.exit_with_parent()  # a worker must not outlive torchrun
    if not torch.distributed.is_initialized():
        backend = "gloo" if cpu_mode.is_enabled() else "nccl"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:
            torch.distributed.init_process_group(backend=backend)
        else:
            # A world of one through an in-process store, not the launcher's variables: set in
            # os.environ they would tell other libraries in this process (accelerate, and so
            # transformers' and TRL's trainers) that it is one rank of a distributed launch.
            torch.distributed.init_process_group(
                backend=backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    world = torch.distributed.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by TP={tensor_model_parallel_size} x "
            f"PP={pipeline_model_parallel_size}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
    )
    seed_all(seed)


def seed_all(seed: int) -> None:
    """Seed torch's generator and Megatron's model-parallel RNG streams (as `initialize` does):
    a second model built in an initialised process starts from the same RNG state as a first."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def is_last_rank() -> bool:
    """The rank that prints and logs results: under pipeline parallelism the last stage is the
    one that has the loss and the logits."""
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def print_last_rank(message: str) -> None:
    if is_last_rank():
        print(message, flush=True)


def print_rank0(message: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(message, flush=True)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
