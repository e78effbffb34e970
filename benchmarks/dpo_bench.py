"""DPO step time: megatron-patch's `--train-mode dpo` against TRL's DPOTrainer.

Same random Llama model (ours converted from the transformers one), same tokenizer, same
preference pairs (TRL is given the prompts already rendered as ours renders them, the Alpaca
prompt, so both score the same token sequences), same batch, beta, learning rate (constant),
AdamW settings and gradient clipping, fp32 on CPU, one process each, one after the other in one
run. Both compute the reference log-probs every step with a frozen copy of the starting model
(TRL's default `precompute_ref_log_probs=False`; ours: a forward-only pass before the policy's
step). Both run with --threads torch threads, read during every timed step of each, and the
run stops if they differ (accelerate sets torch's thread count when it takes the process for one
rank of a CPU launch). Prints the median seconds per step of each and the ratio TRL / ours
(target: >= 1.0x), the threads, and both first-step losses (ln 2 = 0.693147 for both: the policy
starts as the reference).
Not part of CI; needs `trl` (the test extra).

    python benchmarks/dpo_bench.py
    python benchmarks/dpo_bench.py --hidden-size 512 --num-layers 8 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

TOPICS = ["the sky", "a cat", "the sea", "a tree", "the sun", "a fox", "the moon", "a dog",
          "the rain", "a bird", "the road", "a book", "the snow", "a ship", "the wind", "a lamp"]


def _pairs(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"Tell me about {TOPICS[i % len(TOPICS)]} ({i}).",
             "chosen": f"Wow! I love {TOPICS[i % len(TOPICS)]}, truly!",
             "rejected": f"I know {TOPICS[(i + 3) % len(TOPICS)]}, sort of."} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()

    import torch
    import transformers

    from megatron_patch import parallel, tiny
    from megatron_patch.convert.hf_megatron import hf_to_megatron
    from megatron_patch.data.sft import ALPACA_PROMPT

    torch.set_num_threads(args.threads)
    work = args.work_dir or tempfile.mkdtemp(prefix="dpo_bench_")
    hf_dir, ckpt = os.path.join(work, "hf"), os.path.join(work, "mcore")
    tiny.train_tokenizer(hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    h = args.hidden_size
    config = transformers.LlamaConfig(
        hidden_size=h, num_hidden_layers=args.num_layers, num_attention_heads=max(1, h // 64),
        num_key_value_heads=max(1, h // 128), intermediate_size=int(h * 8 / 3) // 64 * 64,
        vocab_size=len(tok), max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    hf_to_megatron(hf_dir, ckpt)

    pairs = _pairs(args.steps * args.batch_size)
    data = os.path.join(work, "pairs.jsonl")
    with open(data, "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")

    # ---- ours ----
    from megatron_patch.data.preference import tokenize_pair
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.loop import Trainer

    # Ours pads every sequence to --seq-length; TRL pads to the longest of each batch: the
    # longest pair sets ours, so the padding ours computes on is as small as it can be.
    seq = max(len(ids) for p in pairs for ids, _ in tokenize_pair(tok, p))
    common = ["--lr", str(args.lr), "--min-lr", str(args.lr), "--lr-decay-style", "constant",
              "--weight-decay", "0.0", "--clip-grad", "1.0", "--adam-beta1", "0.9",
              "--adam-beta2", "0.999", "--adam-eps", "1e-8"]
    ours = Trainer(parse_args([
        "--train-mode", "dpo", "--load", ckpt, "--train-data-path", data, "--seq-length",
        str(seq), "--micro-batch-size", str(args.batch_size), "--global-batch-size",
        str(args.batch_size), "--train-iters", str(args.steps), "--dpo-beta", str(args.beta),
        "--log-interval", "1000", "--eval-interval", "1000000", *common]))
    ours.model.train()
    ours_times, ours_first, ours_threads = [], None, set()
    for _ in range(args.steps):
        ours_threads.add(torch.get_num_threads())
        start = time.perf_counter()
        stats = ours.train_step()
        ours_times.append(time.perf_counter() - start)
        ours_first = stats["dpo loss"] if ours_first is None else ours_first
    parallel.destroy()

    # ---- TRL ----
    import datasets
    from trl import DPOConfig, DPOTrainer

    class StepTimer(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.threads: set[int] = set()
            self.start = 0.0

        def on_step_begin(self, *_, **__) -> None:
            self.threads.add(torch.get_num_threads())
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            self.times.append(time.perf_counter() - self.start)

    rendered = [{**p, "prompt": ALPACA_PROMPT.format(instruction=p["prompt"])} for p in pairs]
    timer = StepTimer()
    trl_args = DPOConfig(
        output_dir=os.path.join(work, "trl"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, beta=args.beta, max_length=seq, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    theirs = DPOTrainer(model=model, args=trl_args, processing_class=tok,
                        train_dataset=datasets.Dataset.from_list(rendered), callbacks=[timer])
    theirs.train()
    trl_first = next(e["loss"] for e in theirs.state.log_history if "loss" in e)
    if ours_threads != timer.threads or len(ours_threads) != 1:
        raise SystemExit(f"torch threads differ: ours {sorted(ours_threads)}, TRL "
                         f"{sorted(timer.threads)}; the timings would not compare")

    ours_step = statistics.median(ours_times[args.warmup:])
    trl_step = statistics.median(timer.times[args.warmup:])
    print(json.dumps({
        "model": {"hidden_size": h, "num_layers": args.num_layers, "vocab": len(tok)},
        "batch_pairs": args.batch_size, "seq_length": seq, "steps_timed": args.steps - args.warmup,
        "ours_s_per_step": round(ours_step, 4), "trl_s_per_step": round(trl_step, 4),
        "speedup_trl_over_ours": round(trl_step / ours_step, 2),
        "torch_threads": {"ours": min(ours_threads), "trl": min(timer.threads)},
        "first_loss": {"ours": ours_first, "trl": trl_first}}, indent=1))


if __name__ == "__main__":
    main()
