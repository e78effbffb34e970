"""What the test modules share (they import nothing from each other).

`run`: a function on N forked ranks that form a gloo process group. megatron.core is imported
once by the test process; forking workers from it costs well under a second, where a torchrun
launch costs 13-25 s. The parent does no torch computation before forking (forked children
cannot use a thread pool the parent started), and workers return plain Python data. A process
a worker leaves running fails the call and is killed: conftest makes the test process the
subreaper (`adopt_orphans`), so such orphans become its children, and its session fixture
checks the same at the end for everything else.

Also: the learning tests' seed (`learning_seed`, MEGATRON_PATCH_TEST_SEED) and report
(`report_learning`), the numerical tolerances, `run_command`, the bit-for-bit directory comparison
(`differing_tensors`), the parity worker (`checkpoint_parity`), a short training run's dataset
and flags (`make_token_dataset`, `training_args`, `train_losses`), SFT records
(`write_sft_records`) and greedy generation from a model directory (`megatron_greedy`,
`hf_greedy`).
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

# Learning tests (a loss falls, a reward rises) take their seed from `learning_seed`: setting
# MEGATRON_PATCH_TEST_SEED reruns them on other seeds, which stands in for another machine's
# fp32 rounding (AVX-512 vs AVX2 kernels sample other trajectories). Their bars are set at a
# stated fraction of the worst of several seeds, not just under one run's result.
SEED_ENV = "MEGATRON_PATCH_TEST_SEED"


def learning_seed(default: int) -> int:
    """`default`, or the seed in MEGATRON_PATCH_TEST_SEED when set (read by the tests only)."""
    return int(os.environ.get(SEED_ENV, default))


def report_learning(test: str, **values: Any) -> None:
    """Print a learning test's measured values (shown with `pytest -s`), to re-measure its bar."""
    print(f"learning {test} seed={os.environ.get(SEED_ENV, 'default')} {values}", flush=True)


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
    before = set(children())
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
        left = kill_leftover_children(before)
    if left:
        errors.append(f"the workers left processes running (killed now): {left}")
    if errors:
        raise AssertionError("worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def adopt_orphans() -> None:
    """Make this process the Linux child subreaper: a process orphaned by one of its descendants
    (a forked worker leaves through os._exit, before anything shuts its own children down)
    becomes its child instead of init's, where `children` sees it."""
    import ctypes

    pr_set_child_subreaper = 36  # <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def children() -> dict[int, str]:
    """This process's live children, pid -> command line (exited ones are not listed)."""
    import psutil

    alive = {}
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive[child.pid] = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            pass
    return alive


def kill_leftover_children(expected: set[int]) -> dict[int, str]:
    """Kill and reap this process's children whose pids are not in `expected` (and reap the
    exited ones, orphans that no Popen object waits for); returns those that were still alive."""
    import psutil

    left = {}
    for child in psutil.Process().children():
        if child.pid in expected:
            continue
        try:
            if "resource_tracker" in " ".join(child.cmdline()):
                continue  # multiprocessing's own helper: it exits once its users have
            if child.status() != psutil.STATUS_ZOMBIE:
                left[child.pid] = " ".join(child.cmdline())
                child.kill()
            child.wait(timeout=10)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
            pass
    return left


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


# Training: a learnable token dataset and the flags of a short run over it (test_training,
# test_reliability, test_everyday, test_moe, the family and launcher tests).
SEQ_LENGTH, MICRO_BATCH, GLOBAL_BATCH = 32, 2, 4


def make_token_dataset(prefix: str, num_docs: int = 200, vocab: int = 60, seed: int = 0) -> None:
    """A learnable token dataset: documents repeat a short random motif over a small part of the
    vocabulary (so even unigram statistics lower the loss quickly)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(num_docs):
        motif = rng.integers(3, vocab, size=rng.integers(3, 7))
        doc = np.concatenate([np.tile(motif, 8), [2]]).astype(np.int32)  # 2 = EOS
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")


def training_args(load: str, data: str, *, iters: int = 10, tp: int = 1, pp: int = 1,
                  sp: bool = False, do: bool = False, save: str | None = None,
                  save_interval: int | None = None, lr: float = 1e-3, extra: tuple = ()):
    """The parsed flags of a short pretraining run from `load` on the dataset `data`."""
    from megatron_patch.training.arguments import parse_args

    argv = ["--load", load, "--data-path", data, "--split", "90,10,0",
            "--seq-length", str(SEQ_LENGTH), "--micro-batch-size", str(MICRO_BATCH),
            "--global-batch-size", str(GLOBAL_BATCH),
            "--train-iters", str(iters), "--lr", str(lr), "--min-lr", "1e-5",
            "--lr-warmup-iters", "2", "--eval-interval", "1000", "--log-interval", "5",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--seed", str(learning_seed(7)), *extra]
    if sp:
        argv.append("--sequence-parallel")
    if do:
        argv.append("--use-distributed-optimizer")
    if save:
        argv += ["--save", save]
        if save_interval:
            argv += ["--save-interval", str(save_interval)]
    return parse_args(argv)


def train_losses(*args: Any, **kwargs: Any) -> list[float]:
    """In a worker: the loss of every step of the run `training_args(*args, **kwargs)`."""
    from megatron_patch.training.loop import Trainer

    trainer = Trainer(training_args(*args, **kwargs))
    return [s["loss"] for s in trainer.train()]


def stopped_at(save: str, iteration: int) -> None:
    """Point the tracker at an earlier checkpoint, as if the run had stopped after saving it."""
    from megatron_patch import checkpoint

    with open(os.path.join(save, checkpoint.TRACKER), "w") as f:
        f.write(f"{iteration}\n")


def write_sft_records(path: str, n: int | None = None) -> None:
    """The first n (default all) of megatron_patch.tiny's question/answer pairs as Alpaca
    records, one JSON line each."""
    import json

    from megatron_patch.tiny import QA

    with open(path, "w") as f:
        for q, a in QA[:n]:
            f.write(json.dumps({"instruction": q, "input": "", "output": a}) + "\n")


# Greedy generation from a model directory holding hf/ and mcore/ (test_generation, the zoo,
# MoE and piece-family tests): megatron-patch's against transformers'.
PROMPTS = [[5, 17, 99], [1, 300, 42, 7, 8, 250, 13], [9] * 12]
MAX_NEW = 24


def megatron_greedy(model_root: str, tp: int, max_new: int = MAX_NEW,
                    eos: int | None = 2, pp: int = 1) -> list[list[int]]:
    """Greedy completions of PROMPTS from model_root/mcore at TP=tp (PP=pp); eos None: never
    stop."""
    from megatron_patch import parallel

    parallel.initialize(tp, pp)
    return greedy_from(model_root, max_new, eos)


def greedy_from(model_root: str, max_new: int = MAX_NEW,
                eos: int | None = 2) -> list[list[int]]:
    """megatron_greedy in an initialised process group."""
    from megatron_patch.generation import generate
    from megatron_patch.models import from_checkpoint

    model, meta = from_checkpoint(os.path.join(model_root, "mcore"))
    return generate(model, PROMPTS, max_new_tokens=max_new, vocab_size=meta.vocab_size,
                    eos_token_ids=[-1 if eos is None else eos], pad_token_id=0)


def hf_greedy(model_root: str, max_new: int = MAX_NEW, eos: int | None = 2) -> list[list[int]]:
    """transformers' greedy completions of PROMPTS (batched, left-padded), cut after EOS."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(model_root, "hf"),
                                                           dtype=torch.float32).eval()
    longest = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in PROMPTS])
    stop = {"eos_token_id": eos} if eos is not None else {"min_new_tokens": max_new}
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                      max_new_tokens=max_new, pad_token_id=0, **stop)
    results = []
    for row in out[:, longest:].tolist():
        kept = []
        for t in row:
            kept.append(t)
            if t == eos:
                break
        results.append(kept)
    return results


