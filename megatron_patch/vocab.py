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
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from megatron_patch.errors import positive_int

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SP_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
SPACE = "\u2581"  # sentencepiece's "▁", which stands for a space inside pieces
# sentencepiece_model_pb2.ModelProto.SentencePiece.Type
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6
SP_BPE = 2  # TrainerSpec.ModelType
NEW_RANK = -(10**9)  # ranks of new pieces' merges start here: below every existing rank
LATE_RANK = 10**9  # merges for original pieces that had none: after every existing one


@dataclass
class ExtensionSummary:
    """What an extension did. `added` lists the new pieces (model spelling) in id order."""

    requested: int = 0
    added: list[str] = field(default_factory=list)
    intermediate: int = 0
    duplicates: int = 0
    split: int = 0  # texts the pre-tokenizer splits: never one piece, skipped
    unreachable: list[str] = field(default_factory=list)  # pieces (model spelling)
    first_new_id: int = 0
    old_tokenizer_size: int = 0
    new_tokenizer_size: int = 0
    old_vocab_size: int = 0
    new_vocab_size: int = 0
    inconsistent: int = 0  # sample texts tokenizer.model and tokenizer.json encode differently

    def lines(self) -> list[str]:
        return [
            f"pieces requested: {self.requested}, skipped: {self.duplicates} duplicates, "
            f"{self.split} split by the pre-tokenizer",
            f"pieces added: {len(self.added)} ({self.intermediate} of them intermediate)"
            + (f", ids {self.first_new_id}..{self.first_new_id + len(self.added) - 1}"
               if self.added else ""),
            f"unreachable (added, but not produced by the tokenizer on their own): "
            f"{len(self.unreachable)}",
            f"tokenizer size {self.old_tokenizer_size} -> {self.new_tokenizer_size}, "
            f"vocab_size (embedding rows) {self.old_vocab_size} -> {self.new_vocab_size}",
        ]


# ---- new pieces ---------------------------------------------------------------------------

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
    proto = _load_sp_proto(path)
    return [p.piece.replace(SPACE, " ") for p in proto.pieces
            if p.type in (SP_NORMAL, SP_USER_DEFINED)]


