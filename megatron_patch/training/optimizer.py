"""The trainer's optimizer (Megatron-Core's Adam, with loss scaling and the distributed
optimizer as the flags ask) and its learning-rate / weight-decay schedule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_patch.training.loop import Trainer


def build_optimizer(t: Trainer) -> tuple[Any, Any]:
    """(optimizer, scheduler) of the trainer's model from its flags; the model's config gets
    the optimizer's loss scaling."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    a = t.args
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay,
            adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_eps=a.adam_eps,
            clip_grad=a.clip_grad, bf16=a.bf16, fp16=a.fp16,
            params_dtype=t.config.params_dtype, loss_scale=a.loss_scale,
            initial_loss_scale=a.initial_loss_scale, min_loss_scale=a.min_loss_scale,
            loss_scale_window=a.loss_scale_window, hysteresis=a.hysteresis,
            use_distributed_optimizer=a.use_distributed_optimizer,
        ),
        [t.model],
    )
    t.config.grad_scale_func = optimizer.scale_loss
    gbs = t.global_batch_size
    warmup_iters = (a.lr_warmup_iters if a.lr_warmup_tokens is None
                    else -(-a.lr_warmup_tokens // (gbs * a.seq_length)))
    decay_iters = a.lr_decay_iters or t.train_iters
    if a.lr_decay_style != "constant" and warmup_iters >= decay_iters:
        raise ValueError(f"{warmup_iters} warmup iterations leave no room to decay the "
                         f"learning rate within {decay_iters} iterations")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=a.lr, min_lr=a.min_lr,
        lr_warmup_steps=warmup_iters * gbs, lr_decay_steps=decay_iters * gbs,
        lr_decay_style=a.lr_decay_style, start_wd=a.weight_decay, end_wd=a.weight_decay,
        wd_incr_steps=t.train_iters * gbs, wd_incr_style="constant",
        # Megatron-LM's flags; a resume otherwise refuses a different schedule.
        override_opt_param_scheduler=a.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not a.override_opt_param_scheduler,
    )
    return optimizer, scheduler
