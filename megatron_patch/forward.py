"""Forward passes through Megatron-Core's pipeline schedules, and the language-model loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def masked_vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                        vocab_size: int) -> torch.Tensor:
    """Per-token cross entropy on vocab-parallel logits [..., V_padded / TP].

    Rows added by vocabulary padding are not part of the model's vocabulary: their logits are
    excluded from the softmax, so the loss equals the unpadded model's (Hugging Face's) loss.
    """
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        # The whole vocabulary is here: torch's fused log-softmax and NLL, without megatron's
        # fp32 copy and separate max/exp/sum/div passes over [b, s, V], which made the loss a
        # large share of a small model's step on CPU. Padding rows get the lowest float added
        # (one pass, gradient passed through), which drops them from the softmax as the mask
        # below does; slicing them off would copy [b, s, V] forward and backward.
        logits = logits.float()
        if logits.shape[-1] > vocab_size:
            shift = torch.zeros(logits.shape[-1], device=logits.device)
            shift[vocab_size:] = torch.finfo(torch.float32).min
            logits = logits + shift
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    local = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * local
    # megatron's cross entropy works in place on its input: always hand it a fresh fp32 copy.
    logits = logits.to(torch.float32, copy=True)
    if start + local > vocab_size:
        padding = torch.arange(start, start + local, device=logits.device) >= vocab_size
        logits.masked_fill_(padding, torch.finfo(logits.dtype).min)
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits from the vocab-parallel shards, padding rows dropped."""
    from megatron.core import tensor_parallel

    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return full[..., :vocab_size]


def forward_logits(model: list[torch.nn.Module], tokens: torch.Tensor, vocab_size: int,
                   seq_length: int | None = None) -> dict[str, Any] | None:
    """Run one batch through the model chunks of this rank (any TP/PP/VPP layout).

    Returns, on the last pipeline stage, {'logits': [b, s, vocab], 'loss': mean next-token loss}
    and None on the other stages.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, -1)
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.ones_like(tokens, dtype=torch.float)
    loss_mask[:, -1] = 0

    def loss_func(output: torch.Tensor):
        per_token = masked_vocab_parallel_cross_entropy(output, labels, vocab_size)
        loss_sum = (per_token * loss_mask).sum()
        tokens_counted = loss_mask.sum().to(torch.int)
        logits = gather_vocab(output, vocab_size)
        # The schedule divides the returned loss in place: report copies.
        return loss_sum, tokens_counted, {"logits": logits.detach(),
                                          "loss_sum": loss_sum.detach().clone(),
                                          "tokens": tokens_counted.clone()}

    def step(data_iterator, chunk):
        next(data_iterator)
        return chunk(tokens, positions, None), loss_func

    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=[iter([None]) for _ in model],
            model=model,
            num_microbatches=1,
            seq_length=seq_length or seq,
            micro_batch_size=batch,
            forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    (out,) = results
    return {"logits": out["logits"], "loss": (out["loss_sum"] / out["tokens"]).item()}


def pipelined(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
              mask: torch.Tensor | None, on_last: Callable[[torch.Tensor], torch.Tensor],
              result_like: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """`on_last(model(tokens, positions, mask, **kwargs))` on every pipeline stage, for one
    model chunk per stage (no virtual stages), forward only and without a schedule (generation
    steps through its KV cache one call at a time, which a schedule cannot): each stage runs
    its layers on the previous stage's hidden states and sends its own on; the last stage
    applies `on_last` to the logits, and its result (shaped and typed like `result_like`)
    is broadcast to every stage, so all of them continue with the same numbers."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return on_last(model(tokens, positions, mask, **kwargs))
    config = get_attr_wrapped_model(model, "config")
    if config.sequence_parallel:
        raise ValueError("a pipelined forward without a schedule needs --sequence-parallel off")
    if not parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        # Sequence-first hidden states, as megatron's stages pass them.
        hidden = torch.empty((tokens.shape[1], tokens.shape[0], config.hidden_size),
                             dtype=config.pipeline_dtype or config.params_dtype,
                             device=tokens.device)
        torch.distributed.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        get_attr_wrapped_model(model, "set_input_tensor")(hidden)
    output = model(tokens, positions, mask, **kwargs)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        result = on_last(output).contiguous()
    else:
        torch.distributed.send(output.contiguous(),
                               dst=parallel_state.get_pipeline_model_parallel_next_rank())
        result = torch.empty_like(result_like)
    torch.distributed.broadcast(result, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return result
