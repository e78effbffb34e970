"""The CPU platform: each patch does its job, only where wanted, once."""

import os

import harness


def _probe() -> dict:
    import torch
    from megatron.core import parallel_state, tensor_parallel

    from megatron_patch import cpu_mode, parallel

    parallel.initialize(2, 1, seed=42)
    rank = parallel_state.get_tensor_model_parallel_rank()
    tracker = tensor_parallel.get_cuda_rng_tracker()

    before = torch.get_rng_state()
    with tracker.fork():
        in_fork = torch.rand(4)
    restored = torch.equal(torch.get_rng_state(), before)
    with tracker.fork():
        second_fork = torch.rand(4)

    parallel.initialize(2, 1, seed=42)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        reseeded = torch.rand(4)

    # Same seed -> same default stream on every TP rank (data-parallel region).
    default_stream = torch.rand(3)

    wrapped_once = not hasattr(torch.zeros.__wrapped__, "__wrapped__")
    cpu_mode.enable()  # idempotent
    with torch.device("meta"):
        meta_arange = torch.arange(3).device.type
    return {
        "enabled": cpu_mode.is_enabled(),
        "zeros_device": torch.zeros(2, device="cuda").device.type,
        "tensor_device": torch.tensor([1.0], device=torch.device("cuda")).device.type,
        "current_device": str(torch.cuda.current_device()),
        "dot_cuda": torch.ones(1).cuda().device.type,
        "type_name": torch.ones(1).type(),
        "type_cast": torch.ones(1).type(torch.float64).dtype == torch.float64,
        "meta_arange": meta_arange,
        "wrapped_once": wrapped_once and torch.zeros.__wrapped__ is not torch.zeros,
        "still_wrapped_once": not hasattr(torch.zeros.__wrapped__, "__wrapped__"),
        "fork_restores_default": restored,
        "fork_advances": not torch.equal(in_fork, second_fork),
        "fork_reproducible": torch.equal(in_fork, reseeded),
        "in_fork": in_fork.tolist(),
        "default_stream": default_stream.tolist(),
        "rank": rank,
    }


def test_cpu_patches_under_tp2():
    results = harness.run(_probe, 2)
    for r in results:
        assert r["enabled"]
        assert r["zeros_device"] == r["tensor_device"] == r["dot_cuda"] == "cpu"
        assert r["current_device"] == "cpu"
        assert r["type_name"] == "torch.cuda.FloatTensor" and r["type_cast"]
        # torch.device("meta") must keep working (transformers builds models under it).
        assert r["meta_arange"] == "meta"
        assert r["wrapped_once"] and r["still_wrapped_once"]
        assert r["fork_restores_default"] and r["fork_advances"] and r["fork_reproducible"]
    # The model-parallel RNG differs across TP ranks (dropout inside TP regions) ...
    assert results[0]["in_fork"] != results[1]["in_fork"]
    # ... while the default generator agrees (dropout outside TP regions).
    assert results[0]["default_stream"] == results[1]["default_stream"]


def test_wanted_follows_environment(monkeypatch):
    from megatron_patch import cpu_mode

    monkeypatch.setenv(cpu_mode.ENV_VAR, "1")
    assert cpu_mode.wanted()
    monkeypatch.setenv(cpu_mode.ENV_VAR, "0")
    assert not cpu_mode.wanted()
    monkeypatch.delenv(cpu_mode.ENV_VAR)
    import torch

    assert cpu_mode.wanted() == (not torch.cuda.is_available())


def test_rng_context_warning_is_filtered_and_others_are_not(caplog):
    """CPU mode drops megatron's 'CPU RNG state changed' warning (always true there), only it."""
    import logging

    from megatron.core.tensor_parallel import random as mcore_random

    from megatron_patch import cpu_mode

    assert cpu_mode.is_enabled()
    logger = logging.getLogger(mcore_random.__name__)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("CPU RNG state changed within GPU RNG context")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_importing_the_library_patches_nothing():
    """CPU mode is switched on by entry points (parallel.initialize, the tests' conftest), never
    by an import: a fresh process that imports the library's modules keeps torch as it was."""
    import subprocess
    import sys

    probe = (
        "import torch\n"
        "originals = (torch.cuda.current_device, torch.Tensor.cuda, torch.Tensor.type, "
        "torch.zeros, torch.cuda.synchronize)\n"
        "import megatron_patch.api, megatron_patch.models, megatron_patch.parallel\n"
        "import megatron_patch.convert.hf_megatron, megatron_patch.generation\n"
        "from megatron_patch import cpu_mode\n"
        "assert not cpu_mode.is_enabled(), 'an import switched CPU mode on'\n"
        "now = (torch.cuda.current_device, torch.Tensor.cuda, torch.Tensor.type, torch.zeros, "
        "torch.cuda.synchronize)\n"
        "changed = [o.__name__ for o, n in zip(originals, now) if o is not n]\n"
        "assert not changed, f'importing megatron_patch patched torch: {changed}'\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# What torchrun (and the test harness's workers) set; a plain `python script.py` has none.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "OMP_NUM_THREADS")


def _lone_process_state(model_root: str, train: str) -> dict:
    """In a worker made a plain process (no launcher variables, no OMP_NUM_THREADS, as a
    script that trains with transformers or TRL after megatron-patch): os.environ and torch's
    thread count before, after parallel.initialize, after a DPO step through the Trainer, and
    what accelerate then concludes about this process."""
    import torch

    from megatron_patch import parallel
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.loop import Trainer

    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    threads = torch.get_num_threads() + 2  # neither this worker's 1 nor a core count it derives
    torch.set_num_threads(threads)
    states = {"before": (dict(os.environ), threads)}
    parallel.initialize()
    parallel.destroy()
    states["initialize"] = (dict(os.environ), torch.get_num_threads())
    trainer = Trainer(parse_args([
        "--train-mode", "dpo", "--load", os.path.join(model_root, "mcore"),
        "--train-data-path", train, "--seq-length", "64", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-4",
        "--eval-interval", "100", "--log-interval", "100"]))
    trainer.train()
    parallel.destroy()
    states["trainer"] = (dict(os.environ), torch.get_num_threads())
    from accelerate import PartialState

    state = PartialState(cpu=True)
    states["accelerate"] = (dict(os.environ), torch.get_num_threads())
    return {"states": states, "accelerate": [str(state.distributed_type), state.num_processes]}


def test_a_lone_process_leaves_the_environment_and_thread_count_alone(llama_models, tmp_path):
    """parallel.initialize and a Trainer run in a process without a launcher change neither
    os.environ nor torch's thread count; so accelerate (transformers', TRL's trainers) run after
    them in the same process sees a single process, and keeps the thread count (it sets it for
    what it takes to be one rank of a CPU launch)."""
    import json

    from megatron_patch.tiny import QA

    train = str(tmp_path / "pairs.jsonl")
    with open(train, "w") as f:
        for i, (q, a) in enumerate(QA[:2]):
            f.write(json.dumps({"prompt": q, "chosen": a, "rejected": QA[i + 1][1]}) + "\n")
    (r,) = harness.run(_lone_process_state, 1, llama_models["llama2"], train)
    env, threads = r["states"]["before"]
    for step in ("initialize", "trainer", "accelerate"):
        after, after_threads = r["states"][step]
        changed = {k: (env.get(k), after.get(k)) for k in env.keys() | after.keys()
                   if env.get(k) != after.get(k)}
        assert not changed and after_threads == threads, (step, changed, threads, after_threads)
    assert r["accelerate"] == ["DistributedType.NO", 1], r["accelerate"]
