"""Weight-only quantized matmul (the specification).

``weight_only_matmul(x, qweight, scales, zeros, bits, group_size, bias)`` is a linear
layer whose weight ``W`` ``[N, K]`` is stored as integer codes on a group-wise grid
(:mod:`lowbit.reference.quant`), packed in the GPTQ ``qweight`` layout
(:mod:`lowbit.reference.packing`):

    q = unpack_int32(qweight, bits, K).t()                    # uint8 codes [N, K]
    W = (q - zero) * scale                                    # float32 [N, K]
    y = (x.float() @ W.t() + bias.float()).to(x.dtype)       # [..., N]

* ``x``: float32/float16/bfloat16 ``[..., K]``; K is ``x.shape[-1]``.
* ``qweight``: int32 ``[ceil(K * bits / 32), N]`` = ``pack_int32(q.t(), bits)``.
* ``scales``: float ``[N, G]``, ``G = ceil(K / group_size)``, converted to float32;
  ``zeros``: int32 or uint8 ``[N, G]``. ``q - zero`` is exact in float32.
* ``bias``: optional float ``[N]``.

The weight is dequantized in float32 and the matmul accumulates in float32; the result
is rounded once to ``x.dtype``. Kernels may sum in another order, or factor a group as
``scale * (sum(x * q) - zero * sum(x))``: they agree with this function to within
float32 rounding (relative to ``sum |x| * scale * (q + zero)``), not bit for bit.
NaN or Inf in ``x`` propagate into the output as they do through a matmul.
"""
from __future__ import annotations

import torch

from .packing import unpack_int32
from .quant import expand_groups

__all__ = ["weight_only_matmul"]


def weight_only_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    accumulate: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ W.t() + bias`` with ``W`` dequantized from GPTQ-packed codes (module docstring).

    ``accumulate`` (float32, or float64 for tests) is the dtype of the matmul and the bias
    add; the dequantized weight is always computed in float32. The result is
    ``out_dtype`` (default ``x.dtype``) ``[..., N]``.
    """
    k = x.shape[-1]
    n = qweight.shape[1]
    codes = unpack_int32(qweight, bits, k).t()                       # [N, K]
    s = expand_groups(scales.float(), k, group_size)
    z = expand_groups(zeros.float(), k, group_size)
    w = ((codes.float() - z) * s).to(accumulate)                      # float32 values
    m = 1
    for d in x.shape[:-1]:
        m *= d
    y = x.reshape(m, k).to(accumulate) @ w.t()
    if bias is not None:
        y = y + bias.to(accumulate)
    return y.reshape(*x.shape[:-1], n).to(out_dtype or x.dtype)
