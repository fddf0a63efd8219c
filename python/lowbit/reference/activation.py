"""Dynamic per-token int8 activation quantization (the specification).

``x`` ``[..., K]``: each row (token) gets ``scale = absmax(row) / 127`` (float32, 1 where
the row is all zeros) and codes ``clamp(rint(x / scale), -128, 127)`` as int8 (float32
math, round half to even). ``x ~= codes.float() * scale``; scales are
``x.shape[:-1] + (1,)``.
"""
from __future__ import annotations

import torch

from .quant import true_div

__all__ = ["quantize_per_token_int8"]


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., K]`` float -> (int8 codes ``[..., K]``, float32 scales ``[..., 1]``)."""
    xf = x.float()
    if x.shape[-1] == 0:
        amax = torch.zeros(*x.shape[:-1], 1, device=x.device)
    else:
        amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = true_div(amax, 127.0)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.clamp(torch.round(xf / scale), -128, 127).to(torch.int8)
    return codes, scale
