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
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from typing import Any

import torch

from megatron_patch import checkpoint
from megatron_patch.generation import SamplingParams
from megatron_patch.rlhf import advantages as adv
from megatron_patch.rlhf import rollout
from megatron_patch.rlhf.rewards import RewardError, load_reward_function

RL_STATE = "rl_state"


def is_rl_checkpoint(root: str) -> bool:
    """Whether `root` holds a checkpoint saved by this loop (then --load resumes it)."""
    from megatron.core import dist_checkpointing

    try:
        iteration = checkpoint.latest_iteration(root)
    except (FileNotFoundError, ValueError):
        return False
    if iteration == "release":
        return False
    common = dist_checkpointing.load_common_state_dict(
        checkpoint.existing_iteration_dir(root, iteration))
    return RL_STATE in common


def _digest(rollouts: list[rollout.Rollout]) -> str:
    """A fingerprint of this rank's sampled tokens (a resumed run must sample the same)."""
    import hashlib

    text = ";".join(",".join(map(str, r.completion_ids)) for r in rollouts)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RLTrainer:
    """GRPO (and the shared machinery) on the trainer's model, optimizer and checkpoints."""

    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        from megatron_patch.training.loop import Trainer

        self.args = a = args
        if a.algorithm == "ppo":
            raise ValueError("--algorithm ppo is not available yet in this version (its critic "
                             "needs the reward-model head of part 1); use --algorithm grpo")
        if a.reward_model:
            raise ValueError("--reward-model is not available yet in this version (it needs "
                             "part 1's reward models); use --reward-function")
        self.reward_function = load_reward_function(a.reward_function)  # before any work
        resume = is_rl_checkpoint(a.load)
        # Prompts are read and checked before the model is built.
        hf_source = os.path.join(a.load, checkpoint.HF_DIR)
        self.tokenizer = AutoTokenizer.from_pretrained(a.tokenizer_model or hf_source)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {a.tokenizer_model or hf_source} has no EOS token")
        self.eos = [self.tokenizer.eos_token_id]
        self.pad = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                    else self.tokenizer.eos_token_id)
        limit = a.seq_length - a.max_new_tokens
        self.prompts = rollout.load_prompts(
            a.prompt_data_path, a.prompt_format, self.tokenizer, limit, a.skip_long_prompts,
            f"--seq-length {a.seq_length} minus --max-new-tokens {a.max_new_tokens}")
        self.n = a.num_samples_per_prompt
        samples = a.rollout_batch_size * self.n
        gbs = a.global_batch_size or samples
        if samples % gbs:
            raise ValueError(f"--rollout-batch-size {a.rollout_batch_size} x "
                             f"--num-samples-per-prompt {self.n} = {samples} sequences per step "
                             f"is not a multiple of --global-batch-size {gbs}")
        self.minibatches = samples // gbs
        trainer_args = copy.copy(a)
        trainer_args.global_batch_size = gbs
        # The learning-rate schedule counts optimizer steps: one per mini-batch.
        trainer_args.train_iters = a.train_iters * a.ppo_epochs * self.minibatches
        trainer_args.finetune = a.finetune or not resume  # a starting policy: weights only
        self.trainer = t = Trainer(trainer_args, datasets=[[], None, None])
        if a.rollout_batch_size % t.dp:
            raise ValueError(f"--rollout-batch-size {a.rollout_batch_size} is not a multiple of "
                             f"the data-parallel size {t.dp}")
        self.params = SamplingParams(do_sample=True, temperature=a.temperature, top_k=a.top_k,
                                     top_p=a.top_p)
        self.kl_controller = adv.FixedKLController(a.kl_coef)
        self.consumed_prompts = 0
        self.reference_source = (a.ref_load or a.load, None)
        if resume:
            self._load_rl_state()
        self.reference = self._build_reference() if a.kl_coef > 0 else None
        if self._is_logging_rank():
            print(f"RL ({a.algorithm}): {len(self.prompts.ids)} prompts from "
                  f"{a.prompt_data_path} ({self.prompts.skipped_long} skipped as too long); "
                  f"{a.rollout_batch_size} prompts x {self.n} samples per step, "
                  f"{self.minibatches} mini-batch(es) x {a.ppo_epochs} epoch(s); reference "
                  f"model: {'none (--kl-coef 0)' if self.reference is None else 'held'}",
                  flush=True)

    # ---- models ------------------------------------------------------------------------
    def _build_reference(self) -> torch.nn.Module:
        """A frozen copy of the starting policy (same layout, no gradients, no optimizer)."""
        from megatron_patch.models import build_stages

        t = self.trainer
        built = build_stages(t.hf_config, t.meta.padded_vocab_size,
                             params_dtype=t.config.params_dtype)
        (module,) = built.chunks
        path, iteration = self.reference_source
        checkpoint.load_model(path, module, iteration)
        module.requires_grad_(False)
        return module

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

    def score(self, rollouts: list[rollout.Rollout]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards [N] and which samples count ([N] bool: a group with a bad reward is out)."""
        rewards, valid = [], []
        for r in rollouts:
            prompt = self.prompts.prompts[r.prompt_index]
            text = self.tokenizer.decode(r.completion_ids, skip_special_tokens=True)
            prompt_text = self.tokenizer.decode(r.prompt_ids, skip_special_tokens=True)
            try:
                rewards.append(self.reward_function(prompt.record, prompt_text, text,
                                                    prompt.where))
                valid.append(True)
            except RewardError:
                if not self.args.skip_bad_rewards:
                    raise
                rewards.append(0.0)
                valid.append(False)
        groups = torch.tensor(valid).view(-1, self.n).all(dim=1, keepdim=True)
        return torch.tensor(rewards), groups.expand(-1, self.n).reshape(-1)

    def forward_logprobs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                         ) -> torch.Tensor:
        """Log-probs of every label under `model` ([N, S]), in micro-batches, no gradients."""
        a, t = self.args, self.trainer
        out = []
        with torch.no_grad():
            for start in range(0, batch["tokens"].shape[0], a.micro_batch_size):
                rows = slice(start, start + a.micro_batch_size)
                logits = model(batch["tokens"][rows], batch["position_ids"][rows], None)
                out.append(rollout.token_logprobs(logits, batch["labels"][rows], t.vocab_size,
                                                  a.temperature))
        return torch.cat(out)

    def prepare(self, rollouts: list[rollout.Rollout], rewards: torch.Tensor,
                valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training tensors of a rollout batch: packed tokens, old and reference log-probs,
        per-token advantages."""
        a = self.args
        batch = rollout.pack(rollouts, a.seq_length, self.pad)
        batch["loss_mask"] = batch["loss_mask"] * valid[:, None].float()
        batch["old_logprobs"] = self.forward_logprobs(self.policy, batch)
        if self.reference is not None:
            batch["ref_logprobs"] = self.forward_logprobs(self.reference, batch)
        scores = adv.grpo_advantages(rewards, self.n, scale_by_std=not a.no_scale_rewards)
        batch["advantages"] = scores[:, None] * batch["loss_mask"]
        return batch

    def _policy_loss(self, batch: dict[str, torch.Tensor], output: torch.Tensor):
        a, t = self.args, self.trainer
        logp = rollout.token_logprobs(output, batch["labels"], t.vocab_size, a.temperature)
        mask = batch["loss_mask"]
        loss, ratio, clipped = adv.clipped_surrogate(logp, batch["old_logprobs"],
                                                     batch["advantages"], a.clip_eps)
        count = mask.sum()
        metrics = {"policy loss": (loss, "sum"), "clip fraction": (clipped.float(), "sum"),
                   "ratio": (ratio, "sum"), "ratio max": (ratio, "max"),
                   "ratio deviation max": ((ratio - 1).abs(), "max"),
                   "entropy": (rollout.token_entropy(output, t.vocab_size, a.temperature),
                               "sum")}
        if self.reference is not None:
            kl = adv.kl_estimate(logp, batch["ref_logprobs"], a.kl_estimator)
            loss = loss + self.kl_controller.value * kl
            metrics["kl"] = (kl, "sum")
        reported = {}
        for name, (value, how) in metrics.items():
            value = value.detach().float()
            if how == "sum":
                reported[name] = torch.stack([(value * mask).sum(), count.detach()])
            else:
                top = torch.where(mask > 0, value, torch.full_like(value, -math.inf)).max()
                reported[name] = torch.stack([top, torch.ones_like(top)])
        return (loss * mask).sum(), count.to(torch.int), reported

    def _forward_step(self, data_iterator, model):
        from functools import partial

        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None)
        return output, partial(self._policy_loss, batch)

    def update(self, minibatch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        a, t = self.args, self.trainer
        mbs = a.micro_batch_size
        tokens = minibatch["loss_mask"].sum().reshape(1)
        self._all_reduce(tokens)
        if tokens.item() == 0:  # every group skipped: nothing to learn, and 0 / 0 gradients
            return {"skipped": 1.0}
        micro = [{k: v[m * mbs:(m + 1) * mbs] for k, v in minibatch.items()}
                 for m in range(t.num_microbatches)]
        t.model.zero_grad_buffer()
        t.optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(micro), model=[t.model],
            num_microbatches=t.num_microbatches, seq_length=a.seq_length, micro_batch_size=mbs,
            forward_only=False)
        ok, grad_norm, _ = t.optimizer.step()
        if ok:
            t.scheduler.step(increment=t.global_batch_size)
        t.consumed_samples += t.global_batch_size
        stats = self._reduce(outputs)
        stats.update(grad_norm=float(grad_norm or 0.0), skipped=float(not ok))
        return stats

    def _all_reduce(self, x: torch.Tensor, op=None) -> torch.Tensor:
        from megatron.core import parallel_state

        if self.trainer.dp > 1:
            torch.distributed.all_reduce(x, op=op or torch.distributed.ReduceOp.SUM,
                                         group=parallel_state.get_data_parallel_group())
        return x

    def _reduce(self, outputs: list[dict]) -> dict[str, float]:
        sums: dict[str, torch.Tensor] = {}
        maxima: dict[str, torch.Tensor] = {}
        for out in outputs:
            for name, value in out.items():
                if name.endswith(" max"):
                    maxima[name] = torch.maximum(maxima.get(name, value[0]), value[0])
                else:
                    sums[name] = sums.get(name, torch.zeros(2)) + value
        result = {}
        for name, value in sums.items():
            self._all_reduce(value)
            result[name] = (value[0] / value[1].clamp(min=1)).item()
        for name, value in maxima.items():
            self._all_reduce(value.reshape(1), torch.distributed.ReduceOp.MAX)
            result[name] = value.item()
        return result

    def step(self) -> dict[str, Any]:
        """One RL step: rollouts, rewards, updates. Returns its statistics (also logged)."""
        a, t = self.args, self.trainer
        began = time.time()
        rollouts = self.make_rollouts()
        generated = time.time()
        rewards, valid = self.score(rollouts)
        batch = self.prepare(rollouts, rewards, valid)
        prepared = time.time()
        stats = self._rollout_stats(rollouts, rewards, valid, batch)
        local = batch["tokens"].shape[0]
        per_minibatch = local // self.minibatches
        updates = []
        for _ in range(a.ppo_epochs):
            for m in range(self.minibatches):
                rows = slice(m * per_minibatch, (m + 1) * per_minibatch)
                updates.append(self.update({k: v[rows] for k, v in batch.items()}))
        trained = time.time()
        first = updates[0]
        for key in ("policy loss", "kl", "entropy", "clip fraction", "ratio", "ratio max",
                    "grad_norm"):
            values = [u[key] for u in updates if key in u]
            if values:
                stats[key] = max(values) if key == "ratio max" else sum(values) / len(values)
        # Before any update the policy is the one that computed the old log-probs.
        stats["first ratio deviation"] = first.get("ratio deviation max", 0.0)
        stats["rollout digest"] = _digest(rollouts)
        self.last_rollouts = rollouts
        stats.update(generation_s=generated - began, inference_s=prepared - generated,
                     training_s=trained - prepared)
        self.consumed_prompts += a.rollout_batch_size
        t.iteration += 1
        return stats

    def _rollout_stats(self, rollouts, rewards, valid, batch) -> dict[str, float]:
        mask = batch["loss_mask"]
        counted = valid.float()
        lengths = torch.tensor([float(len(r.completion_ids)) for r in rollouts])
        diff = (batch["old_logprobs"] - batch["rollout_logprobs"]).abs() * mask
        sums = torch.stack([(rewards * counted).sum(), (rewards.square() * counted).sum(),
                            counted.sum(), (lengths * counted).sum(), diff.sum(), mask.sum(),
                            (~valid).float().sum() / self.n,
                            self._equal_reward_groups(rewards, valid)]).double()
        self._all_reduce(sums)
        top = diff.max().reshape(1) if diff.numel() else torch.zeros(1)
        self._all_reduce(top, torch.distributed.ReduceOp.MAX)
        count = sums[2].clamp(min=1)
        mean = sums[0] / count
        return {"reward mean": mean.item(),
                "reward std": (sums[1] / count - mean.square()).clamp(min=0).sqrt().item(),
                "response length": (sums[3] / count).item(),
                "logprob diff mean": (sums[4] / sums[5].clamp(min=1)).item(),
                "logprob diff max": top.item(),
                "skipped groups": int(sums[6].item()),
                "equal-reward groups": int(sums[7].item())}

    def _equal_reward_groups(self, rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        grouped, ok = rewards.view(-1, self.n), valid.view(-1, self.n).all(dim=1)
        same = (grouped == grouped[:, :1]).all(dim=1) & ok
        return same.float().sum()

    # ---- the run -----------------------------------------------------------------------
    def _is_logging_rank(self) -> bool:
        return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1

    def train(self) -> list[dict[str, Any]]:
        a, t = self.args, self.trainer
        history = []
        while t.iteration < a.train_iters:
            stats = self.step()
            history.append(stats)
            self._log(stats)
            saved = False
            if a.save and a.save_interval and t.iteration % a.save_interval == 0:
                self.save()
                saved = True
            if a.exit_interval and t.iteration % a.exit_interval == 0:
                if a.save and not saved:
                    self.save()
                break
        else:
            if a.save and (not a.save_interval or t.iteration % a.save_interval):
                self.save()
        if t.writer:
            t.writer.close()
        return history

    LOGGED = ("reward mean", "reward std", "response length", "kl", "entropy", "policy loss",
              "clip fraction", "ratio", "ratio max", "logprob diff mean", "logprob diff max",
              "grad_norm")

    def _log(self, s: dict[str, Any]) -> None:
        t = self.trainer
        if self._is_logging_rank():
            parts = [f"step {t.iteration:5d}/{self.args.train_iters}"]
            parts += [f"{k} {s[k]:.6g}" for k in self.LOGGED if k in s]
            parts += [f"skipped groups {s['skipped groups']}",
                      f"equal-reward groups {s['equal-reward groups']}",
                      f"lr {t.optimizer.param_groups[0]['lr']:.3e}",
                      f"s gen/inf/train {s['generation_s']:.2f}/{s['inference_s']:.2f}/"
                      f"{s['training_s']:.2f}"]
            print(" | ".join(parts), flush=True)
        if t.writer:
            for key in self.LOGGED + ("skipped groups", "equal-reward groups"):
                if key in s:
                    t.writer.add_scalar(f"rl/{key}", s[key], t.iteration)

    # ---- checkpoints -------------------------------------------------------------------
    def _rl_state(self) -> dict[str, Any]:
        path, iteration = self.reference_source
        return {"algorithm": self.args.algorithm, "consumed_prompts": self.consumed_prompts,
                "kl_controller": self.kl_controller.state_dict(),
                "reference_load": os.path.abspath(path),
                "reference_iteration": (iteration if iteration is not None
                                        else checkpoint.latest_iteration(path))}

    def save(self) -> None:
        # megatron-core internal: none. Trainer internals (_state, _write_model_files) until
        # the trainer's checkpointing module offers extra state.
        a, t = self.args, self.trainer
        state = t._state(loading=False)
        state.update(checkpoint_version=3.0, iteration=t.iteration,
                     consumed_samples=t.consumed_samples, consumed_valid_samples=0,
                     opt_param_scheduler=t.scheduler.state_dict(),
                     parallel_layout=[t.tp, t.pp, t.dp], expert_parallel=t.ep,
                     seq_length=a.seq_length, **{RL_STATE: self._rl_state()})
        if torch.distributed.get_rank() == 0:
            t._write_model_files(a.save)
        checkpoint.save(a.save, t.iteration, state)
        if torch.distributed.get_rank() == 0:
            print(f"saved checkpoint at step {t.iteration} to {a.save}", flush=True)

    def _load_rl_state(self) -> None:
        from megatron.core import dist_checkpointing

        a = self.args
        common = dist_checkpointing.load_common_state_dict(
            checkpoint.existing_iteration_dir(a.load, checkpoint.latest_iteration(a.load)))
        state = common[RL_STATE]
        if state["algorithm"] != a.algorithm:
            raise ValueError(f"--load {a.load} is a {state['algorithm']} run; resume it with "
                             f"--algorithm {state['algorithm']}")
        self.consumed_prompts = int(state["consumed_prompts"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        if not a.ref_load:
            self.reference_source = (state["reference_load"], state["reference_iteration"])
