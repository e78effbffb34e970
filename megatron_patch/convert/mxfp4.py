"""MXFP4-quantised Hugging Face checkpoints (GPT-OSS's released format), read dequantised.

Such a checkpoint stores a quantised weight `W` (GPT-OSS's stacked experts: x @ W, [experts,
in, out]) as two tensors: `W_blocks` (uint8, [experts, out, in / 32, 16]: each row of W's
transpose cut into blocks of 32 FP4 (E2M1) values, two per byte, the lower nibble first) and
`W_scales` (uint8, [experts, out, in / 32]: each block's power-of-two scale as an exponent
biased by 127); config.json says `quantization_config: {"quant_method": "mxfp4", ...}`. A value
is its E2M1 code's number times 2 ** (scale - 127), computed in float32 (every such product is
exact there), then cast to the conversion's dtype. The converted checkpoint is an ordinary
unquantised one: its config.json loses quantization_config.
"""

from __future__ import annotations

import torch

from megatron_patch.convert.hf_io import HFCheckpointReader, QuantizedReader

BLOCKS, SCALES = "_blocks", "_scales"
# E2M1 codes 0-15: sign bit 8, then the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [..., out, groups, 16] (uint8) and scales [..., out, groups] (uint8) -> the
    float32 weight [..., groups * 32, out] (x @ W layout)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks/scales must be uint8, not {blocks.dtype}/{scales.dtype}")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales "
                         f"{tuple(scales.shape)} (expected blocks = scales + [16])")
    codes = torch.tensor(E2M1, dtype=torch.float32)
    low, high = codes[(blocks & 0x0F).long()], codes[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., out, groups, 32]
    exponents = scales.to(torch.int32) - SCALE_BIAS
    values = torch.ldexp(values, exponents.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).transpose(-1, -2).contiguous()


class DequantizingReader(QuantizedReader):
    """An HFCheckpointReader where each `W_blocks` / `W_scales` pair reads as the dequantised
    tensor `W`. Everything else is the wrapped reader's."""

    def __init__(self, reader: HFCheckpointReader, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(reader, dtype)
        names = set(reader.names())
        self.quantized = {n.removesuffix(BLOCKS) for n in names
                          if n.endswith(BLOCKS) and n.removesuffix(BLOCKS) + SCALES in names}
        if unpaired := sorted(n for n in names if (n.endswith(BLOCKS) or n.endswith(SCALES))
                              and n.removesuffix(BLOCKS).removesuffix(SCALES)
                              not in self.quantized):
            raise ValueError(f"{reader.path}: MXFP4 {BLOCKS}/{SCALES} tensors without their "
                             f"pair: {unpaired[:5]}")
        if clash := sorted(self.quantized & names):
            raise ValueError(f"{reader.path}: tensors stored both quantised and not: {clash[:5]}")
        self._names = [n.removesuffix(BLOCKS) if n.removesuffix(BLOCKS) in self.quantized else n
                       for n in reader.names()
                       if not (n.endswith(SCALES) and n.removesuffix(SCALES) in self.quantized)]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.quantized:
            return self.reader.shape(name)
        *prefix, rows, groups, per_block = self.reader.shape(name + BLOCKS)
        return (*prefix, groups * per_block * 2, rows)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.quantized:
            return self.reader.read(name)
        try:
            return dequantize(self.reader.read(name + BLOCKS), self.reader.read(name + SCALES))
        except ValueError as e:
            raise ValueError(f"{self.path}: {name}{BLOCKS}/{SCALES}: {e}") from e
