"""`megatron-patch rl --algorithm ppo|grpo`: the training flags of `megatron-patch train`
(Megatron-LM's names) plus the reinforcement-learning ones below."""

from __future__ import annotations

import argparse

from megatron_patch.errors import (
    ArgumentParser,
    FloatRange,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    probability,
)

# Function-level imports: rlhf.advantages, training.arguments, parallel and rlhf.loop import
# torch (and megatron.core), which importing this module (from the light CLI) does not need.

# PPO's ratio clip: 1 +- eps must stay a positive range around 1.
CLIP_EPS = FloatRange(0.0, 1.0, low_open=True, high_open=True)
TOP_P = FloatRange(0.0, 1.0, low_open=True)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from megatron_patch.rlhf import modes  # noqa: F401 (train's flags include rm's and dpo's)
    from megatron_patch.rlhf.advantages import KL_ESTIMATORS
    from megatron_patch.training import arguments

    arguments.add_arguments(parser)
    g = parser.add_argument_group("reinforcement learning (megatron-patch rl)")
    g.add_argument("--algorithm", choices=["grpo", "ppo"], required=True)
    g.add_argument("--prompt-data-path", required=True,
                   help="prompts: JSON lines (or a JSON list) of records with `prompt`, `text`, "
                        "`instruction` or `messages`, or a .txt file, one prompt a line")
    g.add_argument("--reward-function", default=None, metavar="MODULE:FUNCTION",
                   help="rule-based reward: function(record, prompt, completion) -> number")
    g.add_argument("--reward-model", default=None, metavar="CKPT",
                   help="a reward-model checkpoint scoring prompt + completion")
    g.add_argument("--skip-bad-rewards", action="store_true",
                   help="leave out (and count) a prompt's group when its reward function raises "
                        "or returns a non-finite number (default: stop with the error)")
    g.add_argument("--skip-long-prompts", action="store_true",
                   help="leave out (and count) prompts longer than --seq-length minus "
                        "--max-new-tokens (default: an error naming the prompt)")
    g.add_argument("--rollout-batch-size", type=positive_int, default=8,
                   help="prompts per step (over all data-parallel ranks)")
    g.add_argument("--num-samples-per-prompt", type=positive_int, default=None,
                   help="completions sampled per prompt (default: 4 for GRPO, 1 for PPO)")
    g.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="completion length limit (a completion also ends at EOS)")
    g.add_argument("--temperature", type=positive_float, default=1.0,
                   help="sampling temperature; the trained policy is softmax(logits / T)")
    g.add_argument("--top-k", type=nonnegative_int, default=0, help="0: off")
    g.add_argument("--top-p", type=TOP_P, default=1.0, help="1.0: off")
    g.add_argument("--rollout-micro-batch-size", type=positive_int, default=16,
                   help="sequences generated together")
    g.add_argument("--ppo-epochs", type=positive_int, default=1,
                   help="passes over each rollout batch (in mini-batches of --global-batch-size "
                        "sequences, one optimizer step each)")
    g.add_argument("--clip-eps", type=CLIP_EPS, default=0.2, help="PPO clip range of the ratio")
    g.add_argument("--kl-coef", type=nonnegative_float, default=None,
                   help="KL coefficient (GRPO: of the k3 loss term, default 0.04, 0 holds no "
                        "reference model; PPO: initial coefficient of the KL penalty in the "
                        "reward, default 0.05)")
    g.add_argument("--kl-estimator", choices=KL_ESTIMATORS, default=None,
                   help="default: k3 for GRPO, k1 for PPO")
    g.add_argument("--kl-bias-correction", action="store_true",
                   help="GRPO: multiply the KL term by the importance ratio (TRL's "
                        "use_bias_correction_kl, its default; DeepSeek-V3.2's unbiased KL "
                        "gradient). Default off: DeepSeekMath's and verl's loss")
    g.add_argument("--adaptive-kl", action="store_true",
                   help="PPO: Ziegler et al.'s adaptive KL coefficient towards --kl-target")
    g.add_argument("--kl-target", type=positive_float, default=6.0,
                   help="PPO with --adaptive-kl: the target KL per sequence")
    g.add_argument("--kl-horizon", type=positive_float, default=10000,
                   help="PPO with --adaptive-kl: samples over which the coefficient adapts")
    g.add_argument("--gamma", type=probability, default=1.0, help="PPO: GAE discount")
    g.add_argument("--lam", type=probability, default=0.95, help="PPO: GAE lambda")
    g.add_argument("--value-clip-eps", type=positive_float, default=0.2,
                   help="PPO: clip range of the value around the rollout's value")
    g.add_argument("--critic-lr", type=nonnegative_float, default=None,
                   help="PPO: the critic's learning rate (default --lr)")
    g.add_argument("--no-scale-rewards", action="store_true",
                   help="GRPO: advantages are reward minus the group mean, not divided by the "
                        "group's std (Dr. GRPO)")
    return parser


def validate(args: argparse.Namespace) -> argparse.Namespace:
    from megatron_patch.training import arguments

    if args.train_iters is None:
        raise ValueError("--train-iters is required: the number of RL steps (rollout batches)")
    args.train_mode = "pretrain"
    arguments.validate(args)
    if args.reward_function is None and args.reward_model is None:
        raise ValueError("give --reward-function MODULE:FUNCTION and/or --reward-model CKPT")
    if not args.load:
        raise ValueError("--load is required: the policy to start from (a converted or SFT "
                         "checkpoint), or an RL checkpoint to resume")
    grpo = args.algorithm == "grpo"
    if args.num_samples_per_prompt is None:
        args.num_samples_per_prompt = 4 if grpo else 1
    if args.kl_coef is None:
        args.kl_coef = 0.04 if grpo else 0.05
    args.kl_estimator = args.kl_estimator or ("k3" if grpo else "k1")
    if args.kl_bias_correction and not grpo:
        raise ValueError("--kl-bias-correction applies to GRPO's KL loss term; PPO's KL is in "
                         "its rewards")
    if grpo and args.num_samples_per_prompt < 2 and not args.no_scale_rewards:
        raise ValueError("GRPO compares samples of a prompt: --num-samples-per-prompt must be "
                         ">= 2 (or pass --no-scale-rewards)")
    if args.max_new_tokens >= args.seq_length:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt "
                         f"in --seq-length {args.seq_length}")
    if args.sequence_parallel:
        raise ValueError("megatron-patch rl: --sequence-parallel is not supported (generation "
                         "runs on the same model)")
    return args


def run(args: argparse.Namespace) -> int:
    """`megatron-patch rl`: the parsed flags checked, then the run."""
    return train(validate(args))


def train(args: argparse.Namespace) -> int:
    """The run, from flags that `validate` has checked (`parse_args` gives such)."""
    from megatron_patch import logs, parallel
    from megatron_patch.rlhf.loop import RLTrainer

    logs.setup(args.verbose, args.log_level)
    RLTrainer(args).train()
    parallel.destroy()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = add_arguments(ArgumentParser(prog="megatron-patch rl"))
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return validate(parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    from megatron_patch.errors import run_main

    sys.exit(run_main("megatron-patch rl", lambda: train(parse_args())))