def pieces_from_word_list(path: str) -> list[str]:
    """One piece a line; surrounding newlines (not spaces) stripped, empty lines skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


# ---- BPE merge tables ---------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet (GPT-2's): printable Latin-1 bytes stand for themselves, the
    other bytes for the characters from U+0100 upward, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


class MergeTable:
    """A BPE vocabulary and its merge ranks, with a reference implementation of encoding one
    pre-tokenized word (lowest rank first, leftmost first among equals: what both the
    `tokenizers` BPE model and sentencepiece's BPE do).

    `piece_rank` is the rank of each original piece's merges. Where a new piece completes a
    split of an original piece, the merge gets that piece's rank (sentencepiece's semantics:
    any two adjacent symbols that make up a piece merge, at that piece's score).
    `sp_semantics` extends this to every original piece (keeping tokenizer.json equivalent to
    a tokenizer.model); a tokenizer.json alone is only ever given the merges its new pieces
    need.
    """

    def __init__(self, vocab: dict[str, int], ranks: dict[tuple[str, str], float],
                 next_id: int, piece_rank: dict[str, float], sp_semantics: bool) -> None:
        self.vocab = vocab
        self.ranks = ranks
        self.next_id = next_id
        self.first_new_id = next_id
        self.piece_rank = piece_rank
        self.sp_semantics = sp_semantics
        self.new_merges: dict[tuple[str, str], float] = {}
        # Pieces by their proper prefixes and suffixes: the pieces a later piece completes.
        self._by_prefix: dict[str, list[str]] = {}
        self._by_suffix: dict[str, list[str]] = {}
        if sp_semantics:
            for piece in piece_rank:
                self._index(piece)

    def copy(self) -> MergeTable:
        return MergeTable(dict(self.vocab), dict(self.ranks), self.next_id,
                          dict(self.piece_rank), sp_semantics=False)

    @classmethod
    def from_sentencepiece(cls, proto) -> MergeTable:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        # sentencepiece merges the adjacent pair whose union scores highest; as ranks: normal
        # pieces by descending score (ties by id), each reachable through any split of it into
        # two pieces.
        order = sorted((i for i, p in enumerate(proto.pieces) if p.type == SP_NORMAL),
                       key=lambda i: (-proto.pieces[i].score, i))
        ranks: dict[tuple[str, str], float] = {}
        piece_rank: dict[str, float] = {}
        for rank, i in enumerate(order):
            piece = proto.pieces[i].piece
            piece_rank[piece] = rank
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    ranks.setdefault((left, right), rank)
        return cls(vocab, ranks, len(proto.pieces), piece_rank, sp_semantics=True)

    @classmethod
    def from_tokenizer_json(cls, data: dict[str, Any]) -> MergeTable:
        model = data["model"]
        vocab = dict(model["vocab"])
        ranks: dict[tuple[str, str], float] = {}
        piece_rank: dict[str, float] = {}
        for rank, (left, right) in enumerate(json_merges(model)):
            ranks.setdefault((left, right), rank)
            piece_rank.setdefault(left + right, rank)
        ids = list(vocab.values()) + [t["id"] for t in data.get("added_tokens", [])]
        return cls(vocab, ranks, max(ids) + 1, piece_rank, sp_semantics=False)

    def segment(self, word: str) -> list[str]:
        symbols = list(word)
        while len(symbols) > 1:
            best, where = None, -1
            for i in range(len(symbols) - 1):
                rank = self.ranks.get((symbols[i], symbols[i + 1]))
                if rank is not None and (best is None or rank < best):
                    best, where = rank, i
            if best is None:
                break
            symbols[where:where + 2] = [symbols[where] + symbols[where + 1]]
        return symbols

    def add(self, piece: str) -> None:
        """Append a piece, with a merge for each split of it into two pieces of the vocabulary,
        and the merges it completes for the pieces it is a part of.

        A new piece's merges rank before every existing one, by the id of the piece they make
        (then by the cut): sentencepiece's order, which merges the pair making the
        highest-scoring piece whatever the pieces were added for."""
        self.vocab[piece] = self.next_id
        self.next_id += 1
        self.link(piece)
        for whole in self._by_prefix.get(piece, []):
            self._merge(whole, len(piece))
        for whole in self._by_suffix.get(piece, []):
            self._merge(whole, len(whole) - len(piece))
        self._index(piece)

    def _index(self, piece: str) -> None:
        for cut in range(1, len(piece)):
            self._by_prefix.setdefault(piece[:cut], []).append(piece)
            self._by_suffix.setdefault(piece[cut:], []).append(piece)

    def link(self, piece: str) -> None:
        """Merges for every split of `piece` into two pieces of the vocabulary."""
        for cut in range(1, len(piece)):
            self._merge(piece, cut)

    def _merge(self, piece: str, cut: int) -> None:
        pair = (piece[:cut], piece[cut:])
        if pair[0] not in self.vocab or pair[1] not in self.vocab or pair in self.ranks:
            return
        step = cut / (len(piece) + 1)  # in [0, 1): the piece's merges, in cut order
        if self.vocab[piece] >= self.first_new_id:
            rank = NEW_RANK + self.vocab[piece] + step
        else:  # an original piece: right after its own merges' rank (or after all of them)
            rank = self.piece_rank.get(piece, LATE_RANK + self.vocab[piece]) + step / 2
        self.ranks[pair] = self.new_merges[pair] = rank


def json_merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    """A tokenizer.json BPE model's merges ("a b" strings in older files, pairs in newer)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
            for m in model["merges"]]


def merged_list(old: list[tuple[str, str]], table: MergeTable) -> list[tuple[str, str]]:
    """The original merge list with the table's new merges: those of new pieces first (by
    rank), those of original pieces right after the first merge making the same piece."""
    first = [pair for pair in sorted(table.new_merges, key=table.new_merges.__getitem__)
             if table.new_merges[pair] < 0]
    position: dict[str, int] = {}
    for i, (left, right) in enumerate(old):
        position.setdefault(left + right, i)
    inserted: dict[int, list[tuple[str, str]]] = {}
    for pair in sorted(table.new_merges, key=table.new_merges.__getitem__):
        if table.new_merges[pair] >= 0:
            inserted.setdefault(position.get(pair[0] + pair[1], len(old)), []).append(pair)
    out = list(first)
    for i, pair in enumerate(old):
        out.append(pair)
        out.extend(inserted.get(i, []))
    out.extend(inserted.get(len(old), []))
    return out


