"""The training loop: a mode's data, forward pass and loss (`training/modes.py`) run through
Megatron-Core's schedules, DDP, optimizer and learning-rate schedule, with checkpoints
(`training/checkpointing.py`) and logs (`training/metrics.py`)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from megatron_patch import checkpoint, errors, logs, parallel
from megatron_patch.lora import training as lora_training
from megatron_patch.models import (
    build_stages,
    checkpoint_expert_tensor_parallel_size,
    family_for,
    load_hf_config,
    pad_vocab_size,
    params_dtype_from_flags,
)
from megatron_patch.models.scratch import scratch_hf_config
from megatron_patch.training import checkpointing, data, finite_check, kv_replicas, metrics
from megatron_patch.training.arguments import parse_args
from megatron_patch.training.modes import TrainingMode, mode_class
from megatron_patch.training.optimizer import build_optimizer
from megatron_patch.training.reference import FrozenReference

# Function-level imports: models.flash and models.layers import megatron.core, needed only to
# pick the attention backend once the model is built.

log = logging.getLogger("megatron_patch.train")


class Trainer:
    """Sets up everything from Megatron-LM style flags, then trains, evaluates and saves.

    `--train-mode` chooses the `TrainingMode` (data, forward pass, loss); `mode` overrides it
    with an instance-making callable (tests, custom training code).
    """

    def __init__(self, args: argparse.Namespace,
                 mode: Callable[[Trainer], TrainingMode] | None = None, *,
                 companion_of: Trainer | None = None) -> None:
        from megatron.core import parallel_state

        self.args = args
        self._tokenizer = None
        metrics.check(args)
        errors.require_dir("--load", args.load)
        if args.fp8_format is not None:
            raise ValueError("--fp8-format: FP8 needs Transformer Engine on a GPU and is not "
                             "wired up in this version; use --bf16")
        if companion_of is None:
            parallel.initialize(
                args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                expert_model_parallel_size=args.expert_model_parallel_size, seed=args.seed,
                # (Models made from architecture flags have no biased experts.)
                expert_tensor_parallel_size=checkpoint_expert_tensor_parallel_size(
                    args.load, args.tensor_model_parallel_size) if args.load else None)
        else:
            _check_same_layout(args, companion_of.args)
            parallel.seed_all(args.seed)  # the RNG state a first model is built from
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.ep = parallel_state.get_expert_model_parallel_world_size()
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.global_batch_size = args.global_batch_size or args.micro_batch_size * self.dp
        if self.global_batch_size % (args.micro_batch_size * self.dp):
            raise ValueError(f"--global-batch-size {self.global_batch_size} is not a multiple "
                             f"of micro batch {args.micro_batch_size} x DP {self.dp}")
        self.num_microbatches = self.global_batch_size // (args.micro_batch_size * self.dp)
        self.mode = (mode or mode_class(args.train_mode))(self)

        self._read_model_description()
        self._setup_model()
        datasets = self.mode.build_datasets()
        self.datasets = [datasets.train, datasets.valid]
        self.train_iters = datasets.train_iters
        self.optimizer, self.scheduler = build_optimizer(self)
        self.iteration, self.consumed_samples, self.consumed_valid_samples = 0, 0, 0
        if args.load:
            checkpointing.load(self)
        if args.save:
            checkpointing.check_save_dir(self)
        self.writer = metrics.open_writer(args, parallel.is_last_rank())

    # ---- setup -------------------------------------------------------------------------
    def _read_model_description(self) -> None:
        """The HF config and checkpoint meta of the model to train: --load's, or one made from
        Megatron-LM's architecture flags and --tokenizer-model."""
        args = self.args
        if args.load:
            self.meta = checkpoint.read_meta(args.load)
            self.hf_source = os.path.join(args.load, checkpoint.HF_DIR)
            self.hf_config = load_hf_config(self.hf_source)
        else:
            from transformers import AutoTokenizer

            args.normalization = args.normalization or "LayerNorm"  # Megatron-LM's default
            if not args.tokenizer_model:
                raise ValueError("without --load, give --tokenizer-model (an HF tokenizer dir)")
            vocab = len(AutoTokenizer.from_pretrained(args.tokenizer_model))
            self.hf_config = scratch_hf_config(args, vocab)
            self.hf_source = args.tokenizer_model
            padded = pad_vocab_size(vocab + args.extra_vocab_size,
                                    args.make_vocab_size_divisible_by * self.tp)
            self.meta = checkpoint.CheckpointMeta(self.hf_config["architectures"][0], vocab,
                                                  padded, "float32")
        self.hf_config, self.meta = self.mode.describe_model(self.hf_config, self.meta)
        self.model_args = family_for(self.hf_config).model_args(self.hf_config)
        if args.load and (conflicts := checkpointing.architecture_conflicts(args,
                                                                            self.model_args)):
            raise ValueError(f"architecture flags {'; '.join(conflicts)}: what they ask for "
                             f"disagrees with the checkpoint {args.load}, which decides the "
                             "architecture (leave them out with --load)")
        self.vocab_size = self.meta.vocab_size
        if args.load and self.vocab_size + args.extra_vocab_size > self.meta.padded_vocab_size:
            # The checkpoint fixes the embedding rows: EXTRA_VOCAB_SIZE rows are made when
            # converting (`convert --extra-vocab-size`), and real new tokens by extend-vocab.
            raise ValueError(
                f"--extra-vocab-size {args.extra_vocab_size}: {args.load} has "
                f"{self.meta.padded_vocab_size} embedding rows for its {self.vocab_size} "
                f"tokens, fewer than {self.vocab_size + args.extra_vocab_size}; convert with "
                "--extra-vocab-size, or add tokens with `megatron-patch extend-vocab`")

    def _build_options(self, dtype: torch.dtype) -> dict[str, Any]:
        """`build_stages` options from the flags: recompute, flash attention, the mode's."""
        args = self.args
        options: dict[str, Any] = dict(calculate_per_token_loss=True,
                                       init_method_std=args.init_method_std,
                                       transformer_impl=args.transformer_impl)
        if args.recompute_granularity:
            options["recompute_granularity"] = args.recompute_granularity
            if args.recompute_granularity == "full":
                options.update(recompute_method=args.recompute_method,
                               recompute_num_layers=args.recompute_num_layers)
        if args.use_flash_attn:
            from megatron_patch.models import flash
            from megatron_patch.models.layers import transformer_engine_available

            choice = flash.select(self.model_args, self.tp, dtype, transformer_engine=(
                args.transformer_impl != "local" and transformer_engine_available()))
            options.update(transformer_impl=choice.transformer_impl,
                           core_attention=choice.core_attention)
            if torch.distributed.get_rank() == 0:
                log.info("--use-flash-attn: %s", choice.description)
        return {**options, **self.mode.model_options()}

    def build_module(self, **overrides: Any) -> tuple[Any, torch.nn.Module]:
        """(TransformerConfig, this rank's GPTModel) of the run's model as the flags build it,
        with `overrides` for the config (a frozen copy, e.g. a reference model, passes
        perform_initialization=False); the layout is checked against the model first."""
        dtype = params_dtype_from_flags(self.args)
        built = build_stages(self.hf_config, self.meta.padded_vocab_size, params_dtype=dtype,
                             sequence_parallel=self.args.sequence_parallel,
                             **self._build_options(dtype), **overrides)
        (module,) = built.chunks
        return built.config, module

    def companion(self, args: argparse.Namespace,
                  mode: Callable[[Trainer], TrainingMode]) -> Trainer:
        """A second Trainer of the same run (PPO's critic): its own model, optimizer, schedule
        and checkpoints from `args`, on this one's process groups (which it does not set up
        again; its layout flags must be this one's)."""
        return Trainer(args, mode, companion_of=self)

    def frozen_reference(self, load: str, iteration: int | str, flag: str) -> FrozenReference:
        """Checkpoint `load` at `iteration` as a frozen reference model beside this one's
        (training/reference.py); a checkpoint of another model is refused naming `flag`."""
        return FrozenReference(self, load, iteration, flag)

    def _setup_model(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        args = self.args
        dtype = params_dtype_from_flags(args)
        self.config, self.module = self.build_module()
        # LoRA: the base weights loaded and frozen, adapters added (None without LoRA).
        self.lora = lora_training.setup(self)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=dtype != torch.float32,
            overlap_grad_reduce=args.overlap_grad_reduce,
            use_distributed_optimizer=args.use_distributed_optimizer,
        )
        # A multi-query model's replicated KV heads start identical (a loaded checkpoint's
        # are already; this matters from scratch) and stay so (training/kv_replicas.py).
        kv_replicas.tie_copies([self.module], self.model_args)
        self.model = DistributedDataParallel(config=self.config, ddp_config=ddp_config,
                                             module=self.module)
        self.config.finalize_model_grads_func = kv_replicas.finalize_model_grads_func(
            finalize_model_grads, self.model_args, args.use_distributed_optimizer, self.dp)
        self.config.no_sync_func = self.model.no_sync

    def tokenizer(self) -> Any:
        """The run's HF tokenizer (--tokenizer-model, else the checkpoint's), refused when it
        has ids past the model's vocabulary (they would index padding rows, whose logits the
        loss masks out). Read once: the training and validation data both tokenize with it."""
        from transformers import AutoTokenizer

        if self._tokenizer is None:
            tok = AutoTokenizer.from_pretrained(self.args.tokenizer_model or self.hf_source)
            if len(tok) > self.vocab_size:
                raise ValueError(
                    f"the tokenizer has {len(tok)} tokens, the model {self.vocab_size}: grow "
                    "the model with `megatron-patch extend-vocab` (EXTRA_VOCAB_SIZE only adds "
                    "padding rows, which are not trained and not exported)")
            self._tokenizer = tok
        return self._tokenizer

    # ---- steps -------------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        """Megatron-Core's forward step: the mode's forward pass and, bound to its batch, its
        loss."""
        batch = next(data_iterator)
        return self.mode.forward(model, batch), partial(self.mode.loss, batch)

    def run_schedule(self, dataset: Any, consumed: int, forward_only: bool,
                     forward_step: Callable | None = None,
                     model: torch.nn.Module | None = None) -> list[dict]:
        """One global batch (from sample `consumed` of `dataset`) through Megatron-Core's
        pipeline schedule: the loss outputs of its micro-batches (on the last stage)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches = data.microbatches(dataset, consumed, self.args.micro_batch_size,
                                    self.num_microbatches, self.dp_rank, self.dp)
        return get_forward_backward_func()(
            forward_step_func=forward_step or self.forward_step, data_iterator=batches,
            model=[model or self.model], num_microbatches=self.num_microbatches,
            seq_length=self.args.seq_length,
            micro_batch_size=self.args.micro_batch_size * self.mode.sequences_per_sample,
            forward_only=forward_only,
        )

    def _metrics(self, dataset: Any, consumed: int, forward_only: bool) -> dict[str, float]:
        self.mode.before_schedule(dataset, consumed, forward_only)
        outputs = self.run_schedule(dataset, consumed, forward_only)
        return metrics.reduce_metrics(outputs, self.mode.metric_names, self.dp, self.pp)

    def train_step(self, dataset: Any = None) -> dict[str, float]:
        """One optimizer step on the next global batch of `dataset` (default: the training
        set; a loop that makes its data as it trains, such as RL's rollout batches, passes
        it), read from sample `consumed_samples` on. Returns the step's metrics."""
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        values = self._metrics(self.datasets[0] if dataset is None else dataset,
                               self.consumed_samples, False)
        finite_check.before_step(self, values)
        ok, grad_norm, _ = self.optimizer.step()
        if self.args.check_for_nan_in_loss_and_grad:
            finite_check.check_grad_norm(self.iteration + 1, grad_norm)
        if ok:
            self.scheduler.step(increment=self.global_batch_size)
        self.iteration += 1
        self.consumed_samples += self.global_batch_size
        return {"loss": values[self.mode.loss_name], **values,
                "grad_norm": float(grad_norm or 0.0), "lr": self.learning_rate(),
                "skipped": not ok, "loss_scale": float(self.optimizer.get_loss_scale())}

    def skip_step(self) -> None:
        """Count a step that is not taken (its global batch consumed, the learning rate
        schedule where it was): RL's mini-batch whose every sample was skipped."""
        self.iteration += 1
        self.consumed_samples += self.global_batch_size

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def evaluate_metrics(self) -> dict[str, float] | None:
        """The mode's metrics averaged over --eval-iters validation batches (None without
        validation data)."""
        if self.datasets[1] is None:
            return None
        self.model.eval()
        totals: dict[str, float] = {}
        with torch.no_grad():
            for _ in range(self.args.eval_iters):
                values = self._metrics(self.datasets[1], self.consumed_valid_samples, True)
                self.consumed_valid_samples += self.global_batch_size
                for name, value in values.items():
                    totals[name] = totals.get(name, 0.0) + value / self.args.eval_iters
        self.model.train()
        return totals

    def evaluate(self) -> float | None:
        """The validation loss (see evaluate_metrics)."""
        values = self.evaluate_metrics()
        return None if values is None else values[self.mode.loss_name]

    def train(self) -> list[dict[str, float]]:
        a = self.args
        history = []
        self.model.train()
        # Every sequence a sample puts through the model (both sides of a preference pair).
        tokens_per_sample = self.mode.sequences_per_sample * a.seq_length
        tokens_per_iter = self.global_batch_size * tokens_per_sample
        flops_per_token = metrics.flops_per_token(self.model_args, self.meta.padded_vocab_size,
                                                  a.seq_length)
        start = window_start = time.time()
        window_iters = 0
        while self.iteration < self.train_iters:
            stats = self.train_step()
            history.append(stats)
            window_iters += 1
            if self.iteration % a.log_interval == 0 or self.iteration == self.train_iters:
                tps = window_iters * tokens_per_iter / max(time.time() - window_start, 1e-9)
                stats.update(tokens_per_sec=tps, tflops=tps * flops_per_token
                             / torch.distributed.get_world_size() / 1e12)
                eta = (time.time() - start) / self.iteration * (self.train_iters - self.iteration)
                metrics.log_iteration(
                    self.writer, stats, iteration=self.iteration, train_iters=self.train_iters,
                    consumed_tokens=self.consumed_samples * tokens_per_sample,
                    metric_names=self.mode.metric_names, eta=eta)
                window_start, window_iters = time.time(), 0
            if a.eval_interval and self.iteration % a.eval_interval == 0:
                if (values := self.evaluate_metrics()) is not None:
                    metrics.log_validation(self.writer, values, iteration=self.iteration,
                                           loss_name=self.mode.loss_name)
            if self.save_or_exit():
                break
        else:
            self.save_at_end()
        self.close()
        return history

    # ---- checkpoints and logs (a loop of its own, such as RL's, calls these) ----------
    def save_or_exit(self, step: int | None = None,
                     save: Callable[[], None] | None = None) -> bool:
        """After step `step` (default: the iteration; a loop counting its own steps passes
        its count): save at --save-interval; at --exit-interval save (once) and return True
        (stop). `save` saves (default: this trainer's checkpoint; a loop with more models
        saves them all)."""
        a = self.args
        step = self.iteration if step is None else step
        save = save or self.save
        saved = False
        if a.save and a.save_interval and step % a.save_interval == 0:
            save()
            saved = True
        if a.exit_interval and step % a.exit_interval == 0:
            if a.save and not saved:
                save()
            return True
        return False

    def save_at_end(self, step: int | None = None,
                    save: Callable[[], None] | None = None) -> None:
        """The loop ran to its end: save unless step `step` was saved at --save-interval."""
        a = self.args
        step = self.iteration if step is None else step
        if a.save and (not a.save_interval or step % a.save_interval):
            (save or self.save)()

    def save(self) -> None:
        """A checkpoint of this trainer's model, optimizer, schedule, mode state and counts."""
        checkpointing.save(self)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars to the run's TensorBoard / W&B writer (on the rank that logs), at `step`."""
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        """The end of the run's logs (the writer flushed and closed)."""
        if self.writer:
            self.writer.close()


def _check_same_layout(args: argparse.Namespace, first: argparse.Namespace) -> None:
    """A companion Trainer runs on the first one's process groups: the same layout flags."""
    for flag in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "expert_model_parallel_size"):
        if getattr(args, flag) != getattr(first, flag):
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: a second model "
                             f"of the run shares the first one's layout "
                             f"({getattr(first, flag)})")


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_patch.training.loop`: the modes registered by the time it parses
    (pretrain and finetune; `python -m megatron_patch train` registers all of them)."""
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Train with validated flags (`arguments.validate`)."""
    logs.setup(args.verbose, args.log_level)
    trainer = Trainer(args)
    trainer.train()
    parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(errors.run_main("megatron-patch train", main))
