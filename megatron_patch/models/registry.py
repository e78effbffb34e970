"""Model families keyed by the Hugging Face `architectures` class name."""

from __future__ import annotations

import importlib
from typing import Any

from megatron_patch.models.spec import FamilySpec

_FAMILIES: dict[str, FamilySpec] = {}
_FAMILY_MODULES = ("llama",)


def register(spec: FamilySpec) -> FamilySpec:
    for arch in spec.architectures:
        if arch in _FAMILIES and _FAMILIES[arch] is not spec:
            raise ValueError(f"architecture {arch} is registered twice")
        _FAMILIES[arch] = spec
    return spec


def _load() -> None:
    for module in _FAMILY_MODULES:
        importlib.import_module(f"megatron_patch.models.families.{module}")


def supported_architectures() -> list[str]:
    _load()
    return sorted(_FAMILIES)


def family_for(hf_config: dict[str, Any]) -> FamilySpec:
    """The family of an HF config.json, by its `architectures` entry."""
    _load()
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in _FAMILIES:
            return _FAMILIES[arch]
    raise ValueError(
        f"config.json architectures {archs} is not supported; supported: "
        + ", ".join(supported_architectures())
    )
