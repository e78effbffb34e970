"""Megatron-Core's local core attention computed by torch's scaled_dot_product_attention.

`DotProductAttention` (megatron-core's non-Transformer-Engine core attention) materialises the
GQA-expanded keys and values (repeat_interleave), the scores (baddbmm), a masked softmax and the
context (bmm) as separate ops, plus an RNG-tracker fork for dropout. On a CPU that is a large
share of a decode step. `SDPADotProductAttention` is a drop-in subclass (same constructor, same
forward signature, no parameters of its own, so checkpoints are unchanged) that hands the common
case to one fused `torch.nn.functional.scaled_dot_product_attention` call and every other case to
megatron's own forward:

- attention_mask (True = masked, any shape broadcastable to [b, heads, sq, sk]) is used as given;
  without a mask, `attn_mask_type=causal` means a causal mask when sq > 1 and none when sq == 1
  (a KV-cached decode step), exactly as megatron's FusedScaleMaskSoftmax decides. The
  `attn_mask_type` forward argument is ignored, as in DotProductAttention.
- GQA: query head i reads key/value group i // (heads / groups), repeat_interleave's order.
- softmax scale: `softmax_scale` times the query-key-layer-scaling coefficient, i.e. the net scale
  megatron applies.
- Megatron's path is kept (super().forward) for: attention dropout while training (so dropout
  draws from megatron's RNG tracker as before), off-by-one / learnable softmax offsets (GPT-OSS's
  attention sinks; the learnable one is tagged as split over TP by head, which megatron-core
  0.16 omits), packed sequences and attention biases (which the parent refuses).
- Sliding-window layers: megatron's softmax replaces the given mask by its window mask, which
  drops the padding mask of a left-padded batch (padded keys inside the window are attended).
  Here the window mask is added to the given mask instead, on both paths.

One deliberate difference: a query row whose keys are all masked (a left-padding position) gets
zeros here, where megatron's -10000 fill gives the mean of all values. Such rows are padding
whose outputs no unmasked position reads, so real tokens' outputs are unchanged. In fp32 the
remaining differences are rounding (about 1e-7 relative).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPADotProductAttention(DotProductAttention):
    """DotProductAttention with a torch SDPA fast path (see the module docstring)."""

    def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None,
                 **kwargs) -> None:
        # k_channels / v_channels: multi-latent attention's query-key and value head sizes
        # (megatron's local DotProductAttention takes neither); the scale comes from MLA.
        super().__init__(*args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition
        coeff = self.scale_mask_softmax.scale
        self._sdpa_scale = self.softmax_scale * (coeff if coeff is not None else 1.0)
        self._gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        # megatron-core internal: FusedScaleMaskSoftmax.window_size. The window is applied as a
        # mask here (see the module docstring); megatron's softmax then uses the mask it is given.
        self._window = self.scale_mask_softmax.window_size
        self.scale_mask_softmax.window_size = None
        self._sdpa_ok = self.softmax_offset is None
        # Multi-latent attention at TP > 1: see SharedRopeKeyGrad.
        mla_at_tp = k_channels is not None and self.config.tensor_model_parallel_size > 1
        self._shared_rope = getattr(self.config, "qk_pos_emb_head_dim", None) if mla_at_tp else None
        if isinstance(self.softmax_offset, torch.nn.Parameter):
            # megatron-core internal: the tensor_model_parallel tag. Learnable offsets (GPT-OSS's
            # sinks) are split over TP by head, but megatron-core 0.16 leaves them untagged, so
            # the gradient norm would count rank 0's part only.
            from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

            set_tensor_model_parallel_attributes(self.softmax_offset, True, 0, 1)

    def _dropout_in_kernel(self) -> bool:
        """Whether attention dropout may run inside the SDPA call (subclasses); here it stays
        on megatron's path, which draws from megatron's RNG tracker."""
        return False

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """The SDPA call on [b, n, s, d] views."""
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=self._sdpa_scale,
            enable_gqa=self._gqa)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type=None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None
                ) -> torch.Tensor:
        if self._shared_rope and key.requires_grad:
            key = SharedRopeKeyGrad.apply(key, self._shared_rope)
        if self._window is not None:
            attention_mask = self._window_mask(query.shape[0], key.shape[0], attention_mask,
                                               query.device)
        if (not self._sdpa_ok or attention_bias is not None or packed_seq_params is not None
                or (self.training and self.attention_dropout.p > 0
                    and not self._dropout_in_kernel())):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        sq, b, heads, _ = query.shape
        causal = False
        if attention_mask is None:
            causal = self.attn_mask_type == AttnMaskType.causal and sq > 1
            if causal:
                assert sq == key.shape[0], "causal mask is only for self attention"
        else:
            attention_mask = ~attention_mask  # megatron: True = masked; SDPA: True = attend
        # [s, b, n, d] -> [b, n, s, d]; permuted views, SDPA accepts the strides.
        context = self._attend(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3),
                               value.permute(1, 2, 0, 3), attention_mask, causal)
        # [b, n, sq, d] -> [sq, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _window_mask(self, sq: int, sk: int, mask: torch.Tensor | None,
                     device: torch.device) -> torch.Tensor:
        """True = masked: keys after the query or more than window[0] before it (the last sq
        of sk positions are the queries), or masked by `mask`."""
        query_pos = torch.arange(sk - sq, sk, device=device)[:, None]
        key_pos = torch.arange(sk, device=device)[None, :]
        before, after = self._window
        outside = (key_pos < query_pos - before) | (key_pos > query_pos + after)
        return outside if mask is None else mask | outside



class SharedRopeKeyGrad(torch.autograd.Function):
    """Identity forward; backward completes the gradient of MLA's shared rotary key.

    Multi-latent attention's key ends in one rotary part k_pos_emb, computed by the key-value
    down projection and broadcast to every head. At TP > 1 each rank holds some heads, so
    k_pos_emb's gradient is the sum over all ranks' heads; megatron-core 0.16, with a local
    ColumnParallelLinear down projection, gathers that projection's output and splits the
    gradient back without summing it over the ranks (each rank sees its own heads' part only).
    Here the key's rotary gradient is completed before it leaves attention: the other ranks'
    head sums are added, spread evenly over this rank's heads (only their sum reaches
    k_pos_emb). Checked by tests/test_lora.py's MLA training at TP=2 against TP=1, which a fix in
    megatron-core (a second sum) would fail.
    """

    @staticmethod
    def forward(ctx, key: torch.Tensor, rope_dim: int) -> torch.Tensor:
        ctx.rope_dim = rope_dim
        return key.view_as(key)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from megatron.core import parallel_state

        grad = grad.clone()
        rope = grad[..., -ctx.rope_dim:]  # [s, b, heads, rope_dim]
        mine = rope.sum(dim=2, keepdim=True)
        total = mine.clone()
        torch.distributed.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
        rope += (total - mine) / rope.shape[2]
        return grad, None
