"""Vocabulary extension: add pieces (e.g. Chinese words) to a model's tokenizer and grow its
embedding and output layers, each new row the mean of the rows of the pieces the original
tokenizer split that piece into.

Tokenizers: a sentencepiece `tokenizer.model` (BPE), an HF `tokenizer.json` with a BPE model
(sentencepiece-style "▁" pieces or byte-level), or both, kept consistent (same ids for the same
pieces). Original ids never change: new pieces take the ids after the tokenizer's last one,
added tokens included (`len(tokenizer)`: Qwen's and Llama 3's special tokens, a pad token added
to a Llama 2 tokenizer, tokens that only tokenizer_config.json declares), and the extended
tokenizer is checked with transformers before the weights are written.

A BPE tokenizer only produces a piece that its merges can build. Each new piece gets a merge
for each split of it into two pieces of the vocabulary (what transformers' converter derives
from a sentencepiece model), and where there is none, its halves (cut at a character boundary)
are added first, recursively: the characters of a word and, for longer words, its halves
("intermediate" pieces). New merges rank before the existing ones, in the order the pieces are
added (sentencepiece: scores above every existing score; tokenizer.json: merges put first), as
the Chinese-LLaMA tokenizer does (its new pieces score 0, above Llama's negative scores): a new
word wins over the original pieces that would otherwise take its characters, e.g. "▁人" at the
start of "人工智能". Text of the original pieces can therefore tokenize differently afterwards;
the ids of the original pieces never change.

Rooms: `formats` (file names, sentencepiece proto), `pieces` (where new pieces come from),
`merges` (BPE merge tables), `planning` (which pieces to append), `tokenizer_files` (editing
tokenizer.model / tokenizer.json together), `weights` (growing the vocabulary matrices; the HF and
checkpoint entry points), `cli` (`megatron-patch extend-vocab`).
"""

from megatron_patch.vocab.cli import add_arguments, run
from megatron_patch.vocab.merges import MergeTable, json_merges, merged_list
from megatron_patch.vocab.pieces import (
    pieces_from_sentencepiece,
    pieces_from_word_list,
    train_sentencepiece,
)
from megatron_patch.vocab.planning import Plan, plan_pieces
from megatron_patch.vocab.tokenizer_files import TokenizerFiles
from megatron_patch.vocab.weights import (
    ExtensionSummary,
    extend_hf,
    extend_megatron,
    grow_rows,
    is_megatron_checkpoint,
)

__all__ = [
    "ExtensionSummary", "MergeTable", "Plan", "TokenizerFiles", "add_arguments", "extend_hf",
    "extend_megatron", "grow_rows", "is_megatron_checkpoint", "json_merges", "merged_list",
    "pieces_from_sentencepiece", "pieces_from_word_list", "plan_pieces", "run",
    "train_sentencepiece",
]
