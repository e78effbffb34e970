"""Sources of new pieces: a sentencepiece model (learnt here or given) or a word list."""

from __future__ import annotations

import os

from megatron_patch.vocab.formats import SP_NORMAL, SP_USER_DEFINED, SPACE, load_sp_proto


def train_sentencepiece(corpus: str, vocab_size: int, out_prefix: str,
                        model_type: str = "bpe") -> str:
    """Learn a sentencepiece model from a text file (one sentence a line); returns its path.

    Identity normalisation: pieces keep the corpus's characters, as Llama's tokenizer does (NFKC
    would turn full-width punctuation into pieces the target tokenizer never sees).
    """
    import sentencepiece as spm

    if not os.path.isfile(corpus):
        raise FileNotFoundError(f"corpus {corpus} not found")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=out_prefix, vocab_size=vocab_size, model_type=model_type,
        character_coverage=0.9995, normalization_rule_name="identity", split_digits=True,
        hard_vocab_limit=False, minloglevel=2,
    )
    return out_prefix + ".model"


def pieces_from_sentencepiece(path: str) -> list[str]:
    """The text of each normal or user-defined piece of a sentencepiece model, in id order
    ("▁" read as a space; control, unknown and byte pieces left out)."""
    proto = load_sp_proto(path)
    return [p.piece.replace(SPACE, " ") for p in proto.pieces
            if p.type in (SP_NORMAL, SP_USER_DEFINED)]


def pieces_from_word_list(path: str) -> list[str]:
    """One piece a line; surrounding newlines (not spaces) stripped, empty lines skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]
