"""BPE merge tables: a tokenizer's vocabulary and merge ranks, the merges new pieces get, and the
merged list a tokenizer.json is written with."""

from __future__ import annotations

from typing import Any

from megatron_patch.vocab.formats import SP_NORMAL

NEW_RANK = -(10**9)  # ranks of new pieces' merges start here: below every existing rank
LATE_RANK = 10**9  # merges for original pieces that had none: after every existing one


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
