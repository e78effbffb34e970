"""Training throughput: megatron-patch's training step against a plain transformers loop.

Same random Llama model (ours converted from the transformers one), same token batches, AdamW
(same lr, betas, eps, weight decay on matrices only, as Megatron-Core applies it), gradient
clipping by global norm, same dtype, sequence length and micro-batch, constant learning rate.
The two step in turn inside one run (which goes first alternates), so a burst of load on a shared
machine hits both. Prints the tokens/s of each, their ratio (target: >= 1.0x on CPU, >= 1.5x on a
GPU; from the median step time of each, robust to bursts of other load, and from all timed steps),
and whether both reached the same loss after every step (1e-4 in fp32). Not part of CI.

    python benchmarks/train_bench.py                      # 1 process
    torchrun --nproc_per_node 2 benchmarks/train_bench.py --tp 2   # ours TP=2 vs torch DDP
    torchrun --nproc_per_node 2 benchmarks/train_bench.py          # ours DP=2 vs torch DDP
    python benchmarks/train_bench.py --bf16 --hidden-size 1024 ... # on a GPU

On a GPU the transformers side runs under torch.autocast(bfloat16) with fp32 weights (the usual
plain-PyTorch mixed precision), ours with bf16 weights and fp32 main weights in the optimizer
(Megatron's); their losses then agree only to bf16 rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _batches(steps: int, global_batch: int, seq: int, vocab: int, seed: int = 0):
    """[steps * global_batch, seq + 1] tokens: each row repeats a short random motif, so the
    loss falls within a few steps."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(steps * global_batch):
        motif = torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=gen)),),
                              generator=gen)
        rows.append(motif.repeat(seq // len(motif) + 2)[:seq + 1])
    return torch.stack(rows)


class _Samples:
    """The samples ours reads: GPTDataset's fields, from the shared token rows."""

    def __init__(self, rows) -> None:
        import torch

        self.rows = rows
        seq = rows.shape[1] - 1
        self.position_ids = torch.arange(seq)
        self.loss_mask = torch.ones(seq)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": self.loss_mask,
                "position_ids": self.position_ids}


class _HFTrainer:
    """The plain transformers loop: forward, cross entropy, backward, clip, AdamW."""

    def __init__(self, hf_dir: str, rows, args, device) -> None:
        import torch
        import transformers

        self.rows, self.args, self.device = rows, args, device
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        model = model.to(device).train()
        self.world = torch.distributed.get_world_size()
        self.rank = torch.distributed.get_rank()
        self.model = (torch.nn.parallel.DistributedDataParallel(model) if self.world > 1
                      else model)
        # Megatron-Core's default: no weight decay on biases and 1-D parameters (norms).
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999),
            eps=1e-8)
        self.params = decay + no_decay
        self.step_index = 0

    def train_step(self) -> float:
        import torch

        a = self.args
        share = a.global_batch_size // self.world
        # Wraps around as ours does (data.microbatches) for steps beyond the rows.
        start = (self.step_index * a.global_batch_size) % len(self.rows) + self.rank * share
        batch = self.rows[start:start + share].to(self.device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.bf16):
            logits = self.model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, a.clip_grad)
        self.optimizer.step()
        self.step_index += 1
        reported = loss.detach().clone()
        if self.world > 1:
            torch.distributed.all_reduce(reported)
            reported /= self.world
        return reported.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4,
                        help="per process (ours: per DP rank; TP ranks share one)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--tp", type=int, default=1, help="ours: tensor parallel size")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--clip-grad", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="after the run, print the ops that took the most time in one more "
                             "step of each side (torch.profiler)")
    args = parser.parse_args()

    import torch
    import transformers

    from megatron_patch import cpu_mode, parallel
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.loop import Trainer
    from megatron_patch.training.modes import Datasets, LanguageModelMode

    class SharedRows(LanguageModelMode):
        """The LM loss on the token rows both sides read."""

        name = "pretrain"

        def build_datasets(self) -> Datasets:
            return Datasets(_Samples(rows), None, args.steps)

    torch.set_num_threads(args.threads)
    parallel.initialize(args.tp, 1)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    dp = world // args.tp
    # TP ranks share a micro-batch; the HF side splits the same global batch over all ranks.
    args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % world:
        raise SystemExit(f"global batch {args.global_batch_size} does not split over {world} "
                         "torch DDP ranks: raise --micro-batch-size")
    device = cpu_mode.device()

    work = [args.work_dir or (tempfile.mkdtemp(prefix="train_bench_") if rank == 0 else None)]
    torch.distributed.broadcast_object_list(work)
    hf_dir, ckpt = os.path.join(work[0], "hf"), os.path.join(work[0], "mcore")
    h = args.hidden_size
    if rank == 0:
        config = transformers.LlamaConfig(
            hidden_size=h, num_hidden_layers=args.num_layers, num_attention_heads=h // 64,
            num_key_value_heads=max(1, h // 128), intermediate_size=int(h * 8 / 3) // 64 * 64,
            vocab_size=args.vocab_size, max_position_embeddings=max(1024, args.seq_length),
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
        # Conversion is a single-process job: under torchrun it runs in a child process
        # without the launcher's environment.
        launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                    "ROLE_WORLD_SIZE", "ROLE_NAME", "TORCHELASTIC_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
        subprocess.run([sys.executable, "-m", "megatron_patch", "convert", "hf-to-megatron",
                        hf_dir, ckpt], env=env, check=True, stdout=subprocess.DEVNULL)
    torch.distributed.barrier()

    rows = _batches(args.steps, args.global_batch_size, args.seq_length, args.vocab_size)
    ours_args = parse_args([
        "--load", ckpt, "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.steps),
        "--lr", str(args.lr), "--min-lr", str(args.lr), "--lr-decay-style", "constant",
        "--weight-decay", str(args.weight_decay), "--clip-grad", str(args.clip_grad),
        "--tensor-model-parallel-size", str(args.tp),
        *(["--bf16"] if args.bf16 else []),
        # torch DDP overlaps its gradient all-reduce with the backward pass; so does ours here.
        *(["--overlap-grad-reduce"] if dp > 1 else [])])
    ours = Trainer(ours_args, mode=SharedRows)
    ours.model.train()
    theirs = _HFTrainer(hf_dir, rows, args, device)

    sides = {"megatron-patch": ours.train_step,
             "transformers": lambda: {"loss": theirs.train_step()}}
    step_seconds: dict[str, list[float]] = {k: [] for k in sides}
    losses: dict[str, list[float]] = {k: [] for k in sides}
    for step in range(args.steps):
        order = list(sides) if step % 2 == 0 else list(sides)[::-1]
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            torch.distributed.barrier()
            start = time.perf_counter()
            losses[name].append(sides[name]()["loss"])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                step_seconds[name].append(time.perf_counter() - start)
        if rank == 0:
            print(f"step {step + 1}/{args.steps}: " + ", ".join(
                f"{k} loss {v[-1]:.6f}" for k, v in losses.items()), flush=True)

    # The median step: a burst of other load on a shared machine lands on a few steps of
    # either side, which the median ignores and a total would count.
    step_tokens = args.global_batch_size * args.seq_length
    median = {k: statistics.median(v) for k, v in step_seconds.items()}
    rates = {k: step_tokens / v for k, v in median.items()}
    ratio = rates["megatron-patch"] / rates["transformers"]
    total_ratio = sum(step_seconds["transformers"]) / sum(step_seconds["megatron-patch"])
    diffs = [abs(a - b) for a, b in zip(*losses.values(), strict=True)]
    tolerance = 1e-2 if args.bf16 else 1e-4
    layout = f"TP={args.tp} DP={dp}" if world > 1 else "1 process"
    if rank == 0:
        print(f"model: hidden {h}, {args.num_layers} layers, vocab {args.vocab_size}; seq "
              f"{args.seq_length}, global batch {args.global_batch_size}, "
              f"{'bf16' if args.bf16 else 'fp32'}, {device.type}, {args.threads} thread(s) per "
              f"process; ours {layout}, transformers {world} process(es)"
              f"{' (torch DDP)' if world > 1 else ''}")
        for name in sides:
            print(f"{name:15s} median step {median[name]:7.3f} s  {rates[name]:10.1f} tokens/s"
                  f"  (all {len(step_seconds[name])} timed steps: "
                  f"{sum(step_seconds[name]):.2f} s)")
        print(f"ratio megatron-patch / transformers: {ratio:.2f}x (median step; all timed "
              f"steps: {total_ratio:.2f}x); loss after {args.steps} steps: "
              f"{losses['megatron-patch'][-1]:.6f} vs {losses['transformers'][-1]:.6f}, max "
              f"difference over the steps {max(diffs):.2e} (tolerance {tolerance:g}): "
              f"{'SAME' if max(diffs) <= tolerance else 'DIFFERENT'}")
        print(json.dumps({"layout": layout, "step_seconds": step_seconds,
                          "tokens_per_sec": rates, "ratio": ratio, "total_ratio": total_ratio,
                          "losses": losses, "max_loss_diff": max(diffs)}))
    if args.profile:
        for name, fn in sides.items():
            with torch.profiler.profile(record_shapes=True) as prof:
                fn()
            if rank == 0:
                print(f"--- {name}: one step\n" + prof.key_averages(
                    group_by_input_shape=True).table(
                    sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50,
                    max_shapes_column_width=60))
    parallel.destroy()


if __name__ == "__main__":
    main()