@dataclass
class Plan:
    """The pieces to append (model spelling, in id order) and what each stands for."""

    pieces: list[str] = field(default_factory=list)
    requested: set[str] = field(default_factory=set)
    duplicates: int = 0
    split: int = 0
    unreachable: list[str] = field(default_factory=list)  # pieces (model spelling)


def plan_pieces(table: MergeTable, texts: Iterable[str],
                spell: Callable[[str], str | None]) -> Plan:
    """Add each text's piece to `table`, with the intermediate pieces its merges need.

    spell(text) is the piece's spelling in the model (None: the tokenizer can never produce the
    text as one piece, e.g. a byte-level pre-tokenizer splits it)."""
    plan = Plan()
    added: set[str] = set()

    def add(piece: str) -> None:
        table.add(piece)
        plan.pieces.append(piece)
        added.add(piece)

    def ensure(piece: str, cuts: list[int]) -> None:
        """Make `piece` reachable by merges: two pieces of the vocabulary that make it up, made
        reachable first (halves, cut at one of `cuts`, the character boundaries, if given)."""
        if piece in table.vocab:
            return
        if len(piece) > 1 and not any(piece[:c] in table.vocab and piece[c:] in table.vocab
                                      for c in range(1, len(piece))):
            cut = min(cuts or range(1, len(piece)), key=lambda c: abs(2 * c - len(piece)))
            ensure(piece[:cut], [c for c in cuts if c < cut])
            ensure(piece[cut:], [c - cut for c in cuts if c > cut])
        add(piece)

    texts = list(texts)
    for text in tqdm(texts, desc="planning pieces", unit="piece", mininterval=1.0,
                     disable=len(texts) < 1000):
        piece = spell(text)
        if piece is None:
            plan.split += 1
            continue
        if piece in plan.requested or (piece in table.vocab and piece not in added):
            plan.duplicates += 1
            continue
        plan.requested.add(piece)
        # The characters first: new pieces are built from them (a Chinese character is one
        # piece in a sentencepiece vocabulary, several bytes in a byte-level one).
        cuts, offset = [], len(piece) - sum(len(spell(c) or "") for c in text)
        for char in text:
            char_piece = spell(char)
            if char_piece is None or offset < 0:  # no character boundaries to follow
                cuts = []
                break
            ensure(char_piece, [])
            offset += len(char_piece)
            cuts.append(offset)
        ensure(piece, [c for c in cuts if 0 < c < len(piece)])
        # Pieces planned before can take this one's characters first: join what they leave,
        # left to right, with pieces (and merges) of its own.
        for _ in range(3):
            segments = table.segment(piece)
            if len(segments) == 1:
                break
            joined = segments[0]
            for symbol in segments[1:]:
                joined += symbol
                if joined in table.vocab:
                    table.link(joined)
                else:
                    add(joined)
        else:
            plan.unreachable.append(piece)
    return plan


# ---- tokenizer files ----------------------------------------------------------------------

def _load_sp_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


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
        self.proto = _load_sp_proto(sp_path) if os.path.isfile(sp_path) else None
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


# ---- weights ------------------------------------------------------------------------------

def _vocab_tensor_names(hf_config: dict[str, Any]) -> list[str]:
    """The HF names of the embedding and (untied) output matrices, from the family's mapping."""
    from megatron_patch.convert.mapping import Vocab, bind
    from megatron_patch.models import family_for

    family = family_for(hf_config)
    args = family.model_args(hf_config)
    names = [n for b in bind(family.weights, hf_config, args.num_layers)
             if isinstance(b.transform, Vocab) for n in b.hf]
    if not names:
        raise ValueError(f"{family.name}: no vocabulary tensors in its weight mapping")
    return names


def _vocab_size_key(hf_config: dict[str, Any]) -> str:
    from megatron_patch.models import family_for

    keys = [f.hf for f in family_for(hf_config).config_fields if f.megatron == "vocab_size"]
    return keys[0] if keys else "vocab_size"


