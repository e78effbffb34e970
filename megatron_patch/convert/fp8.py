"""Block-scaled FP8 Hugging Face checkpoints (DeepSeek-V3's format), read dequantised.

Such a checkpoint stores a quantised weight `W` as float8_e4m3fn next to `W_scale_inv` (float32,
one value per block of `weight_block_size` = [rows, cols] of W, the last blocks possibly
partial), and config.json says `quantization_config: {"quant_method": "fp8", ...}`. The weight
is W.float() times its block's scale_inv, computed in float32 (as transformers dequantises), then
cast to the conversion's dtype (bfloat16 unless params_dtype says otherwise). The converted
checkpoint is an ordinary unquantised one: its config.json loses quantization_config.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_patch.convert.hf_io import HFCheckpointReader, QuantizedReader

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantization(hf_config: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The checkpoint's quantization_config, None without one: block-scaled FP8 (here) or
    MXFP4 (convert/mxfp4.py); other methods are refused."""
    quant = hf_config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method == "mxfp4":
        return quant
    if method != "fp8":
        raise ValueError(f"{path}/config.json quantization_config.quant_method={method!r} is not "
                         "supported (block-scaled fp8, mxfp4)")
    if len(quant.get("weight_block_size") or []) != 2:
        raise ValueError(f"{path}/config.json quantization_config.weight_block_size="
                         f"{quant.get('weight_block_size')!r}: expected [rows, cols]")
    return quant


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor,
               block: tuple[int, int]) -> torch.Tensor:
    """weight (fp8, [rows, cols]) times its blocks' scale_inv, in float32."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    if scale.shape[0] < rows or scale.shape[1] < cols:
        raise ValueError(f"scale grid {tuple(scale_inv.shape)} x block {block} does not cover a "
                         f"weight of shape {tuple(weight.shape)}")
    return weight.float() * scale[:rows, :cols]


class DequantizingReader(QuantizedReader):
    """An HFCheckpointReader whose fp8 weights read as dequantised tensors and whose scales are
    not tensors of their own. Everything else is the wrapped reader's."""

    def __init__(self, reader: HFCheckpointReader, quant: dict[str, Any],
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(reader, dtype)
        self.block = tuple(quant["weight_block_size"])
        names = set(reader.names())
        self.quantized = {n for n in names
                          if n + SCALE_SUFFIX in names and reader.dtype(n) in FP8_DTYPES}
        if unpaired := sorted(n for n in names if reader.dtype(n) in FP8_DTYPES
                              and n not in self.quantized):
            raise ValueError(f"{reader.path}: fp8 tensors without a {SCALE_SUFFIX}: "
                             f"{unpaired[:5]}")
        self._names = [n for n in reader.names()
                       if not (n.endswith(SCALE_SUFFIX)
                               and n.removesuffix(SCALE_SUFFIX) in self.quantized)]

    def read(self, name: str) -> torch.Tensor:
        if name not in self.quantized:
            return self.reader.read(name)
        return dequantize(self.reader.read(name), self.reader.read(name + SCALE_SUFFIX),
                          self.block)
