"""The training loop: Megatron-Core schedules, DDP, optimizer, scheduler, checkpoints, logging."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch

from megatron_patch import checkpoint, cpu_mode, logs, parallel
from megatron_patch.forward import masked_vocab_parallel_cross_entropy
from megatron_patch.models import build_stages, family_for, load_hf_config, pad_vocab_size
from megatron_patch.models.scratch import scratch_hf_config
from megatron_patch.training import data, kv_replicas, metrics, optim_state

log = logging.getLogger("megatron_patch.train")
_ITERATION_DIR = re.compile(r"iter_(\d+)")


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def lm_loss(labels: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int,
            output: torch.Tensor):
    """Sum of next-token losses over unmasked tokens, and their count.

    The schedule then divides by the tokens of the whole global batch (all microbatches and DP
    ranks: `calculate_per_token_loss`), so the loss and its gradients do not depend on how the
    batch is split.
    """
    per_token = masked_vocab_parallel_cross_entropy(output, labels, vocab_size)
    mask = loss_mask.float()
    loss_sum = (per_token * mask).sum()
    tokens = mask.sum()
    return loss_sum, tokens.to(torch.int), {"lm loss": torch.stack([loss_sum.detach().clone(),
                                                                    tokens.detach().clone()])}


def lm_forward_step(vocab_size: int) -> Callable:
    """Forward step for pretraining and SFT batches (an attention mask only when packed)."""

    def step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        return output, partial(lm_loss, batch["labels"], batch["loss_mask"], vocab_size)

    return step


def architecture_conflicts(args: argparse.Namespace, m: Any) -> list[str]:
    """The architecture flags given that contradict the model args `m` of a loaded checkpoint
    (Megatron-LM's names; flags not given are taken from the checkpoint)."""
    valued = [("--num-layers", args.num_layers, m.num_layers),
              ("--hidden-size", args.hidden_size, m.hidden_size),
              ("--ffn-hidden-size", args.ffn_hidden_size, m.ffn_hidden_size),
              ("--num-attention-heads", args.num_attention_heads, m.num_attention_heads),
              ("--num-query-groups", args.num_query_groups, m.num_query_groups),
              ("--max-position-embeddings", args.max_position_embeddings,
               m.max_sequence_length),
              ("--normalization", args.normalization, m.normalization),
              ("--position-embedding-type (or --use-alibi-mask / "
               "--use-rotary-position-embeddings / --no-position-embedding)",
               args.position_embedding_type, m.position_embedding_type)]
    switches = [("--swiglu", args.swiglu, m.gated_linear_unit and m.activation == "silu"),
                ("--group-query-attention", args.group_query_attention,
                 m.num_query_groups != m.num_attention_heads),
                ("--untie-embeddings-and-output-weights", args.untie_embeddings_and_output_weights,
                 not m.share_embeddings_and_output_weights),
                ("--disable-bias-linear", args.disable_bias_linear, not m.add_bias_linear)]
    return ([f"{flag} {given} (the checkpoint has {saved})"
             for flag, given, saved in valued if given is not None and given != saved]
            + [f"{flag} (the checkpoint's architecture does not have it)"
               for flag, given, saved in switches if given and not saved])


# The learning-rate schedule's saved values, and the flags that set them.
_SCHEDULE_FLAGS = {
    "max_lr": "--lr", "min_lr": "--min-lr", "lr_decay_style": "--lr-decay-style",
    "lr_warmup_steps": "--lr-warmup-iters/--lr-warmup-tokens",
    "lr_decay_steps": "--train-iters/--train-tokens/--lr-decay-iters",
    "start_wd": "--weight-decay", "end_wd": "--weight-decay",
    "wd_incr_steps": "--train-iters/--train-tokens",
}


class Trainer:
    """Sets up everything from Megatron-LM style flags, then trains, evaluates and saves."""

    def __init__(self, args: argparse.Namespace, forward_step: Callable | None = None,
                 datasets: list[Any] | None = None) -> None:
        from megatron.core import parallel_state

        self.args = args
        metrics.check(args)
        if args.fp8_format is not None:
            raise ValueError("--fp8-format: FP8 needs Transformer Engine on a GPU and is not "
                             "wired up in this version; use --bf16")
        parallel.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                            expert_model_parallel_size=args.expert_model_parallel_size,
                            seed=args.seed)
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
        tokens_per_iter = self.global_batch_size * args.seq_length

        self._setup_model()
        self.datasets = datasets
        if args.train_mode == "finetune" and datasets is None:
            self.datasets = self._build_sft_datasets()
        if args.train_iters:
            self.train_iters = args.train_iters
        elif args.train_tokens:
            self.train_iters = -(-args.train_tokens // tokens_per_iter)
        else:
            from megatron_patch.data.sft import epochs_to_iters

            self.train_iters = epochs_to_iters(len(self.datasets[0]), args.epochs,
                                               self.global_batch_size)
        if self.datasets is None:
            self.datasets = self._build_datasets()
        warmup = (args.lr_warmup_iters if args.lr_warmup_tokens is None
                  else -(-args.lr_warmup_tokens // tokens_per_iter))
        self._setup_optimizer(warmup)
        self.iteration, self.consumed_samples, self.consumed_valid_samples = 0, 0, 0
        if args.load:
            self._load()
        if args.save:
            self._check_save_dir()
        self.forward_step = forward_step or lm_forward_step(self.vocab_size)
        is_last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
        self.writer = metrics.open_writer(args, is_last)

    # ---- setup -------------------------------------------------------------------------
    def _setup_model(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

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
        self.model_args = family_for(self.hf_config).model_args(self.hf_config)
        if args.load and (conflicts := architecture_conflicts(args, self.model_args)):
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

        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        overrides: dict[str, Any] = dict(
            calculate_per_token_loss=True, init_method_std=args.init_method_std,
        )
        if args.recompute_granularity:
            overrides["recompute_granularity"] = args.recompute_granularity
            if args.recompute_granularity == "full":
                overrides.update(recompute_method=args.recompute_method,
                                 recompute_num_layers=args.recompute_num_layers)
        impl, core_attention = args.transformer_impl, None
        if args.use_flash_attn:
            from megatron_patch.models import flash
            from megatron_patch.models.layers import transformer_engine_available

            choice = flash.select(self.model_args, self.tp, dtype, transformer_engine=(
                impl != "local" and transformer_engine_available()))
            impl, core_attention = choice.transformer_impl, choice.core_attention
            if torch.distributed.get_rank() == 0:
                log.info("--use-flash-attn: %s", choice.description)
        # The layout is checked against the model before it is built.
        built = build_stages(self.hf_config, self.meta.padded_vocab_size, params_dtype=dtype,
                             sequence_parallel=args.sequence_parallel, transformer_impl=impl,
                             core_attention=core_attention, **overrides)
        self.config, (module,) = built.config, built.chunks
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=dtype != torch.float32,
            overlap_grad_reduce=args.overlap_grad_reduce,
            use_distributed_optimizer=args.use_distributed_optimizer,
        )
        # A multi-query model's replicated KV heads start identical (a loaded checkpoint's
        # are already; this matters from scratch) and stay so (training/kv_replicas.py).
        kv_replicas.tie_copies([module], self.model_args)
        self.model = DistributedDataParallel(config=self.config, ddp_config=ddp_config,
                                             module=module)
        self.config.finalize_model_grads_func = kv_replicas.finalize_model_grads_func(
            finalize_model_grads, self.model_args, args.use_distributed_optimizer, self.dp)
        self.config.no_sync_func = self.model.no_sync

    def _setup_optimizer(self, warmup_iters: int) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        a = self.args
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay,
                adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_eps=a.adam_eps,
                clip_grad=a.clip_grad, bf16=a.bf16, fp16=a.fp16,
                params_dtype=self.config.params_dtype, loss_scale=a.loss_scale,
                initial_loss_scale=a.initial_loss_scale, min_loss_scale=a.min_loss_scale,
                loss_scale_window=a.loss_scale_window, hysteresis=a.hysteresis,
                use_distributed_optimizer=a.use_distributed_optimizer,
            ),
            [self.model],
        )
        self.config.grad_scale_func = self.optimizer.scale_loss
        gbs = self.global_batch_size
        decay_iters = a.lr_decay_iters or self.train_iters
        if a.lr_decay_style != "constant" and warmup_iters >= decay_iters:
            raise ValueError(f"{warmup_iters} warmup iterations leave no room to decay the "
                             f"learning rate within {decay_iters} iterations")
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=a.lr, min_lr=a.min_lr,
            lr_warmup_steps=warmup_iters * gbs, lr_decay_steps=decay_iters * gbs,
            lr_decay_style=a.lr_decay_style, start_wd=a.weight_decay, end_wd=a.weight_decay,
            wd_incr_steps=self.train_iters * gbs, wd_incr_style="constant",
            # Megatron-LM's flags; a resume otherwise refuses a different schedule (_load).
            override_opt_param_scheduler=a.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=not a.override_opt_param_scheduler,
        )

    def _build_datasets(self) -> list[Any]:
        a = self.args
        if not a.data_path:
            raise ValueError("give --data-path (datasets made by `megatron-patch preprocess`)")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.tokenizer_model or self.hf_source)
        self._check_tokenizer(tok)
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {a.tokenizer_model or self.hf_source} has no EOS token")
        gbs = self.global_batch_size
        evals = (self.train_iters // a.eval_interval + 1) * a.eval_iters
        return data.build_gpt_datasets(
            a.data_path, a.split, a.seq_length, a.seed,
            data.DatasetTokenizer(eod=tok.eos_token_id, vocab_size=self.vocab_size),
            [self.train_iters * gbs, evals * gbs, 0], a.data_cache_path,
        )

    def _check_tokenizer(self, tok: Any) -> None:
        """Token ids past the model's vocabulary would index padding rows, whose logits the
        loss masks out: a tokenizer with more ids than the model has tokens is refused."""
        if len(tok) > self.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tok)} tokens, the model {self.vocab_size}: grow the "
                "model with `megatron-patch extend-vocab` (EXTRA_VOCAB_SIZE only adds "
                "padding rows, which are not trained and not exported)")

    def _build_sft_datasets(self) -> list[Any]:
        from transformers import AutoTokenizer

        from megatron_patch.data.sft import build_sft_dataset

        a = self.args
        tok = AutoTokenizer.from_pretrained(a.tokenizer_model or self.hf_source)
        self._check_tokenizer(tok)
        out = []
        for path in (a.train_data_path, a.valid_data_path):
            if not path:
                out.append(None)
                continue
            dataset, summary = build_sft_dataset(
                path, tok, a.seq_length, pack=a.pack_sequences, skip_long=a.skip_long_samples,
                skip_bad=a.skip_bad_lines, seed=a.seed)
            if torch.distributed.get_rank() == 0:
                print(f"SFT data {path}: {summary.samples} samples in {summary.sequences} "
                      f"sequences; truncated {summary.truncated}, skipped as too long "
                      f"{summary.skipped_long}, bad records skipped {summary.bad_records}",
                      flush=True)
            out.append(dataset)
        return out + [None]

    # ---- steps -------------------------------------------------------------------------
    def _run_schedule(self, dataset, consumed: int, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches = data.microbatches(dataset, consumed, self.args.micro_batch_size,
                                    self.num_microbatches, self.dp_rank, self.dp)
        return get_forward_backward_func()(
            forward_step_func=self.forward_step, data_iterator=batches, model=[self.model],
            num_microbatches=self.num_microbatches, seq_length=self.args.seq_length,
            micro_batch_size=self.args.micro_batch_size, forward_only=forward_only,
        )

    def _reduce_loss(self, outputs: list[dict]) -> float:
        """Token-weighted mean loss of the global batch, made known to every rank."""
        from megatron.core import parallel_state

        total = torch.zeros(2, device=cpu_mode.device())
        for out in outputs:
            total += out["lm loss"].float()
        # Collectives over one rank are skipped: on a busy CPU each costs a thread hand-off.
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and self.dp > 1:
            torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        if self.pp > 1:
            torch.distributed.broadcast(
                total, parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group())
        return (total[0] / total[1].clamp(min=1)).item()

    def train_step(self) -> dict[str, float]:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run_schedule(self.datasets[0], self.consumed_samples, False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=self.global_batch_size)
        self.iteration += 1
        self.consumed_samples += self.global_batch_size
        return {"loss": self._reduce_loss(outputs), "grad_norm": float(grad_norm or 0.0),
                "lr": self.optimizer.param_groups[0]["lr"], "skipped": not ok,
                "loss_scale": float(self.optimizer.get_loss_scale())}

    def evaluate(self) -> float | None:
        if self.datasets[1] is None:
            return None
        self.model.eval()
        losses = []
        with torch.no_grad():
            for _ in range(self.args.eval_iters):
                outputs = self._run_schedule(self.datasets[1], self.consumed_valid_samples, True)
                self.consumed_valid_samples += self.global_batch_size
                losses.append(self._reduce_loss(outputs))
        self.model.train()
        return float(np.mean(losses))

    def flops_per_token(self) -> float:
        """Approximate training FLOPs per token (forward + backward, 6N plus attention)."""
        m = self.model_args
        attn = m.hidden_size * (m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels
        attn += m.num_attention_heads * m.kv_channels * m.hidden_size
        mlp = (3 if m.gated_linear_unit else 2) * m.hidden_size * m.ffn_hidden_size
        params = m.num_layers * (attn + mlp) + self.meta.padded_vocab_size * m.hidden_size
        attention_scores = 2 * m.num_layers * self.args.seq_length * m.num_attention_heads \
            * m.kv_channels
        return 6 * params + 6 * attention_scores

    def train(self) -> list[dict[str, float]]:
        a = self.args
        history = []
        self.model.train()
        world = torch.distributed.get_world_size()
        tokens_per_iter = self.global_batch_size * a.seq_length
        start = window_start = time.time()
        window_iters = 0
        while self.iteration < self.train_iters:
            stats = self.train_step()
            history.append(stats)
            window_iters += 1
            if self.iteration % a.log_interval == 0 or self.iteration == self.train_iters:
                elapsed = time.time() - window_start
                tps = window_iters * tokens_per_iter / max(elapsed, 1e-9)
                stats.update(tokens_per_sec=tps,
                             tflops=tps * self.flops_per_token() / world / 1e12)
                eta = (time.time() - start) / self.iteration * (self.train_iters - self.iteration)
                self._log(stats, eta)
                window_start, window_iters = time.time(), 0
            if a.eval_interval and self.iteration % a.eval_interval == 0:
                self._log_eval(self.evaluate())
            saved = False
            if a.save and a.save_interval and self.iteration % a.save_interval == 0:
                self.save()
                saved = True
            if a.exit_interval and self.iteration % a.exit_interval == 0:
                if a.save and not saved:
                    self.save()
                break
        else:
            if a.save and (not a.save_interval or self.iteration % a.save_interval):
                self.save()
        if self.writer:
            self.writer.close()
        return history

    def _log(self, s: dict[str, float], eta: float) -> None:
        consumed_tokens = self.consumed_samples * self.args.seq_length
        if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
            print(f"iteration {self.iteration:6d}/{self.train_iters} | consumed tokens "
                  f"{consumed_tokens} | lm loss {s['loss']:.6f} | lr {s['lr']:.3e} | grad norm "
                  f"{s['grad_norm']:.4f} | loss scale {s['loss_scale']:g} | tokens/s "
                  f"{s['tokens_per_sec']:.1f} | TFLOP/s/device {s['tflops']:.4f} | "
                  f"ETA {eta:.0f}s", flush=True)
        if self.writer:
            for key, value in (("lm loss", s["loss"]), ("learning-rate", s["lr"]),
                               ("grad-norm", s["grad_norm"]), ("loss-scale", s["loss_scale"]),
                               ("tokens-per-sec", s["tokens_per_sec"]),
                               ("tflops-per-device", s["tflops"])):
                self.writer.add_scalar(key, value, self.iteration)
            self.writer.add_scalar("lm loss vs tokens", s["loss"], consumed_tokens)

    def _log_eval(self, loss: float | None) -> None:
        if loss is None:
            return
        if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
            print(f"validation at iteration {self.iteration} | lm loss {loss:.6f} | "
                  f"ppl {float(np.exp(min(loss, 20))):.3f}", flush=True)
        if self.writer:
            self.writer.add_scalar("validation lm loss", loss, self.iteration)

    # ---- checkpoints -------------------------------------------------------------------
    # Lets a distributed-optimizer checkpoint load at another TP/PP/DP.
    _OPTIM_METADATA: ClassVar[dict] = {"distrib_optim_sharding_type": "fully_reshardable"}

    def _rng_state(self):
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        state = {"random": random.getstate(), "numpy": np.random.get_state(),
                 "torch": torch.get_rng_state(),
                 "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
        return ShardedObject(
            "rng_state", state, (self.pp, self.tp, self.dp),
            (parallel_state.get_pipeline_model_parallel_rank(),
             parallel_state.get_tensor_model_parallel_rank(), self.dp_rank),
            replica_id=0,
        )

    def _state(self, loading: bool, optimizer: bool = True, rng: bool = True) -> dict[str, Any]:
        model_sd = self.model.module.sharded_state_dict()
        state: dict[str, Any] = {"model": model_sd}
        if optimizer:
            optim_state.ensure_adam_state(self.optimizer)
            state["optimizer"] = self.optimizer.sharded_state_dict(
                model_sd, is_loading=loading, metadata=self._OPTIM_METADATA)
        if rng:
            state["rng_state"] = self._rng_state()
        return state

    def save(self) -> None:
        a = self.args
        state = self._state(loading=False)
        state.update(
            checkpoint_version=3.0, iteration=self.iteration,
            consumed_samples=self.consumed_samples,
            consumed_valid_samples=self.consumed_valid_samples,
            opt_param_scheduler=self.scheduler.state_dict(),
            parallel_layout=[self.tp, self.pp, self.dp], expert_parallel=self.ep,
            seq_length=a.seq_length,
        )
        if torch.distributed.get_rank() == 0:
            self._write_model_files(a.save)
        checkpoint.save(a.save, self.iteration, state)
        if torch.distributed.get_rank() == 0:
            print(f"saved checkpoint at iteration {self.iteration} to {a.save}", flush=True)

    def _check_save_dir(self) -> None:
        """Refuse a --save directory that holds another model's checkpoints (saving would mix
        the two; its megatron_patch.json and hf/ would describe this model's iterations), or
        iterations after the one this run starts from (saving would overwrite them and move
        the tracker back) unless --overwrite-checkpoints."""
        a = self.args
        if os.path.isfile(os.path.join(a.save, checkpoint.META)):
            saved = checkpoint.read_meta(a.save)
            saved_hf = load_hf_config(os.path.join(a.save, checkpoint.HF_DIR))
            theirs = {"architecture": saved.architecture,
                      "padded_vocab_size": saved.padded_vocab_size,
                      **dataclasses.asdict(family_for(saved_hf).model_args(saved_hf))}
            ours = {"architecture": self.meta.architecture,
                    "padded_vocab_size": self.meta.padded_vocab_size,
                    **dataclasses.asdict(self.model_args)}
            if differ := [f"{k} {theirs[k]!r} there, {ours[k]!r} here" for k in ours
                          if theirs.get(k) != ours[k]]:
                raise ValueError(f"--save {a.save} holds checkpoints of another model "
                                 f"({os.path.join(a.save, checkpoint.META)}, "
                                 f"{os.path.join(a.save, checkpoint.HF_DIR, 'config.json')}): "
                                 f"{'; '.join(differ[:6])}; choose another --save directory")
        if a.overwrite_checkpoints:
            return
        saved_iterations = [int(m.group(1)) for m in map(_ITERATION_DIR.fullmatch,
                                                          _listdir(a.save)) if m]
        if newer := sorted(i for i in saved_iterations if i > self.iteration):
            raise ValueError(f"--save {a.save} holds iterations {newer} after the one this run "
                             f"starts from ({self.iteration}): saving would overwrite them and "
                             f"point {checkpoint.TRACKER} back. Resume them with --load "
                             f"{a.save}, choose another --save, or pass --overwrite-checkpoints")

    def _write_model_files(self, root: str) -> None:
        """Give the save directory what export needs: HF config/tokenizer files and meta
        (where it has them, _check_save_dir found them to describe this model)."""
        from megatron_patch.convert.hf_io import copy_non_weight_files

        if os.path.isfile(os.path.join(root, checkpoint.META)):
            return
        hf_dir = os.path.join(root, checkpoint.HF_DIR)
        copy_non_weight_files(self.hf_source, hf_dir)
        if not self.args.load:
            with open(os.path.join(hf_dir, "config.json"), "w") as f:
                json.dump(self.hf_config, f, indent=2)
        checkpoint.write_meta(root, self.meta)

    def _load(self) -> None:
        from megatron.core import dist_checkpointing

        a = self.args
        iteration = checkpoint.latest_iteration(a.load)
        common = dist_checkpointing.load_common_state_dict(
            checkpoint.existing_iteration_dir(a.load, iteration))  # pickles verified first
        # A converted model ("release") or --finetune: weights only, fresh run from iteration 0.
        if a.finetune or iteration == "release" or "iteration" not in common:
            checkpoint.load_model(a.load, self.model.module, iteration)
            log.info("loaded weights from %s (%s): fresh run", a.load, iteration)
            return
        saved_seq = common.get("seq_length")
        if saved_seq is not None and saved_seq != a.seq_length:
            raise ValueError(f"--seq-length {a.seq_length}: {a.load} was trained at --seq-length "
                             f"{saved_seq}, which a resumed run keeps (to change it, start a new "
                             "run from its weights with --finetune)")
        saved_ep = common.get("expert_parallel", 1)
        if saved_ep != self.ep and not a.no_load_optim:
            # Megatron-Core keeps expert and dense optimizer state apart only when EP > 1, so
            # the optimizer state does not reshard across EP (the weights do).
            raise ValueError(f"{a.load} was saved at --expert-model-parallel-size {saved_ep}; "
                             f"its optimizer state cannot resume at {self.ep}: resume at "
                             f"{saved_ep}, or pass --no-load-optim or --finetune")
        saved_do = optim_state.saved_distributed(common.get("optimizer"))
        if saved_do not in (None, a.use_distributed_optimizer) and not a.no_load_optim:
            # The two keep differently shaped state (Megatron-Core converts neither way).
            saved = "with" if saved_do else "without"
            raise ValueError(f"{a.load} was saved {saved} --use-distributed-optimizer: resume "
                             f"{saved} it, or pass --no-load-optim or --finetune (its optimizer "
                             "state cannot load into the other optimizer)")
        if not a.no_load_optim:
            self._check_schedule(common["opt_param_scheduler"])
        same_layout = list(common.get("parallel_layout", [])) == [self.tp, self.pp, self.dp]
        load_rng = same_layout and not a.no_load_rng
        state = checkpoint.load(a.load, self._state(True, not a.no_load_optim, load_rng),
                                iteration)
        self.model.module.load_state_dict(state["model"])
        if not a.no_load_optim:
            optim_state.load(self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["opt_param_scheduler"])
        if load_rng:
            rng = state["rng_state"]
            random.setstate(rng["random"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            from megatron.core import tensor_parallel

            tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        self.iteration = int(state["iteration"])
        self.consumed_samples = int(state["consumed_samples"])
        self.consumed_valid_samples = int(state.get("consumed_valid_samples", 0))
        log.info("resumed %s at iteration %d", a.load, self.iteration)

    def _check_schedule(self, saved: dict[str, Any]) -> None:
        """Megatron-LM's rule: a resumed learning-rate schedule must equal the command line's
        unless --override-opt-param-scheduler (the command line's) or
        --use-checkpoint-opt-param-scheduler (the checkpoint's) says which to follow."""
        a = self.args
        if a.override_opt_param_scheduler or a.use_checkpoint_opt_param_scheduler:
            return
        given = self.scheduler.state_dict()
        differ = [f"{key} {saved[key]!r} saved, {given[key]!r} given ({flag})"
                  for key, flag in _SCHEDULE_FLAGS.items()
                  if key in saved and saved[key] != given[key]]
        if differ:
            raise ValueError(f"{a.load}: the learning-rate schedule it was saved with differs "
                             f"from the command line: {'; '.join(differ)}. Pass "
                             "--override-opt-param-scheduler to follow the command line, or "
                             "--use-checkpoint-opt-param-scheduler to keep the checkpoint's")


def main(argv: list[str] | None = None) -> int:
    from megatron_patch.training.arguments import parse_args

    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Train with validated flags (`arguments.validate`)."""
    logs.setup(args.verbose, args.log_level)
    trainer = Trainer(args)
    trainer.train()
    parallel.destroy()
    return 0


if __name__ == "__main__":
    from megatron_patch import errors

    raise SystemExit(errors.run_main("megatron-patch train", main))
