"""RL step timing: seconds per GRPO (or PPO) step in generation, inference (the old / reference /
value forward passes and the rewards) and training, and the tokens/s of each, on the tiny model
and on a larger random Llama. Not part of CI.

    python benchmarks/rl_bench.py                         # tiny (hidden 64) and hidden 512
    python benchmarks/rl_bench.py --algorithm ppo --steps 5
    torchrun --nproc_per_node 2 benchmarks/rl_bench.py --tp 2

Tokens counted: generation, the completion tokens sampled; inference and training, every
position of the packed sequences the forward (and backward) passes run over (inference: the
policy and the reference, and PPO's critic; training: x --ppo-epochs, PPO's critic included).
The first step (warm-up) is left out of the averages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

PROMPTS = ["Numbers:", "The quick brown", "A converted model", "def add(a, b):",
           "Megatron-Core trains", "Round trips from", "The lazy dog", "Below is"]
SIZES = {"tiny": {}, "larger": dict(hidden_size=512, intermediate_size=1408,
                                    num_hidden_layers=8, num_attention_heads=8,
                                    num_key_value_heads=4)}


def _model(root: str, size: str) -> str:
    """A random Llama of `size` (tiny.COMMON with overrides) converted under root/size."""
    import torch
    import transformers

    from megatron_patch import tiny
    from megatron_patch.convert.hf_megatron import hf_to_megatron

    hf_dir, out = os.path.join(root, size, "hf"), os.path.join(root, size, "mcore")
    if not os.path.isdir(out):
        config = transformers.LlamaConfig(**{**tiny.COMMON, "num_key_value_heads": 2,
                                             "tie_word_embeddings": False, **SIZES[size]})
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
        tiny.train_tokenizer(hf_dir)
        hf_to_megatron(hf_dir, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algorithm", choices=["grpo", "ppo"], default="grpo")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rollout-batch-size", type=int, default=8)
    p.add_argument("--num-samples-per-prompt", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--root", default=None, help="where the models are made (default: a temp dir)")
    a = p.parse_args()

    from megatron_patch import cpu_mode, parallel
    from megatron_patch.rlhf.cli import parse_args
    from megatron_patch.rlhf.loop import RLTrainer

    cpu_mode.maybe_enable()
    root = os.path.abspath(a.root or tempfile.mkdtemp(prefix="rl_bench_"))
    os.makedirs(root, exist_ok=True)
    prompts = os.path.join(root, "prompts.jsonl")
    with open(prompts, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in PROMPTS)
    rewards = os.path.join(root, "bench_rewards.py")
    with open(rewards, "w") as f:
        f.write("def digits(record, prompt, completion):\n"
                "    return sum(c.isdigit() for c in completion) / max(len(completion), 1)\n")
    os.chdir(root)  # the reward module imports from the current directory
    seq = 16 + a.max_new_tokens
    report = {}
    for size in a.sizes:
        load = _model(root, size) if int(os.environ.get("RANK", "0")) == 0 else None
        if os.environ.get("WORLD_SIZE", "1") != "1":
            import torch

            parallel.initialize(a.tp, 1)
            torch.distributed.barrier()
            load = os.path.join(root, size, "mcore")
        args = parse_args([
            "--algorithm", a.algorithm, "--load", load, "--prompt-data-path", prompts,
            "--reward-function", "bench_rewards:digits", "--seq-length", str(seq),
            "--max-new-tokens", str(a.max_new_tokens), "--train-iters", str(a.steps),
            "--rollout-batch-size", str(a.rollout_batch_size),
            "--num-samples-per-prompt", str(a.num_samples_per_prompt),
            "--micro-batch-size", str(a.micro_batch_size), "--lr", "1e-5",
            "--lr-decay-style", "constant", "--tensor-model-parallel-size", str(a.tp)])
        trainer = RLTrainer(args)
        sequences = a.rollout_batch_size * a.num_samples_per_prompt // trainer.trainer.dp
        forwards = 1 + (trainer.reference is not None) + (trainer.critic is not None)
        trained = args.ppo_epochs * (1 + (trainer.critic is not None))
        rows = []
        for _ in range(a.steps):
            s = trainer.step()
            generated = sum(len(r.completion_ids) for r in trainer.last_rollouts)
            rows.append({"generation_s": s["generation_s"], "inference_s": s["inference_s"],
                         "training_s": s["training_s"],
                         "generation tokens/s": generated / s["generation_s"],
                         "inference tokens/s": forwards * sequences * seq / s["inference_s"],
                         "training tokens/s": trained * sequences * seq / s["training_s"]})
        timed = rows[1:] or rows
        report[size] = {k: statistics.mean(r[k] for r in timed) for k in rows[0]}
        parallel.destroy()
    if int(os.environ.get("RANK", "0")) == 0:
        for size, values in report.items():
            print(f"{a.algorithm} {size}: " + " | ".join(f"{k} {v:.3g}"
                                                       for k, v in values.items()))


if __name__ == "__main__":
    main()
