"""FP8 quantization (e4m3fn, e5m2) with per-tensor or per-row scales (the specification).

``x`` is ``[..., K]``; rows are its leading dims flattened (a weight's output channels,
an activation's tokens). A scale is float32: per-tensor a 0-dim tensor, per-row
``x.shape[:-1] + (1,)``, so ``x ~= q.float() * scale`` broadcasts in both cases.

    q = fp8(clamp(x / scale, -fmax, fmax))       (float32 math, round to nearest even)

saturating at the format's largest finite value ``fmax`` (448 for e4m3fn, 57344 for
e5m2); NaN stays NaN. Dynamic scales are ``absmax / fmax`` over the row (or the whole
tensor), with 1 where absmax is 0.
"""
from __future__ import annotations

import torch

from .quant import true_div

__all__ = ["FP8_DTYPES", "fp8_max", "quantize_fp8", "quantize_fp8_dynamic", "dequantize_fp8", "fp8_matmul"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype."""
    return float(torch.finfo(dtype).max)


def _row_shaped(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # One value is per-tensor, whatever its shape; a per-row scale may come as [rows]:
    # view it as x.shape[:-1] + (1,) to broadcast.
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.dim() == 1:
        return scale.reshape(*x.shape[:-1], 1)
    return scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` ``[..., K]`` -> FP8 ``[..., K]`` with a given per-tensor or per-row scale."""
    fmax = fp8_max(dtype)
    scale = _row_shaped(scale, x)
    return torch.clamp(x.float() / scale.float().expand(x.shape).contiguous(), -fmax, fmax).to(dtype)


def quantize_fp8_dynamic(
    x: torch.Tensor, dtype: torch.dtype, per_row: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., K]`` -> (FP8 ``[..., K]``, float32 scale) with absmax scales."""
    xf = x.float()
    if per_row:
        if x.shape[-1] == 0:
            amax = torch.zeros(*x.shape[:-1], 1, device=x.device)
        else:
            amax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        amax = xf.abs().amax() if x.numel() else torch.zeros((), device=x.device)
    scale = true_div(amax, fp8_max(dtype))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return quantize_fp8(x, scale, dtype), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 ``[..., K]`` -> ``q * scale`` as ``dtype`` ``[..., K]`` (float32 math, one rounding)."""
    return (q.float() * _row_shaped(scale, q).float()).to(dtype)


def fp8_matmul(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """FP8 (e4m3fn) linear layer with scales, in float32::

        acc = x.float() @ w.float().t()                  # [M, N], float32 accumulation
        y   = (acc * x_scale) * w_scale + bias.float()   # float32, in this order
        out = y.to(out_dtype)                            # rounded once

    Args:
        x: float8_e4m3fn ``[..., K]``, any strides; ``M`` = product of the leading dims.
        x_scale: float32, one value (per-tensor, any shape) or one per row of ``x``
            (``x.shape[:-1] + (1,)`` or ``[M]``).
        w: float8_e4m3fn ``[N, K]`` (out, in), any strides.
        w_scale: float32, one value or one per output channel ``[N]``.
        bias: optional float32/float16/bfloat16 ``[N]``, added after the scales.
        out_dtype: float32, float16 or bfloat16.

    Returns:
        ``out_dtype`` ``[..., N]``, contiguous.

    Every FP8 product is exact in float32 (4 + 4 significant bits, exponents far inside
    float32's range; also exact in TF32 and bfloat16, so the matmul precision setting does
    not change ``acc``). Kernels sum in their own order: the CPU and emulation kernels
    agree with this function to float32 summation error, cuBLASLt's FP8 tensor cores
    (CUDA, sm_89+), which keep partial sums at less than float32 precision between
    promotions, more loosely. Neither is bit for bit. NaN and Inf propagate.
    """
    k = x.shape[-1]
    n = w.shape[0]
    m = 1
    for d in x.shape[:-1]:
        m *= d
    acc = x.reshape(m, k).float() @ w.float().t()
    xs = x_scale.reshape(()) if x_scale.numel() == 1 else x_scale.reshape(m, 1)
    ws = w_scale.reshape(()) if w_scale.numel() == 1 else w_scale.reshape(1, n)
    y = (acc * xs.float()) * ws.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*x.shape[:-1], n)
