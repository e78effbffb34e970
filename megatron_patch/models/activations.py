"""The MLP activations a ModelArgs.activation names: the function Megatron-Core is given, and
the Hugging Face config names (`hidden_act`, `activation_function`, ...) read as it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Activation:
    function: Callable[[torch.Tensor], torch.Tensor]
    # Names a config's activation key may hold for it (families.derived.activation); families
    # that fix their activation in `constants` need none.
    hf_names: tuple[str, ...] = ()


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # GPT-OSS's experts: x * sigmoid(1.702 x) (Megatron-Core's quick_gelu).
    return x * torch.sigmoid(1.702 * x)


# ModelArgs.activation -> Activation. gelu_new / gelu_fast / gelu_pytorch_tanh all compute
# GELU's tanh approximation (they differ only in float rounding).
ACTIVATIONS: dict[str, Activation] = {
    "silu": Activation(torch.nn.functional.silu),
    "gelu": Activation(torch.nn.functional.gelu, ("gelu",)),
    "gelu_tanh": Activation(_gelu_tanh, ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")),
    "relu": Activation(torch.nn.functional.relu, ("relu",)),
    "quick_gelu": Activation(_quick_gelu),
}

# A config's activation name -> ModelArgs.activation (read off ACTIVATIONS).
BY_HF_NAME: dict[str, str] = {hf: name for name, activation in ACTIVATIONS.items()
                              for hf in activation.hf_names}
