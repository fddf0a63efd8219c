"""Activations: int8 quantization and calibration statistics (the specification).

``quantize_per_token_int8``, dynamic: ``x`` ``[..., K]``: each row (token) gets
``scale = absmax(row) / 127`` (float32, 1 where the row is all zeros) and codes
``clamp(rint(x / scale), -128, 127)`` as int8 (float32 math, round half to even).
``x ~= codes.float() * scale``; scales are ``x.shape[:-1] + (1,)``.

``quantize_per_tensor_int8``, static: the same codes with one calibrated scale.
``activation_stats``: the per-channel ``max |x|`` and ``sum |x|`` that static scales,
AWQ and SmoothQuant are computed from.
"""
from __future__ import annotations

import torch

from .quant import true_div

__all__ = ["quantize_per_token_int8", "activation_stats", "quantize_per_tensor_int8"]


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


def activation_stats(absmax: torch.Tensor, abssum: torch.Tensor, x: torch.Tensor) -> None:
    """Accumulate per-input-channel statistics of a linear layer's input, in place.

    Args:
        absmax: float32 ``[K]``, contiguous: ``absmax <- max(absmax, max_rows |x|)``
            (exact: a maximum has no rounding).
        abssum: float64 ``[K]``, contiguous: ``abssum <- abssum + sum_rows |x|``, where the
            sum is of the float32 ``|x|`` values, taken in float64 (kernels may add the
            rows in another order: they agree to float64 rounding).
        x: float32/float16/bfloat16 ``[..., K]``, any strides; every leading index is one
            row (token). Zero rows is a no-op.

    Raises:
        ValueError: ``x`` holds NaN or Inf (the message names the first such row). The check
        comes before any write: on error ``absmax`` and ``abssum`` are left unmodified.
    """
    k = x.shape[-1]
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    if rows == 0 or k == 0:
        return
    xa = x.reshape(rows, k).float().abs()
    bad = (~torch.isfinite(xa)).any(dim=1).nonzero()
    if bad.numel():
        raise ValueError(f"lowbit.activation_stats: argument 'x' holds NaN or Inf (row {int(bad[0, 0])})")
    absmax.copy_(torch.maximum(absmax, xa.amax(dim=0)))
    abssum.add_(xa.double().sum(dim=0))


def quantize_per_tensor_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor int8 activations: ``clamp(rint(x / scale), -128, 127)``.

    Args:
        x: float32/float16/bfloat16 ``[..., K]``, any strides; must not hold NaN (the
            kernels raise ValueError naming the first such row). +-Inf saturate to
            127 / -128 like any value beyond the range.
        scale: float32 with one element (any shape), positive and finite (the kernels
            raise ValueError otherwise).

    Returns:
        int8 ``[..., K]``, contiguous: ``x.float() / scale`` as an IEEE float32 division
        (never a multiply by ``1 / scale``), rounded half to even, then clamped.
    """
    s = float(scale.reshape(()))
    return torch.clamp(torch.round(true_div(x.float(), s)), -128, 127).to(torch.int8)
