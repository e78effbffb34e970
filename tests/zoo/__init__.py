"""The model zoo's test cases: one module per family group, each defining `CASES`.

A case builds an *oracle*, a module that computes the family's function independently of
megatron-patch (a native `transformers` class wherever one computes the same function, else a
reference forward written in the tests), and saves the checkpoint that users would convert, in
the family's original format (remote-code tensor names and config keys included). The zoo
tests (`tests/test_zoo.py`) convert every case, compare the Megatron-Core model with the oracle
at each of the case's layouts, and check bit-exact round trips. Add a family by adding a module
here; nothing else in the test suite needs to change.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple


class Layout(NamedTuple):
    tp: int
    pp: int
    ep: int = 1
    sp: bool = False

    @property
    def world_size(self) -> int:
        # Expert parallelism is carved out of data parallelism: EP ranks per (TP, PP) slot.
        return self.tp * self.pp * self.ep

    @property
    def id(self) -> str:
        return f"tp{self.tp}pp{self.pp}ep{self.ep}{'sp' if self.sp else ''}"


# Every family: (TP, PP) in {(1,1), (2,1) with SP, (1,2)}.
DENSE = (Layout(1, 1), Layout(2, 1, sp=True), Layout(1, 2))
# MoE families add EP=2 and TP=2 x EP=2.
MOE = DENSE + (Layout(1, 1, ep=2), Layout(2, 1, ep=2, sp=True))


@dataclass(frozen=True)
class Case:
    """name: unique id; build: returns the oracle (fp32, eval mode, random tiny weights);
    save(oracle, hf_dir): writes the checkpoint in the family's original format (default:
    `oracle.save_pretrained`). The tokenizer is added by the zoo fixture. generate: greedy
    generation is compared with the oracle's `generate` at TP=1 and TP=2 too."""

    name: str
    build: Callable[[], Any]
    save: Callable[[Any, str], None] | None = None
    layouts: tuple[Layout, ...] = DENSE
    vocab_size: int = 1000
    generate: bool = False


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for module in pkgutil.iter_modules(__path__):
        cases.extend(importlib.import_module(f"{__name__}.{module.name}").CASES)
    names = [c.name for c in cases]
    if len(names) != len(set(names)):
        raise ValueError(f"duplicate zoo case names: {sorted(names)}")
    return cases


def randomize_norms(model) -> None:
    """Non-trivial norm weights and biases, so a misplaced norm cannot hide behind ones/zeros."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            lowered = name.lower()
            if "norm" in lowered or "ln" in lowered.split(".")[-2:][0]:
                if name.endswith("bias"):
                    p.uniform_(-0.2, 0.2)
                else:
                    p.uniform_(0.5, 1.5)


def native(arch: str, seed: int = 0, **config: Any) -> Callable[[], Any]:
    """A builder of the native transformers model `arch` with `config` (random weights)."""

    def build():
        import torch
        import transformers

        cls = getattr(transformers, arch)
        torch.manual_seed(seed)
        model = cls(cls.config_class(**config)).float().eval()
        randomize_norms(model)
        return model

    return build


# Every case by name (importing the package imports every case module).
CASES = {c.name: c for c in all_cases()}
# The oracle's reference batch.
BATCH, SEQ, TOKENS_SEED = 2, 32, 1234


def _logits(output):
    return output if hasattr(output, "dim") else output.logits


def prepare(root: str, names: list[str]) -> None:
    """In a worker: each case's original-format checkpoint (root/<name>/hf), oracle output
    (reference.pt) and conversion (mcore/)."""
    import torch

    from megatron_patch import tiny
    from megatron_patch.convert.hf_megatron import hf_to_megatron

    for name in names:
        case = CASES[name]
        hf_dir = os.path.join(root, name, "hf")
        oracle = case.build()
        gen = torch.Generator().manual_seed(TOKENS_SEED)
        tokens = torch.randint(0, case.vocab_size, (BATCH, SEQ), generator=gen)
        with torch.no_grad():
            logits = _logits(oracle(input_ids=tokens)).float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()
        os.makedirs(hf_dir, exist_ok=True)
        (case.save or (lambda m, d: m.save_pretrained(d)))(oracle, hf_dir)
        tiny.train_tokenizer(hf_dir)
        torch.save({"tokens": tokens, "logits": logits, "loss": loss},
                   os.path.join(root, name, "reference.pt"))
        hf_to_megatron(hf_dir, os.path.join(root, name, "mcore"))
