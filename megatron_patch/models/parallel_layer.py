"""A decoder layer whose attention and MLP read the same input (GPT-J / Falcon style):

    y = x + attention(norm(x)) + mlp(norm'(x))

with norm' = norm (one shared input norm, Falcon-7B) or a norm of its own (two norms, Falcon-40B
`new_decoder_architecture`). Megatron-Core's TransformerLayer runs them one after the other;
`ParallelAttentionTransformerLayer` is a small subclass that only changes the forward. Its
submodules and parameter names are TransformerLayer's: `input_layernorm` feeds attention (and the
MLP when shared, in which case `pre_mlp_layernorm` is an IdentityOp without parameters),
`pre_mlp_layernorm` feeds the MLP otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor


def _sum_bias(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


class ParallelAttentionTransformerLayer(TransformerLayer):
    """TransformerLayer with attention and MLP in parallel from the layer input."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                context: Any = None, context_mask: Any = None, rotary_pos_emb: Any = None,
                rotary_pos_cos: Any = None, rotary_pos_sin: Any = None,
                rotary_pos_cos_sin: Any = None, attention_bias: Any = None,
                inference_context: Any = None, packed_seq_params: Any = None,
                sequence_len_offset: Any = None, padding_mask: Any = None, **kwargs: Any):
        kwargs.pop("dynamic_inference_decode_only", None)
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if context is not None:
            raise ValueError("a parallel attention layer has no cross attention")
        residual = hidden_states
        attn_input = self.input_layernorm(hidden_states)
        attn_out, attn_bias = self.self_attention(
            attn_input, attention_mask=attention_mask, inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin, rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias, packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        mlp_input = (attn_input if isinstance(self.pre_mlp_layernorm, IdentityOp)
                     else self.pre_mlp_layernorm(hidden_states))
        mlp_out, mlp_bias = self.mlp(mlp_input)
        # One dropout over the sum of both branches, then the residual (as Falcon does).
        with self.bias_dropout_add_exec_handler():
            output = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                (attn_out + mlp_out, _sum_bias(attn_bias, mlp_bias)), residual,
                self.hidden_dropout,
            )
        output = make_viewless_tensor(inp=output, requires_grad=output.requires_grad,
                                      keep_graph=True)
        return output, context


def parallel_layer_spec(spec: ModuleSpec, num_norms: int) -> ModuleSpec:
    """`spec` (a TransformerLayer spec) as a parallel attention + MLP layer with one shared input
    norm (num_norms=1) or one norm per branch (num_norms=2)."""
    if num_norms not in (1, 2):
        raise ValueError(f"parallel_attention_norms must be 1 or 2, got {num_norms}")
    submodules = spec.submodules
    if num_norms == 1:
        submodules = dataclasses.replace(submodules, pre_mlp_layernorm=IdentityOp)
    return dataclasses.replace(spec, module=ParallelAttentionTransformerLayer,
                               submodules=submodules)
