"""Run a function on N forked ranks that form a gloo process group.

megatron.core is imported once by the test process; forking workers from it costs well under a
second, where a torchrun launch costs 13-25 s. The parent does no torch computation before
forking (forked children cannot use a thread pool the parent started), and workers return plain
Python data.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

# fp32 on CPU: megatron and transformers order their reductions differently (fused QKV matmul,
# vocab-parallel softmax, TP all-reduces), which moves logits by ~1e-6; these leave room for
# that and nothing more.
LOGITS_ATOL = 1e-4
LOSS_ATOL = 1e-5

_CTX = mp.get_context("fork")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue,
            kwargs: dict | None = None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        import torch

        torch.set_num_threads(1)
        result = fn(*args, **(kwargs or {}))
        queue.put((rank, True, result))
    except BaseException:  # report everything, including assertion failures, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron_patch import parallel

            parallel.destroy()
        finally:
            # os._exit skips the queue's feeder thread: flush it first or the result is lost.
            queue.close()
            queue.join_thread()
            os._exit(0)


def run(fn: Callable, world_size: int, *args: Any, timeout: float = 600,
        **kwargs: Any) -> list[Any]:
    """fn(*args, **kwargs) on every rank; returns the per-rank results, or raises with the
    worker traceback."""
    queue = _CTX.Queue()
    port = _free_port()
    procs = [_CTX.Process(target=_worker, args=(r, world_size, port, fn, args, queue, kwargs))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in procs:
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break  # the other ranks may now wait forever on a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def _save_then_die(nth_save: int, fn: Callable, args: tuple, kwargs: dict) -> None:
    import signal

    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save
    calls = []

    def save_then_die(*save_args, **save_kwargs):
        calls.append(1)
        real_save(*save_args, **save_kwargs)
        if len(calls) == nth_save:  # this checkpoint is written, not yet published
            os.kill(os.getpid(), signal.SIGKILL)

    dist_checkpointing.save = save_then_die
    fn(*args, **kwargs)


def run_killed_in_save(nth_save: int, fn: Callable, *args: Any, timeout: float = 300,
                       **kwargs: Any) -> int:
    """fn(*args, **kwargs) on one forked rank, killed (SIGKILL) inside its nth checkpoint save,
    once the files are written and before the checkpoint is published; returns the exit code
    (-9 when killed)."""
    proc = _CTX.Process(target=_worker, args=(0, 1, _free_port(), _save_then_die,
                                              (nth_save, fn, args, kwargs), _CTX.Queue()))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return proc.exitcode


def run_command(cmd: list[str], *, timeout: float = 600, env: dict | None = None,
                check: bool = False):
    """subprocess.run in its own process group, all of which is killed on timeout (a torchrun
    launch leaves its workers running if only the launcher is killed)."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-2000:]}"
                             f"\n{err[-2000:]}") from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-2000:]}"
                             f"\n{err[-2000:]}")
    return result


def differing_tensors(a_dir: str, b_dir: str) -> list[str]:
    """Names of tensors that differ (dtype, shape or any bit) between two HF directories."""
    import torch

    from megatron_patch.convert.hf_io import HFCheckpointReader

    a, b = HFCheckpointReader(a_dir), HFCheckpointReader(b_dir)
    problems = sorted(set(a.names()) ^ set(b.names()))
    for name in sorted(set(a.names()) & set(b.names())):
        x, y = a.read(name), b.read(name)
        same_bits = x.dtype == y.dtype and x.shape == y.shape and torch.equal(
            x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        if not same_bits:
            problems.append(name)
    return problems


def checkpoint_parity(model_dirs: dict[str, str], tp: int, pp: int, sp: bool,
                      save_root: str | None) -> dict[str, dict]:
    """In a worker: each converted model (model_dirs: name -> directory with mcore/ and
    reference.pt) at this layout against transformers' logits and loss; saved again under
    save_root if given."""
    import torch
    from megatron.core import parallel_state

    from megatron_patch import checkpoint, parallel
    from megatron_patch.forward import forward_logits
    from megatron_patch.models import from_checkpoint

    parallel.initialize(tp, pp)
    report = {}
    for variant, root in model_dirs.items():
        ref = torch.load(os.path.join(root, "reference.pt"))
        model, meta = from_checkpoint(os.path.join(root, "mcore"), sequence_parallel=sp)
        model.eval()
        out = forward_logits([model], ref["tokens"], meta.vocab_size)
        if save_root is not None:
            target = os.path.join(save_root, variant)
            checkpoint.save(target, 7, checkpoint.model_state(model))
        if out is None or parallel_state.get_tensor_model_parallel_rank() != 0:
            continue
        delta = (out["logits"] - ref["logits"]).abs()
        report[variant] = {
            "max_abs": delta.max().item(),
            "mean_abs": delta.mean().item(),
            "argmax_agree": (out["logits"].argmax(-1) == ref["logits"].argmax(-1))
            .float().mean().item(),
            "loss_diff": abs(out["loss"] - ref["loss"]),
        }
    return report
