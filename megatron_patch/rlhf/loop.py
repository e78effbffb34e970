"""The reinforcement-learning loop: rollouts from the policy being trained (same processes, same
weights: nothing is converted or synchronised), rewards, advantages, then clipped-surrogate
updates through Megatron-Core's schedule, with the trainer's model, optimizer, scheduler,
checkpoints and metrics.

One step (`--train-iters` counts them):
1. `--rollout-batch-size` prompts (in a seeded order, resumable from the count consumed), split
   over the data-parallel ranks; `--num-samples-per-prompt` completions each, sampled by the
   policy with their log-probs (rlhf/rollout.py).
2. Rewards (rlhf/rewards.py), advantages (rlhf/advantages.py).
3. A forward pass of the policy recomputes each sampled token's log-prob: these are the "old"
   log-probs of the importance ratio (so the ratio of the first mini-batch is 1), and their
   difference from the sampled ones is logged (rollout vs train). The reference model's
   log-probs likewise.
4. `--ppo-epochs` passes over the rollout batch in mini-batches of `--global-batch-size`
   sequences, one optimizer step each; each mini-batch runs in micro-batches of
   `--micro-batch-size` through Megatron-Core's schedule, whose per-token loss mode divides the
   summed loss by the response tokens of the whole mini-batch (all micro-batches and DP ranks).

Iterations in checkpoints count optimizer steps (--train-iters x --ppo-epochs x mini-batches
per rollout batch); --train-iters, --save-interval and --exit-interval count RL steps.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Any

import torch

from megatron_patch import checkpoint, parallel
from megatron_patch.generation import SamplingParams
from megatron_patch.models import load_hf_config
from megatron_patch.models.score_head import check_kind
from megatron_patch.rlhf import advantages as adv
from megatron_patch.rlhf import ppo, rollout
from megatron_patch.rlhf.policy import PolicyMode
from megatron_patch.rlhf.rewards import Rewards, load_reward_function
from megatron_patch.rlhf.rollout import RolloutShare
from megatron_patch.training.loop import Trainer

ALGORITHMS = ("grpo", "ppo")


def is_rl_checkpoint(root: str) -> str | None:
    """The algorithm of the run `root` holds a checkpoint of (then --load resumes it), else None
    (a converted or SFT model: the starting policy)."""
    from megatron.core import dist_checkpointing

    iteration = checkpoint.latest_iteration(root)
    if iteration == "release":
        return None
    common = dist_checkpointing.load_common_state_dict(
        checkpoint.existing_iteration_dir(root, iteration))
    mode = common.get("train_mode")
    return mode if mode in ALGORITHMS else None


class RLTrainer:
    """GRPO and PPO on the trainer's model, optimizer, schedule and checkpoints (PPO's critic:
    the actor's companion Trainer), driven through the Trainer's public methods only."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = a = args
        self.ppo = a.algorithm == "ppo"
        self._check_rewards()  # before any work: the function imports, the RM is one
        resumed = is_rl_checkpoint(a.load)
        if resumed not in (None, a.algorithm) and not a.finetune:
            raise ValueError(f"--algorithm {a.algorithm}: {a.load} is a {resumed} run; resume it "
                             f"with --algorithm {resumed} (or start from its weights with "
                             "--finetune)")
        self._read_prompts()  # checked before the model is built
        self.n = a.num_samples_per_prompt
        samples = a.rollout_batch_size * self.n
        gbs = a.global_batch_size or samples
        if samples % gbs:
            raise ValueError(f"--rollout-batch-size {a.rollout_batch_size} x "
                             f"--num-samples-per-prompt {self.n} = {samples} sequences per step "
                             f"is not a multiple of --global-batch-size {gbs}")
        self.updates_per_step = a.ppo_epochs * samples // gbs
        self.params = SamplingParams(do_sample=True, temperature=a.temperature, top_k=a.top_k,
                                     top_p=a.top_p)
        self.kl_controller = (adv.AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon)
                              if self.ppo and a.adaptive_kl else
                              adv.FixedKLController(a.kl_coef))
        self.consumed_prompts = 0
        reference = os.path.abspath(a.ref_load or a.load)
        iteration = checkpoint.latest_iteration(reference)
        # What the reference is, recorded with where it is: a resumed run refuses another
        # model put at that path.
        self.reference_source = {"load": reference, "iteration": iteration,
                                 **checkpoint.fingerprint(reference, iteration)}
        self._build_models(gbs, resumed)
        self.rewards = Rewards(a, self.trainer, self.prompts, self.tokenizer, self.n,
                               self.reward_function)
        self.last_rollouts: list[rollout.Rollout] = []
        parallel.print_last_rank(
            f"RL ({a.algorithm}): {len(self.prompts.ids)} prompts from {a.prompt_data_path} "
            f"({self.prompts.skipped_long} skipped as too long); {a.rollout_batch_size} prompts "
            f"x {self.n} samples per step, {self.updates_per_step} optimizer step(s) per step; "
            "reference model: " + ("none (--kl-coef 0)" if not self.has_reference else
                                   f"{self.reference_source['load']} (iteration "
                                   f"{self.reference_source['iteration']})"
                                   + (", the policy with its LoRA adapters off"
                                      if self.reference.shares_policy else "")))

    def _check_rewards(self) -> None:
        a = self.args
        self.reward_function = (load_reward_function(a.reward_function) if a.reward_function
                                else None)
        if a.reward_model:
            check_kind(load_hf_config(os.path.join(a.reward_model, checkpoint.HF_DIR)),
                       reward=True, source=a.reward_model, flag="--reward-model")

    def _build_models(self, global_batch_size: int, resumed: str | None) -> None:
        """The actor's Trainer (its model, optimizer, checkpoints; resumed state loaded), the
        frozen reference, and PPO's critic Trainer."""
        a = self.args
        trainer_args = copy.copy(a)
        trainer_args.global_batch_size = global_batch_size
        trainer_args.train_mode = a.algorithm  # recorded in checkpoints
        trainer_args.finetune = a.finetune or resumed is None  # a starting policy: weights only
        self.trainer = t = Trainer(trainer_args, mode=self._policy_mode)
        if a.rollout_batch_size % t.dp:
            raise ValueError(f"--rollout-batch-size {a.rollout_batch_size} is not a multiple of "
                             f"the data-parallel size {t.dp}")
        # Under LoRA a reference that is the adapters' base is the policy with its adapters off.
        self.reference = (t.frozen_reference(
            self.reference_source["load"], self.reference_source["iteration"],
            "--ref-load" if a.ref_load else "the reference") if a.kl_coef > 0 else None)
        self.critic = None
        if self.ppo:
            # The actor's companion: the same process groups, its own model, optimizer,
            # schedule and checkpoints.
            self.critic = t.companion(
                ppo.critic_args(a, trainer_args, resumed is not None),
                mode=lambda trainer: ppo.CriticMode(trainer, t.train_iters, a.value_clip_eps))

    def _policy_mode(self, trainer: Any) -> PolicyMode:
        """The actor's training mode, kept: the step reads its ratio maxima."""
        self.policy_mode = PolicyMode(trainer, self)
        return self.policy_mode

    def _read_prompts(self) -> None:
        from transformers import AutoTokenizer

        a = self.args
        check_kind(load_hf_config(os.path.join(a.load, checkpoint.HF_DIR)), reward=False,
                   source=a.load, flag="--load")
        source = a.tokenizer_model or os.path.join(a.load, checkpoint.HF_DIR)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {source} has no EOS token")
        self.eos = [self.tokenizer.eos_token_id]
        self.pad = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                    else self.tokenizer.eos_token_id)
        self.prompts = rollout.load_prompts(
            a.prompt_data_path, a.prompt_format, self.tokenizer, a.seq_length - a.max_new_tokens,
            a.skip_long_prompts,
            f"--seq-length {a.seq_length} minus --max-new-tokens {a.max_new_tokens}")

    # ---- state saved in checkpoints (as the mode's state) ------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"consumed_prompts": self.consumed_prompts,
                "kl_controller": self.kl_controller.state_dict(),
                "reference": dict(self.reference_source)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed_prompts = int(state["consumed_prompts"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        if self.args.ref_load and os.path.abspath(self.args.ref_load) != state["reference"][
                "load"]:
            raise ValueError(f"--ref-load {self.args.ref_load}: {self.args.load} is a run whose "
                             f"reference is {state['reference']['load']}; a resumed run keeps it "
                             "(leave --ref-load out)")
        saved = dict(state["reference"])
        if self.args.kl_coef > 0:  # a reference in use
            saved.update(checkpoint.check_fingerprint(saved, saved["load"], saved["iteration"],
                                                      "the KL reference model"))
        self.reference_source = saved

    @property
    def step_count(self) -> int:
        return self.trainer.iteration // self.updates_per_step

    # ---- models ------------------------------------------------------------------------
    @property
    def has_reference(self) -> bool:
        return self.reference is not None

    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.reference.active():
            return self.forward_logprobs(self.reference.module, batch)

    @property
    def policy(self) -> torch.nn.Module:
        return self.trainer.model.module

    # ---- one step ----------------------------------------------------------------------
    def _my_prompts(self) -> tuple[list[int], int]:
        """This DP rank's prompt indices for the step, and its first sample's run-wide index."""
        a, t = self.args, self.trainer
        step_prompts = self.prompts.take(self.consumed_prompts, a.rollout_batch_size, a.seed)
        per_rank = a.rollout_batch_size // t.dp
        first = t.dp_rank * per_rank
        return (step_prompts[first:first + per_rank],
                (self.consumed_prompts + first) * self.n)

    def make_rollouts(self) -> list[rollout.Rollout]:
        a, t = self.args, self.trainer
        indices, first_index = self._my_prompts()
        return rollout.sample(self.policy, [self.prompts.ids[i] for i in indices], indices,
                              first_index, self.n, max_new_tokens=a.max_new_tokens,
                              vocab_size=t.vocab_size, eos=self.eos, pad=self.pad,
                              params=self.params, seed=a.seed,
                              batch_size=a.rollout_micro_batch_size)

    def forward_logprobs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                         ) -> torch.Tensor:
        """Log-probs of every label under `model` ([N, S]), in micro-batches, no gradients."""
        return rollout.logprobs(model, batch, self.args.micro_batch_size,
                                self.trainer.vocab_size, self.args.temperature)

    def prepare(self, batch: dict[str, torch.Tensor], rewards: torch.Tensor,
                valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training tensors of a packed rollout batch: old and reference log-probs,
        per-token advantages."""
        a = self.args
        batch["loss_mask"] = batch["loss_mask"] * valid[:, None].float()
        batch["old_logprobs"] = self.forward_logprobs(self.policy, batch)
        if self.has_reference:
            batch["ref_logprobs"] = self.reference_logprobs(batch)
        if self.ppo:
            self._sequence_kl = ppo.prepare_advantages(self, batch, rewards)
        else:
            scores = adv.grpo_advantages(rewards, self.n, scale_by_std=not a.no_scale_rewards)
            batch["advantages"] = scores[:, None] * batch["loss_mask"]
        return batch

    def update(self, share: RolloutShare) -> dict[str, float]:
        """One optimizer step (the trainer's) on the next mini-batch of the rollout batch."""
        t = self.trainer
        offset = t.consumed_samples % len(share)
        if self._tokens(share, offset) == 0:  # every group skipped: the gradients would be 0 / 0
            for trainer in (t, self.critic) if self.critic else (t,):
                trainer.skip_step()
            return {"skipped": 1.0}
        self.policy_mode.maxima = []
        stats = t.train_step(share)
        if self.critic is not None:
            critic = self.critic.train_step(share)
            stats.update({k: critic[k] for k in ppo.CriticMode.metric_names},
                         critic_grad_norm=critic["grad_norm"])
        # The loss (and so the maxima) is computed on the last pipeline stage only.
        step_maxima = self.policy_mode.maxima
        maxima = (torch.stack(step_maxima).max(dim=0).values if step_maxima
                  else torch.full((2,), -torch.inf))
        self._all_reduce(maxima, torch.distributed.ReduceOp.MAX, pipeline=True)
        stats["ratio max"], stats["ratio deviation max"] = maxima.tolist()
        return stats

    def _tokens(self, share: RolloutShare, offset: int) -> float:
        """Response tokens in the mini-batch at `offset`, over all data-parallel ranks."""
        t = self.trainer
        mbs = self.args.micro_batch_size
        total = torch.zeros(1)
        for m in range(t.num_microbatches):
            start = offset + m * mbs * t.dp + t.dp_rank * mbs
            for g in range(start, start + mbs):
                total += share[g]["loss_mask"].sum()
        return self._all_reduce(total).item()

    def _all_reduce(self, x: torch.Tensor, op=None, pipeline: bool = False) -> torch.Tensor:
        """Over the data-parallel ranks (and with `pipeline` the pipeline stages too)."""
        from megatron.core import parallel_state

        op = op or torch.distributed.ReduceOp.SUM
        if self.trainer.dp > 1:
            torch.distributed.all_reduce(x, op=op, group=parallel_state.get_data_parallel_group())
        if pipeline and self.trainer.pp > 1:
            torch.distributed.all_reduce(
                x, op=op, group=parallel_state.get_pipeline_model_parallel_group())
        return x

    def step(self) -> dict[str, Any]:
        """One RL step: rollouts, rewards, updates. Returns its statistics (also logged)."""
        a, t = self.args, self.trainer
        began = time.time()
        rollouts = self.make_rollouts()
        generated = time.time()
        batch = rollout.pack(rollouts, a.seq_length, self.pad)
        rewards, valid = self.rewards(rollouts, batch)
        batch = self.prepare(batch, rewards, valid)
        prepared = time.time()
        stats = rollout.rollout_stats(rollouts, rewards, valid, batch, self.n, self._all_reduce)
        share = RolloutShare(batch, a.micro_batch_size, t.dp)
        t.model.train()
        updates = [self.update(share) for _ in range(self.updates_per_step)]
        trained = time.time()
        done = [u for u in updates if "policy loss" in u]
        for key in PolicyMode.metric_names + ("grad_norm", "value loss", "value clip fraction"):
            if done and key in done[0]:
                stats[key] = sum(u[key] for u in done) / len(done)
        if done:
            stats["ratio max"] = max(u["ratio max"] for u in done)
            # Before any update the policy is the one that computed the old log-probs.
            stats["first ratio deviation"] = updates[0].get("ratio deviation max", 0.0)
        stats["skipped updates"] = len(updates) - len(done)
        stats["rollout digest"] = rollout.digest(rollouts)
        stats.update(generation_s=generated - began, inference_s=prepared - generated,
                     training_s=trained - prepared)
        stats["kl coef"] = self.kl_controller.value
        if self.ppo:
            sequence_kl = self._all_reduce(self._sequence_kl.double())
            self.kl_controller.update((sequence_kl[0] / sequence_kl[1]).item(),
                                      int(sequence_kl[1].item()))
        self.consumed_prompts += a.rollout_batch_size
        self.last_rollouts, self.last_rewards = rollouts, rewards
        return stats

    # ---- the run -----------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        """--train-iters steps (from where a resumed run stopped), saving at --save-interval
        and stopping at --exit-interval as the trainer does, counted in RL steps."""
        a, t = self.args, self.trainer
        history = []
        began, first_step = time.time(), self.step_count
        while self.step_count < a.train_iters:
            stats = self.step()
            history.append(stats)
            seconds_per_step = (time.time() - began) / (self.step_count - first_step)
            self._log(stats, seconds_per_step * (a.train_iters - self.step_count))
            if t.save_or_exit(self.step_count, self.save):
                break
        else:
            t.save_at_end(self.step_count, self.save)
        t.close()
        return history

    def save(self) -> None:
        """The critic first: the actor's tracker, written last, marks the step as saved."""
        if self.critic is not None:
            self.critic.save()
        self.trainer.save()

    # The step's two lines: what the run is learning, then (indented) how the update went;
    # TENSORBOARD_ONLY goes to TensorBoard / W&B only. Each key where present (PPO's keys only
    # in PPO runs).
    HEADLINE = ("reward mean", "reward std", "response length", "kl", "entropy", "policy loss")
    DETAIL = ("value loss", "clip fraction", "ratio max", "logprob diff max", "grad_norm",
              "skipped groups")
    TENSORBOARD_ONLY = ("ratio", "logprob diff mean", "value clip fraction", "kl coef",
                        "equal-reward groups")
    LOGGED = HEADLINE + DETAIL + TENSORBOARD_ONLY

    def _log(self, s: dict[str, Any], eta: float) -> None:
        """Every step: two lines on the last rank (with the time left at the run's rate so far)
        and the same scalars (rl/...) to TensorBoard."""
        t = self.trainer
        parallel.print_last_rank("\n".join(step_lines(
            self.step_count, self.args.train_iters, s, t.learning_rate(), eta)))
        t.log_scalars({f"rl/{key}": s[key] for key in self.LOGGED if key in s}, self.step_count)


def step_lines(step: int, train_iters: int, s: dict[str, Any], lr: float,
               eta: float) -> list[str]:
    """An RL step's log: the headline (step, rewards, KL, losses, lr, ETA) and, indented, the
    update's diagnostics and the seconds spent in each phase."""
    headline = ([f"step {step:5d}/{train_iters}"]
                + [f"{k} {s[k]:.4g}" for k in RLTrainer.HEADLINE if k in s]
                + [f"lr {lr:.3e}", f"ETA {eta:.0f}s"])
    detail = ([f"{k} {s[k]:.4g}" for k in RLTrainer.DETAIL if k in s]
              + [f"s gen/inf/train {s['generation_s']:.1f}/{s['inference_s']:.1f}/"
                 f"{s['training_s']:.1f}"])
    return [" | ".join(headline), "    | " + " | ".join(detail)]
