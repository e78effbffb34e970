"""Rotary position embedding frequencies as Hugging Face configs describe them.

Megatron-Core's RotaryEmbedding knows plain RoPE and Llama-3.1 scaling with fixed constants; the
frequencies here follow every parameter of the HF `rope_parameters` / `rope_scaling` entry and are
assigned to the model's rotary module after it is built.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_parameters(hf_config: dict[str, Any]) -> dict[str, Any]:
    """Normalise transformers v4 (`rope_theta` + `rope_scaling`) and v5 (`rope_parameters`)."""
    params = dict(hf_config.get("rope_parameters") or {})
    if not params:
        params = dict(hf_config.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


# The rope types inv_freq reproduces exactly.
SUPPORTED_TYPES = ("default", "linear", "llama3")


def check_supported(params: dict[str, Any], hf_config: dict[str, Any], family: str,
                    supported: tuple[str, ...] = SUPPORTED_TYPES) -> None:
    """Refuse, naming the config key, a rope type these frequencies would not reproduce.
    ("yarn" only where the family also applies `yarn_attention_factor`.)"""
    if params["rope_type"] not in supported:
        key = "rope_parameters" if hf_config.get("rope_parameters") else "rope_scaling"
        raise ValueError(f"{family}: config.json {key} rope_type={params['rope_type']!r} is not "
                         f"supported (supported: {', '.join(supported)})")


def inv_freq(params: dict[str, Any], rotary_dim: int) -> torch.Tensor:
    """Frequencies for `params` as `rope_parameters` returns them."""
    base = float(params["rope_theta"])
    freqs = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    kind = params["rope_type"]
    if kind == "default":
        return freqs
    if kind == "linear":
        return freqs / float(params["factor"])
    if kind == "llama3":
        return _llama3(freqs, params)
    if kind == "yarn":
        return _yarn(freqs, params, rotary_dim)
    raise NotImplementedError(f"rope type {kind!r} is not supported yet")


def _llama3(freqs: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the band in
    # between interpolated linearly in 1/wavelength.
    factor = float(params["factor"])
    low = float(params["low_freq_factor"])
    high = float(params["high_freq_factor"])
    context = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > context / low, freqs / factor, freqs)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, blended, scaled)


def _yarn(freqs: torch.Tensor, params: dict[str, Any], rotary_dim: int) -> torch.Tensor:
    # YaRN (as transformers computes it): frequencies turning fewer than beta_slow times over the
    # original context are divided by `factor`, those turning more than beta_fast times kept,
    # and a linear ramp over the dimensions in between (bounds rounded outwards unless
    # truncate is false).
    base, factor = float(params["rope_theta"]), float(params["factor"])
    context = float(params["original_max_position_embeddings"])
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:
        return rotary_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return freqs / factor * (1 - extrapolation) + freqs * extrapolation


def yarn_attention_factor(params: dict[str, Any]) -> float:
    """The factor YaRN multiplies cos and sin by (so every rotated query and key): explicit,
    or from factor (and mscale / mscale_all_dim where both are given), as transformers does."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = float(params["factor"])
    if params.get("mscale") and params.get("mscale_all_dim"):
        return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
    return mscale(factor)
