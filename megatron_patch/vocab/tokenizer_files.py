"""Tokenizer-file surgery: a model directory's tokenizer.model and tokenizer.json, read, extended
together (same ids for the same pieces), saved and checked with transformers."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Any

from megatron_patch.vocab.formats import (
    SP_BPE,
    SP_MODEL,
    SP_NORMAL,
    SP_USER_DEFINED,
    SPACE,
    TOKENIZER_JSON,
    load_sp_proto,
)
from megatron_patch.vocab.merges import MergeTable, json_merges, merged_list

log = logging.getLogger(__name__)


def _json_kind(data: dict[str, Any], path: str) -> str:
    """'byte_level' or 'metaspace': how the tokenizer spells text in its pieces."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not supported "
                         "(vocabulary extension handles BPE tokenizers)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ValueError(f"{path}: BPE {key}={model[key]!r} is not supported")
    text = json.dumps([data.get("pre_tokenizer"), data.get("normalizer")])
    if '"ByteLevel"' in text:
        return "byte_level"
    if '"Metaspace"' in text or SPACE in text:
        return "metaspace"
    raise ValueError(f"{path}: neither a byte-level nor a sentencepiece-style (▁) BPE tokenizer")


def _load_transformers_tokenizer(model_dir: str):
    """The directory's tokenizer as transformers loads it (None, with a warning, if it cannot):
    the authority on which tokens exist and their ids, including added tokens that only
    tokenizer_config.json or added_tokens.json declare."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - any failure: go on with the tokenizer files alone
        log.warning("%s: transformers cannot load the tokenizer (%s); going by %s / %s alone",
                    model_dir, e, SP_MODEL, TOKENIZER_JSON)
        return None


def _added_token_entry(token_id: int, token) -> dict[str, Any]:
    """A tokenizer.json `added_tokens` entry for a transformers AddedToken."""
    return {"id": token_id, "content": token.content, "single_word": token.single_word,
            "lstrip": token.lstrip, "rstrip": token.rstrip, "normalized": token.normalized,
            "special": token.special}


class TokenizerFiles:
    """The tokenizer files of a model directory, edited together."""

    def __init__(self, model_dir: str) -> None:
        self.dir = model_dir
        sp_path, json_path = (os.path.join(model_dir, n) for n in (SP_MODEL, TOKENIZER_JSON))
        self.proto = load_sp_proto(sp_path) if os.path.isfile(sp_path) else None
        self.json: dict[str, Any] | None = None
        if os.path.isfile(json_path):
            with open(json_path, encoding="utf-8") as f:
                self.json = json.load(f)
        if self.proto is None and self.json is None:
            raise FileNotFoundError(f"{model_dir}: no {SP_MODEL} or {TOKENIZER_JSON}")
        loaded = _load_transformers_tokenizer(model_dir)
        # Every token transformers knows, added ones included, with its id: what must not move.
        self.original_ids: dict[str, int] | None = None if loaded is None else loaded.get_vocab()
        if self.json is None and loaded is not None:
            # Without a tokenizer.json, transformers 5 converts tokenizer.model when loading,
            # ordering the merges by piece id and ignoring the scores: the new pieces, which
            # score highest, would merge last. One extended like the tokenizer.model is written.
            log.info("%s: writing %s too (transformers' conversion of %s, extended alike)",
                     model_dir, TOKENIZER_JSON, SP_MODEL)
            self.json = json.loads(loaded.backend_tokenizer.to_str())
        if self.json is not None and loaded is not None:
            self._adopt_added_tokens(loaded.added_tokens_decoder)
        if self.proto is not None:
            if self.proto.trainer_spec.model_type != SP_BPE:
                raise ValueError(f"{sp_path}: only BPE sentencepiece models are supported "
                                 f"(model_type {self.proto.trainer_spec.model_type})")
            self.kind = "metaspace"
            self._original = (self.proto.SerializeToString(),
                              None if self.json is None else json.dumps(self.json))
            if self.json is not None:
                self._match_sp_to_json()
            self.table = MergeTable.from_sentencepiece(self.proto)
        else:
            self.kind = _json_kind(self.json, json_path)
            self.table = MergeTable.from_tokenizer_json(self.json)
            self._original = (None, json.dumps(self.json))
        self.old = self.table.copy()
        self.size = self.table.next_id
        if self.original_ids is not None and len(loaded) != self.size:
            raise ValueError(f"{model_dir}: transformers loads {len(loaded)} tokens but the "
                             f"tokenizer files hold {self.size}; new pieces cannot follow")
        self._pre_tokenizer = None
        if self.kind == "byte_level":
            from tokenizers import Tokenizer

            self._pre_tokenizer = Tokenizer.from_str(json.dumps(self.json)).pre_tokenizer

    def _adopt_added_tokens(self, added: dict[int, Any]) -> None:
        """Put into tokenizer.json the added tokens that transformers takes from
        tokenizer_config.json or added_tokens.json. Left there, they would be numbered from the
        tokenizer.json's size on loading, which new pieces take: they would move."""
        assert self.json is not None
        vocab = self.json["model"]["vocab"]
        entries = self.json.setdefault("added_tokens", [])
        by_id = {t["id"]: t["content"] for t in entries}
        for token_id, token in sorted(added.items()):
            if by_id.get(token_id, token.content) != token.content:
                raise ValueError(f"{self.dir}: added token {token.content!r} has id {token_id} "
                                 f"in transformers but {TOKENIZER_JSON} gives that id to "
                                 f"{by_id[token_id]!r}")
            if token_id in by_id or vocab.get(token.content) == token_id:
                continue
            if token.content in vocab:
                raise ValueError(f"{self.dir}: token {token.content!r} has id "
                                 f"{vocab[token.content]} in {TOKENIZER_JSON} but {token_id} in "
                                 "transformers")
            entries.append(_added_token_entry(token_id, token))
            by_id[token_id] = token.content
        entries.sort(key=lambda t: t["id"])

    def _match_sp_to_json(self) -> None:
        """Check that tokenizer.model and tokenizer.json give their pieces the same ids, and
        give tokenizer.model the added tokens that follow its pieces."""
        assert self.json is not None and self.proto is not None
        if _json_kind(self.json, TOKENIZER_JSON) != "metaspace":
            raise ValueError(f"{self.dir}: {TOKENIZER_JSON} is byte-level but {SP_MODEL} "
                             "exists: they cannot be kept consistent")
        vocab = self.json["model"]["vocab"]
        added = {t["content"]: t["id"] for t in self.json.get("added_tokens", [])}
        for i, p in enumerate(self.proto.pieces):
            if vocab.get(p.piece, added.get(p.piece, i)) != i:
                raise ValueError(f"{self.dir}: piece {p.piece!r} has id {i} in {SP_MODEL} but "
                                 f"{vocab.get(p.piece, added.get(p.piece))} in {TOKENIZER_JSON}")
        # Added tokens after the pieces (a pad or chat tokens added to a Llama 2 tokenizer) go
        # into tokenizer.model as user-defined pieces at their ids: new pieces follow them in
        # both files. sentencepiece, like tokenizers' added tokens, matches a user-defined piece
        # in the text before segmenting the rest.
        beyond = sorted((i, t) for t, i in [*vocab.items(), *added.items()]
                        if i >= len(self.proto.pieces))
        beyond = list(dict(beyond).items())
        ids = [i for i, _ in beyond]
        if ids != list(range(len(self.proto.pieces), len(self.proto.pieces) + len(ids))):
            raise ValueError(f"{self.dir}: {TOKENIZER_JSON} has tokens at ids {ids[:10]} beyond "
                             f"the {len(self.proto.pieces)} pieces of {SP_MODEL}, not "
                             "consecutive: new pieces cannot follow them in both files")
        for _, content in beyond:
            if content not in added:
                raise ValueError(f"{self.dir}: {TOKENIZER_JSON} piece {content!r} is not in "
                                 f"{SP_MODEL}")
            new = self.proto.pieces.add()
            new.piece, new.score, new.type = content, 0.0, SP_USER_DEFINED

    def spell(self, text: str) -> str | None:
        """A text's spelling as a piece of this tokenizer (None: never one piece)."""
        if self.kind == "metaspace":
            return text.replace(" ", SPACE)
        # Byte-level: the pre-tokenizer both maps bytes to its alphabet and splits the text
        # (words, spaces, digits); a text it splits can never become one piece.
        assert self._pre_tokenizer is not None
        parts = self._pre_tokenizer.pre_tokenize_str(text)
        return parts[0][0] if len(parts) == 1 else None

    def old_ids(self, piece: str) -> list[int]:
        """The ids the original tokenizer encodes a piece (model spelling) into."""
        ids = []
        for symbol in self.old.segment(piece):
            if symbol in self.old.vocab:
                ids.append(self.old.vocab[symbol])
                continue
            raw = symbol.replace(SPACE, " ") if self.kind == "metaspace" else symbol
            byte_ids = [self.old.vocab.get(f"<0x{b:02X}>") for b in raw.encode("utf-8")]
            if None not in byte_ids:  # byte fallback
                ids.extend(byte_ids)
            elif "<unk>" in self.old.vocab:
                ids.append(self.old.vocab["<unk>"])
            else:
                raise ValueError(f"the original tokenizer cannot encode {symbol!r}")
        return ids

    def append(self, pieces: list[str]) -> None:
        """Write the planned pieces (already in self.table) into the file contents."""
        # New pieces merge first (in the order planned): sentencepiece scores above every
        # existing one, descending; tokenizer.json merges before the existing ones.
        if self.proto is not None:
            top = max((p.score for p in self.proto.pieces if p.type == SP_NORMAL), default=0.0)
            for k, piece in enumerate(pieces):
                new = self.proto.pieces.add()
                new.piece, new.score, new.type = piece, top + float(len(pieces) - k), SP_NORMAL
        if self.json is not None and pieces:
            model = self.json["model"]
            self._own_added_tokens(model["vocab"])
            for piece in pieces:
                model["vocab"][piece] = self.table.vocab[piece]
            as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
            merges = merged_list(json_merges(model), self.table)
            if as_strings and any(" " in a or " " in b for a, b in merges):
                raise ValueError(f"{TOKENIZER_JSON}: a merge of pieces with spaces cannot be "
                                 "written as 'a b'")
            model["merges"] = [f"{a} {b}" if as_strings else [a, b] for a, b in merges]

    def _own_added_tokens(self, vocab: dict[str, int]) -> None:
        """Give the BPE model the added tokens that follow its vocabulary (Llama 3's and Qwen's
        special tokens), at their ids. `tokenizers` numbers added tokens that the model lacks
        from the model's size on loading, whatever ids the file gives them: with new pieces in
        the model they would move onto the new pieces' ids. Added tokens are matched before the
        model sees the text, so the model never produces them itself."""
        assert self.json is not None
        taken = set(vocab.values())
        for token in self.json.get("added_tokens", []):
            if token["content"] not in vocab and token["id"] not in taken:
                vocab[token["content"]] = token["id"]
                taken.add(token["id"])
        if taken != set(range(self.size)):
            missing = sorted(set(range(self.size)) - taken)
            raise ValueError(f"{self.dir}: {TOKENIZER_JSON} has no token for ids {missing[:10]}"
                             f"{'...' if len(missing) > 10 else ''}; new pieces cannot follow")

    def save(self, out_dir: str, pieces: list[str]) -> None:
        if self.proto is not None:
            with open(os.path.join(out_dir, SP_MODEL), "wb") as f:
                f.write(self.proto.SerializeToString())
        if self.json is not None:
            with open(os.path.join(out_dir, TOKENIZER_JSON), "w", encoding="utf-8") as f:
                json.dump(self.json, f, ensure_ascii=False, indent=2)
                f.write("\n")
        # GPT-2 style slow-tokenizer files next to tokenizer.json (Qwen ships them).
        vocab_json, merges_txt = (os.path.join(out_dir, n) for n in ("vocab.json", "merges.txt"))
        if self.json is not None and os.path.isfile(vocab_json):
            with open(vocab_json, encoding="utf-8") as f:
                vocab = json.load(f)
            vocab.update({p: self.table.vocab[p] for p in pieces})
            with open(vocab_json, "w", encoding="utf-8") as f:
                json.dump(vocab, f, ensure_ascii=False)
        if self.json is not None and os.path.isfile(merges_txt):
            with open(merges_txt, encoding="utf-8") as f:
                lines = f.read().splitlines()
            header = lines[:1] if lines and lines[0].startswith("#") else []
            old = [tuple(line.split(" ", 1)) for line in lines[len(header):] if line]
            with open(merges_txt, "w", encoding="utf-8") as f:
                f.writelines(f"{line}\n" for line in header)
                f.writelines(f"{a} {b}\n" for a, b in merged_list(old, self.table))

    def check_saved(self, out_dir: str, pieces: list[str]) -> None:
        """Refuse an extended tokenizer (saved in out_dir) on which transformers moves a token
        of the original one, added tokens included, or does not put a new piece at its id."""
        if self.original_ids is None:
            return
        loaded = _load_transformers_tokenizer(out_dir)
        if loaded is None:
            raise ValueError(f"{out_dir}: transformers cannot load the extended tokenizer")
        ids = loaded.get_vocab()
        expected = {**self.original_ids, **{p: self.table.vocab[p] for p in pieces}}
        wrong = [(t, i, ids.get(t)) for t, i in expected.items() if ids.get(t) != i]
        if wrong or len(loaded) != self.table.next_id:
            raise ValueError(f"{out_dir}: the extended tokenizer has {len(loaded)} tokens "
                             f"(expected {self.table.next_id}); (token, expected id, id) that "
                             f"differ: {wrong[:5]}")

    def not_single(self, pieces: Iterable[str]) -> list[str]:
        """The pieces that the edited tokenizer.json's BPE model (the `tokenizers` library, not
        this module's reference) does not encode as themselves: a check of the plan."""
        if self.json is None:
            return []
        from tokenizers import Tokenizer

        model = Tokenizer.from_str(json.dumps(self.json)).model
        return [p for p in pieces if [t.value for t in model.tokenize(p)] != [p]]

    def inconsistencies(self, texts: Iterable[str]) -> int:
        """How many texts tokenizer.model and tokenizer.json (as edited) encode differently,
        of those the original pair encoded alike (the two differ on some texts from the start:
        sentencepiece collapses repeated spaces, for one)."""
        if self.proto is None or self.json is None:
            return 0
        import sentencepiece as spm
        from tokenizers import Tokenizer

        def pair(proto: bytes, data: str):
            sp = spm.SentencePieceProcessor(model_proto=proto)
            fast = Tokenizer.from_str(data)
            return lambda text: sp.encode(text) == fast.encode(text,
                                                               add_special_tokens=False).ids

        before = pair(*self._original)
        after = pair(self.proto.SerializeToString(), json.dumps(self.json))
        return sum(1 for text in texts if not after(text) and before(text))