def by_expert_tp(model_dirs: dict[str, str], tp: int) -> list[tuple[int, dict[str, str]]]:
    """The models (name -> a directory with hf/) grouped by the expert tensor parallel size
    they run at with tensor parallel size `tp` (models.expert_tensor_parallel_size: 1 for
    GPT-OSS's biased experts, else TP), TP's group first: a worker initialises its layout once
    per group."""
    from megatron_patch.models import expert_tensor_parallel_size, family_for, load_hf_config

    groups: dict[int, dict[str, str]] = {}
    for name, root in model_dirs.items():
        cfg = load_hf_config(os.path.join(root, "hf"))
        etp = expert_tensor_parallel_size(family_for(cfg).model_args(cfg), tp)
        groups.setdefault(etp, {})[name] = root
    return sorted(groups.items(), key=lambda group: group[0] != tp)


def dequantized_import(hf_dir: str, root: str, quantization_config: dict[str, Any],
                       oracle_quantization: Any) -> dict[str, Any]:
    """In a worker: a quantised checkpoint (hf_dir's weights already quantised) gets its
    config.json `quantization_config` and a tokenizer, is converted (fp32) into root/mcore and
    loaded at TP=1; its logits against those of transformers' model of the same checkpoint
    dequantised by `oracle_quantization` (e.g. FineGrainedFP8Config(dequantize=True)).
    Returns max_abs, config_quantized (the converted config.json still says quantised), and
    the two models."""
    import json

    import torch
    import transformers

    from megatron_patch import parallel, tiny
    from megatron_patch.convert.hf_megatron import hf_to_megatron
    from megatron_patch.forward import forward_logits
    from megatron_patch.models import from_checkpoint

    config_path = os.path.join(hf_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "quantization_config": quantization_config}, f, indent=2)
    tiny.train_tokenizer(hf_dir)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, quantization_config=oracle_quantization).eval()
    tokens = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = oracle(input_ids=tokens).logits
    hf_to_megatron(hf_dir, os.path.join(root, "mcore"), params_dtype=torch.float32)
    parallel.initialize(1, 1)
    model, meta = from_checkpoint(os.path.join(root, "mcore"))
    model.eval()
    out = forward_logits([model], tokens, meta.vocab_size)
    with open(os.path.join(root, "mcore", "hf", "config.json")) as f:
        converted_config = json.load(f)
    return {"max_abs": (out["logits"] - expected).abs().max().item(),
            "config_quantized": "quantization_config" in converted_config,
            "oracle": oracle, "model": model}


