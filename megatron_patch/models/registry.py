"""Model families keyed by the Hugging Face `architectures` class name."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from megatron_patch.models.spec import FamilySpec

# Function-level imports: models.families and models.score_head import this module (a
# cycle).

_FAMILIES: dict[str, list[FamilySpec]] = {}


def register(spec: FamilySpec) -> FamilySpec:
    for arch in spec.architectures:
        specs = _FAMILIES.setdefault(arch, [])
        if any(s.name == spec.name for s in specs):
            continue  # a module imported twice
        if specs and (spec.applies is None or any(s.applies is None for s in specs)):
            raise ValueError(f"architecture {arch} is registered twice without `applies`")
        specs.append(spec)
    return spec


def _load() -> None:
    """Import every module of `megatron_patch.models.families`: each registers its specs."""
    from megatron_patch.models import families

    for module in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{module.name}")


def supported_architectures() -> list[str]:
    _load()
    return sorted(_FAMILIES)


def family_for(hf_config: dict[str, Any]) -> FamilySpec:
    """The family of an HF config.json, by its `architectures` entry (a reward model's
    *ForSequenceClassification: its causal LM's family with a score head, models/score_head.py).
    """
    _load()
    archs = hf_config.get("architectures") or []
    from megatron_patch.models import score_head

    if score_head.is_reward_config(hf_config):
        return score_head.reward_family(hf_config)
    for arch in archs:
        if arch in _FAMILIES:
            specs = [s for s in _FAMILIES[arch] if s.applies is None or s.applies(hf_config)]
            if len(specs) != 1:
                raise ValueError(f"config.json ({arch}) matches {len(specs)} model specs "
                                 f"({[s.name for s in _FAMILIES[arch]]}); expected one")
            return specs[0]
    raise ValueError(
        f"config.json architectures {archs} is not supported; supported: "
        + ", ".join(supported_architectures())
    )
