"""The CPU platform: each patch does its job, only where wanted, once."""

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