def grow_rows(weight: torch.Tensor, new_rows: int, sources: dict[int, list[int]],
              reference_rows: int) -> torch.Tensor:
    """`weight` with `new_rows` rows: row i in `sources` is the mean of the original rows
    sources[i] (computed in fp32); other rows past the original ones are the mean of the first
    `reference_rows` rows; every other row is the original, untouched."""
    import torch

    old_rows = weight.shape[0]
    out = torch.empty((max(new_rows, old_rows), *weight.shape[1:]), dtype=weight.dtype)
    out[:old_rows] = weight
    if new_rows > old_rows:
        out[old_rows:] = weight[:reference_rows].float().mean(0).to(weight.dtype)
    for row, ids in sources.items():
        out[row] = weight[ids].float().mean(0).to(weight.dtype)
    return out


def extend_hf(src: str, dst: str, texts: list[str], *, make_vocab_size_divisible_by: int = 128,
              max_shard_size: int | str = "5GB",
              sample_texts: Iterable[str] = ()) -> ExtensionSummary:
    """Extend an HF model directory's tokenizer and vocabulary matrices into `dst`."""
    from megatron_patch.convert import hf_io
    from megatron_patch.models import load_hf_config, pad_vocab_size

    hf_io.check_output_dir(dst)
    hf_config = load_hf_config(src)
    tensor_names = _vocab_tensor_names(hf_config)
    size_key = _vocab_size_key(hf_config)
    old_vocab = int(hf_config[size_key])
    files = TokenizerFiles(src)
    if files.size > old_vocab:
        raise ValueError(f"{src}: the tokenizer has {files.size} ids but config.json "
                         f"{size_key}={old_vocab}")
    plan = plan_pieces(files.table, texts, files.spell)
    log.info("%s: %d new pieces planned from %d texts", src, len(plan.pieces), len(texts))
    files.append(plan.pieces)
    new_size = files.table.next_id
    new_vocab = (old_vocab if new_size <= old_vocab
                 else pad_vocab_size(new_size, make_vocab_size_divisible_by))
    sources = {files.table.vocab[p]: files.old_ids(p) for p in plan.pieces}

    with hf_io.staged(dst) as staging:
        hf_io.copy_non_weight_files(src, staging)
        files.save(staging, plan.pieces)
        files.check_saved(staging, plan.pieces)
        hf_config[size_key] = new_vocab
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
            f.write("\n")

        reader = hf_io.HFCheckpointReader(src)
        missing = [n for n in tensor_names if n not in reader.names()]
        if missing:
            raise ValueError(f"{src}: no tensor {missing}")

        def tensors():
            for name in reader.names():
                tensor = reader.read(name)
                if name in tensor_names:
                    if tensor.shape[0] != old_vocab:
                        raise ValueError(f"{src}: {name} has {tensor.shape[0]} rows, config.json "
                                         f"{size_key}={old_vocab}")
                    tensor = grow_rows(tensor, new_vocab, sources, files.size)
                yield name, tensor

        log.info("writing %s (vocab_size %d -> %d)", dst, old_vocab, new_vocab)
        # Tensors passed on unchanged are copied from the input files (file_regions).
        hf_io.write_safetensors_shards(staging, tensors(), max_shard_size, regions=reader.regions)
        reader.close()

    requested = [p for p in plan.pieces if p in plan.requested]
    if missed := files.not_single(requested):
        log.warning("%d new pieces are not encoded as themselves by %s, e.g. %s", len(missed),
                    TOKENIZER_JSON, missed[:5])
    summary = ExtensionSummary(
        requested=len(texts), added=plan.pieces, intermediate=len(plan.pieces) - len(requested),
        duplicates=plan.duplicates, split=plan.split,
        unreachable=plan.unreachable + [p for p in missed if p not in plan.unreachable],
        first_new_id=files.size,
        old_tokenizer_size=files.size, new_tokenizer_size=new_size, old_vocab_size=old_vocab,
        new_vocab_size=new_vocab,
        inconsistent=files.inconsistencies(
            [t for t in [*texts, *sample_texts] if t.strip()]),
    )
    if summary.inconsistent:
        log.warning("%d sample texts encode differently with %s and %s", summary.inconsistent,
                    SP_MODEL, TOKENIZER_JSON)
    return summary


