"""Round-to-nearest (RTN) weight quantization on lowbit's integer grids.

The grid and rounding rule are specified in :mod:`lowbit.reference.quant`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops

__all__ = ["QuantizedWeight", "rtn_quantize"]


@dataclass
class QuantizedWeight:
    """A weight ``[N, K]`` on an integer grid.

    Attributes:
        codes: uint8 ``[N, K]``, each ``< 2**bits``.
        scales: float32 ``[N, G]`` (``[1, 1]`` when ``per_tensor``).
        zeros: int32, the shape of ``scales``.
        bits: 2..8.
        group_size: columns per group along K (``K`` for per-channel; ``N * K`` per-tensor).
        per_tensor: one scale for the whole tensor.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    bits: int
    group_size: int
    per_tensor: bool = False

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight as ``dtype`` ``[N, K]``."""
        codes = self.codes.reshape(1, -1) if self.per_tensor else self.codes
        w = ops.dequantize(codes, self.scales, self.zeros, self.group_size, dtype)
        return w.reshape(self.codes.shape)

    def pack(self) -> Tensor:
        """GPTQ ``qweight``: int32 ``[ceil(K * bits / 32), N]`` (layout: ``lowbit.reference.packing``)."""
        return ops.pack_int32(self.codes.t(), self.bits)


def rtn_quantize(
    w: Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    per_tensor: bool = False,
    clip_ratio: float = 1.0,
) -> QuantizedWeight:
    """Round-to-nearest quantization of a weight ``w`` (float ``[N, K]``).

    ``group_size=None`` is per-channel (one group per output row); ``per_tensor=True``
    uses one scale for the whole tensor and ignores ``group_size``.
    """
    if w.dim() != 2:
        raise ValueError(f"rtn_quantize: w must be 2-D [out_features, in_features], got {list(w.shape)}")
    n, k = w.shape
    if per_tensor:
        flat = w.reshape(1, -1)
        g = max(flat.shape[1], 1)
        scales, zeros = ops.quant_params(flat, bits, g, symmetric, clip_ratio)
        codes = ops.quantize(flat, scales, zeros, bits, g).reshape(n, k)
        return QuantizedWeight(codes, scales, zeros, bits, g, per_tensor=True)
    g = max(k, 1) if group_size is None else group_size
    scales, zeros = ops.quant_params(w, bits, g, symmetric, clip_ratio)
    codes = ops.quantize(w, scales, zeros, bits, g)
    return QuantizedWeight(codes, scales, zeros, bits, g)
