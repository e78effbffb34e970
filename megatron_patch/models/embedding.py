"""Input embeddings Megatron-Core's LanguageModelEmbedding cannot express:

- learned absolute positions read from row `position + offset` of a table with `offset` extra
  leading rows (OPT / Galactica: offset 2, rows 0 and 1 unused but part of the checkpoint);
- a norm right after the embeddings (BLOOM's word_embeddings_layernorm);
- embeddings multiplied by sqrt(hidden_size) (Gemma: the factor rounded to the activations'
  dtype, as transformers multiplies).

`Embedding` is a LanguageModelEmbedding subclass; `install` swaps it in for a GPTModel's
embedding after construction, adopting the model's word-embedding module so that weight tying
(set up by GPTModel, across pipeline stages too) is unchanged. Parameter names: the norm is
`embedding.norm.*`, the positions stay `embedding.position_embeddings.weight`.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.models.layers import Norm


class Embedding(LanguageModelEmbedding):
    """LanguageModelEmbedding with a position offset and an optional norm on its output.

    The norm is applied to the embeddings [s, b, h] (a sequence-parallel slice under SP, which
    a per-token norm does not mind), before the embedding dropout.
    """

    def __init__(self, config: TransformerConfig, vocab_size: int, max_sequence_length: int,
                 position_embedding_type: str, *, position_offset: int = 0,
                 norm: bool = False, scale: bool = False, **kwargs) -> None:
        if position_offset and position_embedding_type != "learned_absolute":
            raise ValueError("position_offset needs learned_absolute position embeddings")
        # The table holds `offset` rows before position 0.
        super().__init__(config, vocab_size, max_sequence_length + position_offset,
                         position_embedding_type, **kwargs)
        self.position_offset = position_offset
        self.norm = None
        self.scale = config.hidden_size ** 0.5 if scale else None
        if norm:
            self.norm = Norm(config, config.hidden_size, eps=config.layernorm_epsilon)
        # The parent's forward ends with the dropout; here it follows the norm / scaling.
        self.dropout_after_norm = self.embedding_dropout
        self.embedding_dropout = torch.nn.Identity()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                tokentype_ids: int | None = None) -> torch.Tensor:
        if self.add_position_embedding and self.position_offset:
            position_ids = position_ids + self.position_offset
        embeddings = super().forward(input_ids, position_ids, tokentype_ids)
        if self.scale is not None:
            embeddings = embeddings * torch.tensor(self.scale, dtype=embeddings.dtype)
        if self.norm is not None:
            embeddings = self.norm(embeddings)
        if self.config.sequence_parallel:
            # As the parent does: under SP each rank drops out its own slice of the sequence.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.dropout_after_norm(embeddings)
        return self.dropout_after_norm(embeddings)


def install(model, *, max_sequence_length: int, position_embedding_type: str,
            position_offset: int = 0, norm: bool = False, scale: bool = False) -> None:
    """Replace `model.embedding` (a GPTModel's, on its first pipeline stage) by `Embedding`."""
    old = model.embedding
    new = Embedding(model.config, old.vocab_size, max_sequence_length, position_embedding_type,
                    position_offset=position_offset, norm=norm, scale=scale,
                    scatter_to_sequence_parallel=old.scatter_to_sequence_parallel,
                    tp_group=old.tp_group)
    # GPTModel has tagged (and, tied across pipeline stages, synchronised) this module's weight.
    new.word_embeddings = old.word_embeddings
    model.embedding = new