def extend_megatron(src: str, dst: str, texts: list[str], *,
                    make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1,
                    iteration: int | str | None = None,
                    sample_texts: Iterable[str] = ()) -> ExtensionSummary:
    """Extend a megatron-patch checkpoint: export to HF (bit-exact), extend, convert back.

    The padded size stays the checkpoint's while the vocabulary fits in it; otherwise it is the
    new vocabulary padded to make_vocab_size_divisible_by x tensor_model_parallel_size. The
    result is a `release` checkpoint of weights only (optimizer states do not fit the new
    shapes)."""
    from megatron_patch import checkpoint
    from megatron_patch.convert import hf_io, hf_megatron
    from megatron_patch.models import pad_vocab_size

    hf_io.check_output_dir(dst)
    meta = checkpoint.read_meta(src)
    # The HF copies go next to the output: /tmp may not hold a large model twice.
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".extend-vocab-", dir=parent) as tmp:
        old_hf, new_hf = os.path.join(tmp, "old"), os.path.join(tmp, "new")
        hf_megatron.megatron_to_hf(src, old_hf, iteration=iteration)
        summary = extend_hf(old_hf, new_hf, texts,
                            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                            sample_texts=sample_texts)
        padded = meta.padded_vocab_size
        if summary.new_vocab_size > padded:
            padded = pad_vocab_size(summary.new_vocab_size,
                                    make_vocab_size_divisible_by * tensor_model_parallel_size)
        hf_megatron.hf_to_megatron(new_hf, dst, make_vocab_size_divisible_by=1,
                                   extra_vocab_size=padded - summary.new_vocab_size,
                                   params_dtype=meta.torch_dtype)
    return summary


def is_megatron_checkpoint(path: str) -> bool:
    from megatron_patch import checkpoint

    return os.path.isfile(os.path.join(path, checkpoint.META))


# ---- command line -------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("src", help="HF model directory, or a megatron-patch checkpoint directory")
    p.add_argument("dst", help="output directory (same kind as src)")
    p.add_argument("--sp-model", action="append", default=[],
                   help="add the pieces of this sentencepiece model (repeatable)")
    p.add_argument("--words", action="append", default=[],
                   help="add the words of this file, one a line (repeatable)")
    p.add_argument("--train-from", metavar="CORPUS",
                   help="learn a sentencepiece model from this text file and add its pieces")
    p.add_argument("--vocab-size", type=positive_int, default=20000,
                   help="pieces to learn with --train-from (default 20000)")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"],
                   help="sentencepiece model type for --train-from")
    p.add_argument("--save-sp-model", metavar="PREFIX",
                   help="keep the model learnt with --train-from as PREFIX.model")
    p.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=128,
                   help="pad a grown vocabulary (config.json vocab_size) to a multiple of this")
    p.add_argument("--tensor-model-parallel-size", type=positive_int, default=1,
                   help="Megatron checkpoints: also pad for this TP size if the padded "
                        "vocabulary must grow")
    p.add_argument("--iteration", default=None,
                   help="Megatron checkpoints: extend this iteration instead of the latest")
    p.add_argument("--max-shard-size", default="5GB")


def run(args) -> int:
    texts: list[str] = []
    samples: list[str] = []
    with tempfile.TemporaryDirectory(prefix="extend-vocab-sp-") as tmp:
        sp_models = list(args.sp_model)
        if args.train_from:
            prefix = args.save_sp_model or os.path.join(tmp, "learnt")
            log.info("learning %d sentencepiece pieces from %s", args.vocab_size, args.train_from)
            sp_models.append(train_sentencepiece(args.train_from, args.vocab_size, prefix,
                                                 args.model_type))
            with open(args.train_from, encoding="utf-8") as f:
                # Sample texts for the tokenizer.model / tokenizer.json consistency check.
                samples = [line.rstrip("\n") for _, line in zip(range(1000), f, strict=False)]
        for path in sp_models:
            texts += pieces_from_sentencepiece(path)
        for path in args.words:
            texts += pieces_from_word_list(path)
    if not texts:
        raise ValueError("no new pieces: give --sp-model, --words or --train-from")
    if is_megatron_checkpoint(args.src):
        summary = extend_megatron(
            args.src, args.dst, texts,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            iteration=args.iteration, sample_texts=samples)
    else:
        summary = extend_hf(args.src, args.dst, texts,
                            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                            max_shard_size=args.max_shard_size, sample_texts=samples)
    for line in summary.lines():
        print(line)
    if summary.inconsistent:
        print(f"warning: {summary.inconsistent} texts encode differently with {SP_MODEL} and "
              f"{TOKENIZER_JSON}")
    print(f"{args.dst}: extended")
    return 0
