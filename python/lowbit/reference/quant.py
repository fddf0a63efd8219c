"""Integer grids: quantization parameters, quantize and dequantize (the specification).

The grid
--------
A float weight ``w`` of shape ``[N, K]`` (``N`` = out_features, ``K`` = in_features) is
split along ``K`` into groups of ``group_size`` consecutive columns;
``G = ceil(K / group_size)`` groups per row, the last one ragged (shorter) when
``group_size`` does not divide ``K``. ``group_size >= K`` is one group per row
(per-channel). Per-tensor quantization is the same grid applied to
``w.reshape(1, -1)`` with ``group_size = w.numel()``.

Each group has a float32 ``scale`` and an integer ``zero`` point; codes are unsigned,
``0 <= q <= 2**bits - 1``, stored as ``uint8``:

    q     = clamp(rint(w / scale) + zero, 0, 2**bits - 1)
    w_hat = (q - zero) * scale

* symmetric (absmax): ``scale = absmax * clip_ratio / (2**(bits-1) - 1)``,
  ``zero = 2**(bits-1)``; so signed values ``q - zero`` in ``[-(2**(bits-1)-1), 2**(bits-1)-1]``
  cover ``[-absmax, absmax]`` (the most negative code is never produced).
* asymmetric (zero-point, min/max): ``lo = min(min(w), 0) * clip_ratio``,
  ``hi = max(max(w), 0) * clip_ratio``, ``scale = (hi - lo) / (2**bits - 1)``,
  ``zero = clamp(rint(-lo / scale), 0, 2**bits - 1)``. The range always holds 0, so
  zero is exactly representable (as in GPTQ).
* a group whose scale would be 0 (all zeros) gets ``scale = 1``.

Rounding rule (shared bit for bit by the CPU and CUDA kernels): all arithmetic is in
float32, one IEEE operation at a time in the order written above; ``rint`` rounds half
to even (``torch.round``, C ``nearbyintf`` / CUDA ``rintf``); ``w / scale`` is a true
division, never a multiply by a reciprocal. Dequantized values are computed in
float32 and rounded once (to nearest even) to the output dtype.

dtypes: ``scales`` float32 ``[N, G]``; ``zeros`` int32 ``[N, G]``; codes uint8 ``[N, K]``.
"""
from __future__ import annotations

import torch

__all__ = ["quant_params", "quantize", "dequantize", "num_groups", "expand_groups", "true_div"]


def num_groups(k: int, group_size: int) -> int:
    """Groups per row: ``ceil(k / group_size)`` (0 when ``k == 0``)."""
    return -(-k // group_size)


def expand_groups(t: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """``[N, G]`` per-group values -> ``[N, K]``, column ``k`` taking group ``k // group_size``."""
    idx = torch.div(torch.arange(k, device=t.device), group_size, rounding_mode="floor")
    return t[:, idx]


def true_div(a: torch.Tensor, b: float) -> torch.Tensor:
    """``a / b`` as an IEEE division on every device (torch turns division by a Python
    scalar into a multiply by its reciprocal on CUDA, which can differ by an ulp)."""
    return a / torch.full_like(a, b)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    # Pad with zeros to whole groups: zeros change neither absmax nor the 0-including
    # [min, max] range, so the ragged last group needs no special case.
    n, k = w.shape
    g = num_groups(k, group_size)
    wf = w.float()
    wf = torch.nn.functional.pad(wf, (0, g * group_size - k))
    return wf.view(n, g, group_size)


def quant_params(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (float32 ``[N, G]``) and zero points (int32 ``[N, G]``) of ``w`` ``[N, K]``."""
    n, k = w.shape
    clip = torch.tensor(clip_ratio, dtype=torch.float32)
    grp = _grouped(w, group_size)
    if grp.shape[1] == 0 or n == 0:
        g = num_groups(k, group_size)
        return (torch.empty(n, g, dtype=torch.float32, device=w.device),
                torch.empty(n, g, dtype=torch.int32, device=w.device))
    if symmetric:
        qmax = float(2 ** (bits - 1) - 1)
        amax = grp.abs().amax(dim=-1)
        scale = true_div(amax * clip, qmax)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        maxq = float(2 ** bits - 1)
        hi = grp.amax(dim=-1).clamp(min=0) * clip
        lo = grp.amin(dim=-1).clamp(max=0) * clip
        scale = true_div(hi - lo, maxq)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero.to(torch.int32)


def quantize(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Codes (uint8 ``[N, K]``) of ``w`` ``[N, K]`` on the grid ``(scales, zeros)`` ``[N, G]``."""
    n, k = w.shape
    s = expand_groups(scales.float(), k, group_size)
    z = expand_groups(zeros.float(), k, group_size)
    q = torch.clamp(torch.round(w.float() / s) + z, 0, float(2 ** bits - 1))
    return q.to(torch.uint8)


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(codes - zero) * scale`` as ``dtype`` ``[N, K]``, from uint8 codes ``[N, K]``."""
    n, k = codes.shape
    s = expand_groups(scales.float(), k, group_size)
    z = expand_groups(zeros.float(), k, group_size)
    return ((codes.float() - z) * s).to(dtype)
