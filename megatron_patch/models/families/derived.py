"""Config fields and weight rules shared by the families with LayerNorms and biases (BLOOM,
Falcon, GPT-BigCode, OPT, StarCoder2): model arguments computed from a config, and linears/norms
with biases."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_patch.models.activations import BY_HF_NAME
from megatron_patch.models.spec import ConfigField
from megatron_patch.models.weight_rules import COPY, Rule, Transform


@dataclass(frozen=True)
class Derived(ConfigField):
    """A model argument computed from the whole config (`default`), never read from one key.
    `hf` names what it is derived from, for messages."""

    def read(self, hf_config: dict[str, Any]) -> Any:
        return self.default(hf_config)


def either(*keys: str) -> Any:
    """A reader of the first of `keys` present in a config (released configs spell some keys
    in their transformers attribute_map's other name, e.g. BLOOM-176B's num_attention_heads)."""

    def read(cfg: dict[str, Any]) -> Any:
        for key in keys:
            if cfg.get(key) is not None:
                return cfg[key]
        raise KeyError(f"config.json has none of {list(keys)}")

    return read


def activation(key: str, default: str) -> Derived:
    def read(cfg: dict[str, Any]) -> str:
        name = cfg.get(key) or default
        if name not in BY_HF_NAME:
            raise ValueError(f"config.json {key}={name!r} is not supported; supported: "
                             f"{sorted(BY_HF_NAME)}")
        return BY_HF_NAME[name]

    return Derived(key, "activation", read)


def with_bias(megatron: str, hf: str,
              bias: bool | Callable[[dict[str, Any]], bool] = True,
              transform: Transform = COPY) -> tuple[Rule, ...]:
    """A linear layer or LayerNorm: its weight and its bias, by `transform`. `bias`: False
    (no bias), True, or a predicate of the HF config (a bias only where it holds)."""
    rules = (Rule(f"{megatron}.weight", f"{hf}.weight", transform),)
    if bias is False:
        return rules
    when = None if bias is True else bias
    return rules + (Rule(f"{megatron}.bias", f"{hf}.bias", transform, when=when),)