def cli_error(argv: list[str]) -> tuple[int, str]:
    """In a worker: a megatron-patch command line's exit code and stderr."""
    import contextlib
    import io

    from megatron_patch import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse's refusals
            rc = e.code
    return rc, err.getvalue()


def sft_args(load: str, train: str, *, iters: int = 3, mbs: int = 4, gbs: int = 4,
              seq: int = 96, lr: float = 1e-3, extra: tuple = ()):
    """The parsed flags of a short SFT run from `load` on the records file `train`."""
    from megatron_patch.training.arguments import parse_args

    return parse_args(["--train-mode", "finetune", "--load", load, "--train-data-path", train,
                       "--seq-length", str(seq), "--micro-batch-size", str(mbs),
                       "--global-batch-size", str(gbs), "--train-iters", str(iters),
                       "--lr", str(lr), "--min-lr", str(lr / 10), "--lr-warmup-iters", "1",
                       "--eval-interval", "100000", "--log-interval", "100",
                       "--seed", str(learning_seed(3)), *extra])


def qa_answers(trainer, model_root: str) -> list[str]:
    """The trained model's greedy answers to megatron_patch.tiny's QA questions."""
    import transformers

    from megatron_patch.data.sft import render_prompt
    from megatron_patch.generation import generate
    from megatron_patch.tiny import QA

    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(model_root, "hf"))
    prompts = [render_prompt(tok, {"instruction": q}) for q, _ in QA]
    out = generate(trainer.model.module, prompts, max_new_tokens=12,
                   vocab_size=trainer.vocab_size, eos_token_ids=[tok.eos_token_id],
                   pad_token_id=tok.pad_token_id)
    return [tok.decode(ids, skip_special_tokens=True) for ids in out]


# The load-balancing loss coefficients of HF MoE configs. Megatron-Core computes that loss per
# sequence slice under sequence parallelism, so it differs from TP=1's by design: layout
# comparisons of gradients leave it out.
AUX_LOSS_KEYS = ("router_aux_loss_coef", "aux_loss_alpha")


def without_aux_loss(model_dirs: dict[str, str], tmp: str) -> dict[str, str]:
    """name -> converted checkpoint (model_dir/mcore), or a copy under `tmp` whose config has
    the load-balancing loss set to 0 where it was not."""
    import json
    import shutil

    out = {}
    for name, root in model_dirs.items():
        mcore = os.path.join(root, "mcore")
        with open(os.path.join(mcore, "hf", "config.json")) as f:
            config = json.load(f)
        if any(config.get(k) for k in AUX_LOSS_KEYS):
            mcore = os.path.join(tmp, name)
            shutil.copytree(os.path.join(root, "mcore"), mcore)
            with open(os.path.join(mcore, "hf", "config.json"), "w") as f:
                json.dump({**config, **{k: 0.0 for k in AUX_LOSS_KEYS if k in config}}, f)
        out[name] = mcore
    return out
