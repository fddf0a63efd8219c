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

__all__ = ["weight_only_matmul", "int8_matmul"]


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


# Largest K whose int32 accumulator cannot overflow: |sum_k x*w| <= 128 * 128 * K < 2**31.
INT8_MATMUL_MAX_K = 2 ** 31 // (128 * 128) - 1


def int8_matmul(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """W8A8 linear layer, the specification of ``lowbit.ops.int8_matmul``::

        acc = sum_k x[m, k] * w[n, k]                                  # exact, int32
        y   = ((acc.float() * x_scale[m]) * w_scale[n] + bias[n].float()).to(out_dtype)

    * ``x``: int8 ``[..., K]``, any strides; ``M`` = product of the leading dims.
    * ``x_scale``: float32, finite; one per row (``[..., 1]`` or ``[M]``) or one value
      (any shape with one element).
    * ``w``: int8 ``[N, K]`` (out, in), any strides.
    * ``w_scale``: float32, finite; ``[N]`` (per output channel) or one value.
    * ``bias``: optional float32/float16/bfloat16 ``[N]`` (no bias: nothing is added, not
      even a zero, so a ``-0.0`` product stays ``-0.0``).
    * Returns ``out_dtype`` (float32/float16/bfloat16) ``[..., N]``.

    The accumulator is exact: ``K <= INT8_MATMUL_MAX_K`` (131071) keeps every sum inside
    int32. The epilogue is three float32 operations in this order (multiply by the row's
    scale, by the channel's scale, add the bias), each rounded to nearest even, then one
    rounding to ``out_dtype``. Kernels that apply the same operations to the same exact
    accumulator agree with this function bit for bit; the tests allow no more than that.

    Raises:
        ValueError: ``K > INT8_MATMUL_MAX_K``, or NaN/Inf in ``x_scale`` or ``w_scale``.
    """
    k = x.shape[-1]
    n = w.shape[0]
    if k > INT8_MATMUL_MAX_K:
        raise ValueError(f"lowbit.int8_matmul: K = {k} is too large: the int32 accumulator is exact "
                         f"only for K <= {INT8_MATMUL_MAX_K}")
    for name, s in (("x_scale", x_scale), ("w_scale", w_scale)):
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"lowbit.int8_matmul: argument '{name}' holds NaN or Inf")
    m = 1
    for d in x.shape[:-1]:
        m *= d
    # float64 sums of integers below 2**53 are exact in any order (and float64 matmul runs
    # on every device, unlike int32 matmul), so this is the exact int32 accumulator.
    acc = (x.reshape(m, k).double() @ w.double().t()).to(torch.int32)
    y = (acc.float() * x_scale.reshape(-1, 1)) * w_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*x.shape[:-1], n)
