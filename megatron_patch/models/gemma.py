"""Gemma 2 / Gemma 3 pieces Megatron-Core's local layers lack, plugged in through the layer spec.

- Norms after attention and after the MLP (HF post_attention_layernorm and
  post_feedforward_layernorm): `PostNormRowParallelLinear` is the attention's output projection
  (or the MLP's fc2) followed by a norm of the full hidden state. The norm runs after the
  tensor-parallel reduction, on whole hidden vectors (a slice of the sequence under sequence
  parallelism, which a per-token norm does not mind); its weight is
  `linear_proj.post_layernorm.weight` / `linear_fc2.post_layernorm.weight`, replicated over TP.
- Attention-logit soft-capping, cap * tanh(scores / cap) before the mask and softmax:
  `SoftcapDotProductAttention` (megatron's unfused path; its SDPA fast path cannot cap).
- A RoPE base of their own for the sliding-window layers (Gemma 3's rope_local_base_freq):
  `LocalRotarySelfAttention` replaces the model-wide rotary angles by its own in those layers.
- Final-logit soft-capping: `SoftcapOutputLinear`, adopted by the built output layer.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_patch.models.cached_rotary import CachedRotarySelfAttention
from megatron_patch.models.inference_linear import (
    InferenceColumnParallelLinear,
    InferenceRowParallelLinear,
)
from megatron_patch.models.layers import Norm
from megatron_patch.models.sdpa_attention import SDPADotProductAttention


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


class PostNormRowParallelLinear(InferenceRowParallelLinear):
    """A row-parallel linear (no bias) whose reduced output goes through a norm."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)

        if self.bias is not None:
            raise ValueError("a post-norm linear has no bias (add_bias_linear must be off)")
        self.post_layernorm = Norm(config, output_size, eps=config.layernorm_epsilon)

    def forward(self, input_: torch.Tensor, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        return self.post_layernorm(output), bias


class _SoftcappedSoftmax(torch.nn.Module):
    """Megatron's scale-mask-softmax with the scores soft-capped first."""

    def __init__(self, softmax: torch.nn.Module, cap: float) -> None:
        super().__init__()
        self.softmax = softmax
        self.cap = cap

    def forward(self, scores: torch.Tensor, mask, softmax_offset=None) -> torch.Tensor:
        if self.softmax.scale is not None:
            raise ValueError("soft-capping with query-key layer scaling is not supported")
        return self.softmax(softcap(scores.float(), self.cap).to(scores.dtype), mask,
                            softmax_offset)


class SoftcapDotProductAttention(SDPADotProductAttention):
    """Core attention with cap * tanh(scores / cap) (`softcap`, a ModuleSpec param).

    The scores are query . key times the softmax scale (Gemma: query_pre_attn_scalar ** -0.5),
    as transformers caps them; masking and the fp32 softmax follow as in megatron."""

    def __init__(self, *args, softcap: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # megatron-core internal: DotProductAttention.scale_mask_softmax, wrapped.
        self.scale_mask_softmax = _SoftcappedSoftmax(self.scale_mask_softmax, softcap)
        self._sdpa_ok = False


class LocalRotarySelfAttention(CachedRotarySelfAttention):
    """Self-attention that, in sliding-window layers, rotates by its own frequencies
    (`local_inv_freq`, set by build_model) instead of the model-wide ones."""

    def __init__(self, config, submodules, layer_number: int, *args, **kwargs) -> None:
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.local = is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                               layer_number)
        self.local_inv_freq: torch.Tensor | None = None

    def forward(self, *args, **kwargs):
        angles = kwargs.get("rotary_pos_emb")
        if self.local and angles is not None:
            if self.local_inv_freq is None or isinstance(angles, tuple):
                raise RuntimeError("local rotary frequencies unset, or a packed/cross rotary")
            # Megatron's RotaryEmbedding: angles[p] = p * inv_freq, both halves, [s, 1, 1, d].
            positions = torch.arange(angles.shape[0], device=angles.device,
                                     dtype=self.local_inv_freq.dtype)
            freqs = torch.outer(positions, self.local_inv_freq.to(angles.device))
            kwargs["rotary_pos_emb"] = torch.cat((freqs, freqs), dim=-1)[:, None, None, :].to(
                angles.dtype)
        return super().forward(*args, **kwargs)


class SoftcapOutputLinear(InferenceColumnParallelLinear):
    """The output layer with its logits soft-capped: cap * tanh(logits / cap). Elementwise, so
    each vocab-parallel shard caps its own columns; padding columns (0) stay 0."""

    final_logit_softcapping: float

    def forward(self, *args, **kwargs):
        logits, bias = super().forward(*args, **kwargs)
        return softcap(logits, self.final_logit_softcapping), bias

    @classmethod
    def adopt(cls, layer: InferenceColumnParallelLinear, cap: float) -> SoftcapOutputLinear:
        """Turn the built output layer (already an InferenceColumnParallelLinear) into this in
        place: parameters, sharding, tying and checkpoint keys stay as GPTModel made them."""
        if type(layer) is not InferenceColumnParallelLinear:
            raise TypeError(f"expected InferenceColumnParallelLinear, got {type(layer)}")
        layer.__class__ = cls
        layer.final_logit_softcapping = cap
        return layer
