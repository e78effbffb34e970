"""Planning an extension: which pieces to append, intermediate ones included, so that the
tokenizer's merges can produce every requested piece."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tqdm import tqdm

from megatron_patch.vocab.merges import MergeTable


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
    planner = _Planner(table)
    plan = planner.plan
    texts = list(texts)
    for text in tqdm(texts, desc="planning pieces", unit="piece", mininterval=1.0,
                     disable=len(texts) < 1000):
        piece = spell(text)
        if piece is None:
            plan.split += 1
            continue
        if piece in plan.requested or (piece in table.vocab and piece not in planner.added):
            plan.duplicates += 1
            continue
        plan.requested.add(piece)
        planner.ensure(piece, [c for c in planner.character_cuts(text, piece, spell)
                               if 0 < c < len(piece)])
        if not planner.join_segments(piece):
            plan.unreachable.append(piece)
    return plan


class _Planner:
    """The pieces added to a merge table, and the steps that make a new piece reachable."""

    def __init__(self, table: MergeTable) -> None:
        self.table = table
        self.plan = Plan()
        self.added: set[str] = set()

    def add(self, piece: str) -> None:
        self.table.add(piece)
        self.plan.pieces.append(piece)
        self.added.add(piece)

    def ensure(self, piece: str, cuts: list[int]) -> None:
        """Make `piece` reachable by merges: two pieces of the vocabulary that make it up, made
        reachable first (halves, cut at one of `cuts`, the character boundaries, if given)."""
        vocab = self.table.vocab
        if piece in vocab:
            return
        if len(piece) > 1 and not any(piece[:c] in vocab and piece[c:] in vocab
                                      for c in range(1, len(piece))):
            cut = min(cuts or range(1, len(piece)), key=lambda c: abs(2 * c - len(piece)))
            self.ensure(piece[:cut], [c for c in cuts if c < cut])
            self.ensure(piece[cut:], [c - cut for c in cuts if c > cut])
        self.add(piece)

    def character_cuts(self, text: str, piece: str,
                       spell: Callable[[str], str | None]) -> list[int]:
        """The characters first: new pieces are built from them (a Chinese character is one
        piece in a sentencepiece vocabulary, several bytes in a byte-level one). Returns the
        character boundaries within `piece` (none where the spelling hides them)."""
        cuts, offset = [], len(piece) - sum(len(spell(c) or "") for c in text)
        for char in text:
            char_piece = spell(char)
            if char_piece is None or offset < 0:  # no character boundaries to follow
                return []
            self.ensure(char_piece, [])
            offset += len(char_piece)
            cuts.append(offset)
        return cuts

    def join_segments(self, piece: str) -> bool:
        """Pieces planned before can take this one's characters first: join what they leave,
        left to right, with pieces (and merges) of its own. False if still not reachable."""
        for _ in range(3):
            segments = self.table.segment(piece)
            if len(segments) == 1:
                return True
            joined = segments[0]
            for symbol in segments[1:]:
                joined += symbol
                if joined in self.table.vocab:
                    self.table.link(joined)
                else:
                    self.add(joined)
        return False
