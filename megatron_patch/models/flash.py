"""`--use-flash-attn`: which flash attention serves training, and the core attentions that run it.

In order of preference:
1. Transformer Engine, where it is importable on a GPU: its layer spec and fused attention (TE
   picks its FlashAttention or cuDNN backend).
2. The `flash_attn` package, on a CUDA device with fp16/bf16 weights: `FlashAttnDotProductAttention`
   calls `flash_attn_func` for causal self-attention without a mask (every training step of
   pretraining and padded SFT); other calls (packed sequences, padded prompts) go to 3.
3. torch's `scaled_dot_product_attention` with its FlashAttention kernel first in the priority
   list (`FlashSDPADotProductAttention`): FlashAttention on CUDA (fp16/bf16), torch's flash
   attention for CPU. A call the flash kernel cannot take (a padding mask on CUDA, dropout on
   CPU) falls to the next kernel (memory-efficient, cuDNN, math) rather than failing.

Selection probes the kernel with the model's head shapes and dtype on the device, and the
startup log names the kernel that serves the training step. Refused, with the reason: where no
flash kernel can serve the training step (CUDA with fp32 weights: flash kernels need fp16 or
bf16) and ALiBi models (their scores carry a per-head bias, which neither flash path takes here).
Sliding-window layers keep Megatron-Core's masked attention, as without the flag.

Both core attentions are subclasses of the default one (no parameters of their own), so
checkpoints, numerics (fp32: rounding only) and the fallbacks are the default path's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_patch import cpu_mode
from megatron_patch.models.sdpa_attention import SDPADotProductAttention
from megatron_patch.models.spec import ModelArgs

# Flash first; the rest (in torch's own default order) only for calls flash cannot take.
_FLASH_FIRST = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]


class FlashSDPADotProductAttention(SDPADotProductAttention):
    """The SDPA core attention with torch's FlashAttention kernel preferred."""

    def _dropout_in_kernel(self) -> bool:
        # CUDA's flash kernel applies dropout itself; torch's CPU flash kernel has none (such a
        # call would fall to the math kernel), so on CPU dropout stays on megatron's path.
        return not cpu_mode.is_enabled()

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        p = self.attention_dropout.p if self.training else 0.0
        with sdpa_kernel(_FLASH_FIRST, set_priority=True), _dropout_rng(self.config, p):
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, is_causal=is_causal, dropout_p=p,
                scale=self._sdpa_scale, enable_gqa=self._gqa)


class FlashAttnDotProductAttention(FlashSDPADotProductAttention):
    """The `flash_attn` package's kernel for causal self-attention without a mask."""

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        if not (is_causal and attn_mask is None and query.is_cuda
                and query.dtype in (torch.float16, torch.bfloat16)):
            return super()._attend(query, key, value, attn_mask, is_causal)
        from flash_attn import flash_attn_func

        p = self.attention_dropout.p if self.training else 0.0
        # [b, n, s, d] views -> flash_attn's [b, s, n, d] (last dim stays contiguous); it takes
        # fewer key/value heads than query heads as grouped-query attention.
        with _dropout_rng(self.config, p):
            out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2),
                                  value.transpose(1, 2), dropout_p=p,
                                  softmax_scale=self._sdpa_scale, causal=True)
        return out.transpose(1, 2)


def _dropout_rng(config, p: float):
    """Megatron's RNG for attention dropout: the tracker's model-parallel stream, as its own
    DotProductAttention draws it (different per TP rank, whose heads differ)."""
    import contextlib

    if p == 0.0 or config.sequence_parallel:
        return contextlib.nullcontext()
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker().fork()


@dataclass(frozen=True)
class AttentionChoice:
    transformer_impl: str  # the layer spec: "transformer_engine" or "local"
    core_attention: type | None  # the local spec's core attention (None: the default)
    description: str  # for the startup log


def _flash_sdpa_problem(args: ModelArgs, tp: int, dtype: torch.dtype,
                        device: torch.device) -> str | None:
    """None if torch's flash kernel runs this model's training attention (causal, no mask,
    forward and backward) on `device` in `dtype`; else the reason torch gives."""
    heads = max(1, args.num_attention_heads // tp)
    groups = max(1, args.megatron_query_groups // tp)
    q = torch.randn(1, heads, 16, args.kv_channels, device=device, dtype=dtype,
                    requires_grad=True)
    kv = torch.randn(1, groups, 16, args.kv_channels, device=device, dtype=dtype)
    with warnings.catch_warnings(record=True) as why:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                torch.nn.functional.scaled_dot_product_attention(
                    q, kv, kv, is_causal=True, enable_gqa=heads != groups).sum().backward()
            return None
        except RuntimeError as e:
            reasons = [str(w.message) for w in why] or [str(e)]
    return "; ".join(reasons)


def _flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def select(args: ModelArgs, tp: int, dtype: torch.dtype, transformer_engine: bool
           ) -> AttentionChoice:
    """The attention `--use-flash-attn` gets for this model, or ValueError with the reason."""
    if transformer_engine:
        return AttentionChoice("transformer_engine", None,
                               "Transformer Engine fused attention (FlashAttention or cuDNN, "
                               "chosen by Transformer Engine)")
    if args.position_embedding_type == "alibi":
        raise ValueError("--use-flash-attn: ALiBi attention adds a per-head bias to the scores, "
                         "which no flash kernel here takes; leave the flag off")
    if args.attn_logit_softcapping:
        raise ValueError("--use-flash-attn: attention logit soft-capping (Gemma 2, "
                         "attn_logit_softcapping) changes the scores inside the softmax, which "
                         "no flash kernel here takes; leave the flag off")
    if args.attention_sinks:
        raise ValueError("--use-flash-attn: attention sinks (GPT-OSS) add a learned logit to "
                         "every softmax's denominator, which no flash kernel here takes; leave "
                         "the flag off")
    if args.mla is not None:
        raise ValueError("--use-flash-attn: multi-latent attention (DeepSeek) runs Megatron-Core's "
                         "MLA core attention, not ours; leave the flag off")
    device = cpu_mode.device()
    cuda = device.type == "cuda"
    window = " (sliding-window layers: Megatron-Core's masked attention)" \
        if args.sliding_window is not None else ""
    if cuda and dtype in (torch.float16, torch.bfloat16) and _flash_attn_importable():
        import flash_attn

        return AttentionChoice("local", FlashAttnDotProductAttention,
                               f"flash_attn {flash_attn.__version__} (flash_attn_func) for causal "
                               f"self-attention, torch SDPA otherwise{window}")
    problem = _flash_sdpa_problem(args, tp, dtype, device)
    if problem is not None:
        hint = " (flash kernels need fp16 or bf16 weights: add --bf16)" \
            if cuda and dtype == torch.float32 else ""
        raise ValueError(f"--use-flash-attn: no flash attention kernel for this model on "
                         f"{device.type} in {str(dtype).removeprefix('torch.')}{hint}: "
                         f"{problem}. Install Transformer Engine or flash_attn, or leave the "
                         "flag off")
    kernel = "FlashAttention kernel (CUDA)" if cuda else "flash attention kernel for CPU"
    return AttentionChoice("local", FlashSDPADotProductAttention,
                           f"torch scaled_dot_product_attention, {kernel}{window}")
