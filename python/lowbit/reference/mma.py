"""The tensor-core weight layout ("mma layout") and its matmul (the specification).

``pack_mma`` re-lays a GPTQ-layout weight (:mod:`lowbit.reference.packing`: qweight
int32 ``[K * bits / 32, N]``, scales ``[G, N]``, zeros ``[G, N]``) once, at load time,
so that a CUDA kernel built on ``mma.sync`` m16n8k16 reads each lane's weight operand
with one 16-byte load; ``mma_matmul`` is the linear layer on that layout. Why the layout
is what it is: the header comment of ``csrc/core/mma.h``. Its definition, for 4- or
8-bit codes ``q`` ``[N, K]`` with K a multiple of 16 and N a multiple of 64:

* ``packed``: int32 ``[K / 16, N * bits / 2]``. Row ``kb`` holds K rows
  ``16 kb .. 16 kb + 15``. Word ``index`` of a row belongs to unit ``u = index // (32
  bits)`` (64 columns), lane ``l = (index % (32 bits)) // bits = 4 g + t`` and word
  ``w = index % bits`` of that lane; code ``i`` sits in bits ``bits*i .. bits*i+bits-1``:

  - 4 bits (w = 0..3, i = 0..7)::

        n = 64 u + 16 w + 8 ((i >> 1) & 1) + g,   k = 16 kb + 2 t + (i >> 2) + 8 (i & 1)

  - 8 bits (w = 0..7, i = 0..3)::

        n = 64 u + 8 w + g,                       k = 16 kb + 2 t + (i & 1) + 8 (i >> 1)

* ``scales`` (float, dtype kept) and ``zeros`` (uint8) ``[G, N]``, ``G = ceil(K /
  group_size)``, with the columns of each block of 64 permuted: stored position
  ``64 u + 8 g + c`` holds column ``64 u + 8 c + g`` (:func:`param_order`).
* ``group_size`` is a multiple of 16, or ``>= K`` (per-channel), so no group cuts a
  k16 row; zero points are ``0..255``.

``mma_matmul(x, packed, scales, zeros, bits, group_size, bias)``::

    q = mma_codes(packed, bits)                                # uint8 [N, K]
    s = scales.to(x.dtype).float()  (un-permuted, group of k = k // group_size)
    W = ((q - zero) * s).to(x.dtype)                           # float32 math, [N, K]
    y = (x.float() @ W.float().t() + bias.float()).to(x.dtype)  # [..., N]

The scale is rounded to ``x.dtype`` first and ``W`` to ``x.dtype`` after (for float16 /
bfloat16 ``x`` that is the value a tensor core multiplies; for float32 ``x`` both are
no-ops), then the matmul accumulates in float32 and the result is rounded once. Kernels
sum in their own order (split-K, tensor-core accumulation): they agree with this
function to within float32 rounding relative to ``sum |x| |W|``, not bit for bit. NaN or
Inf in ``x`` propagate into that row's outputs as they do through a matmul.
"""
from __future__ import annotations

import torch

from .packing import pack_int32, unpack_int32
from .quant import expand_groups, num_groups

__all__ = ["param_order", "pack_mma", "unpack_mma", "mma_codes", "mma_matmul"]


def param_order(n: int, device=None) -> torch.Tensor:
    """int64 ``[n]``: the column held at each stored position of the permuted scales and
    zeros; position ``p = 64 u + 8 g + c`` holds column ``64 u + 8 c + g``.

    ``scales_p = scales[:, param_order(N)]``. The permutation swaps ``g`` and ``c``, so it
    is its own inverse.
    """
    p = torch.arange(n, device=device)
    u, g, c = p // 64, (p // 8) % 8, p % 8
    return 64 * u + 8 * c + g


def _row_positions(n: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(k - 16 kb, n) of code ``i`` of word ``index`` of any packed row: two int64
    ``[N * bits / 2, 32 / bits]`` tensors (the formulas of the module docstring)."""
    index = torch.arange(n * bits // 2, device=device)[:, None]
    i = torch.arange(32 // bits, device=device)[None, :]
    u, r = index // (32 * bits), index % (32 * bits)
    lane, w = r // bits, r % bits
    g, t = lane // 4, lane % 4
    if bits == 4:
        col = 64 * u + 16 * w + 8 * ((i >> 1) & 1) + g
        krow = 2 * t + (i >> 2) + 8 * (i & 1)
    else:
        col = 64 * u + 8 * w + g
        krow = 2 * t + (i & 1) + 8 * (i >> 1)
    krow, col = torch.broadcast_tensors(krow, col)
    return krow, col


def _check_shape(op: str, bits: int, k: int, n: int, group_size: int) -> None:
    # csrc/core/mma.h: check_mma_shape (same order and words).
    if bits not in (4, 8):
        raise ValueError(f"lowbit.{op}: the mma layout holds 4- or 8-bit codes, got bits={bits}; "
                         "use weight_only_matmul for other widths")
    if k % 16:
        raise ValueError(f"lowbit.{op}: the mma layout needs K (in_features) divisible by 16, got K={k}; "
                         "use weight_only_matmul for this layer")
    if n % 64:
        raise ValueError(f"lowbit.{op}: the mma layout needs N (out_features) divisible by 64, got N={n}; "
                         "use weight_only_matmul for this layer")
    if not (group_size >= k or group_size % 16 == 0):
        raise ValueError(f"lowbit.{op}: the mma layout needs group_size divisible by 16 (or >= K for "
                         f"per-channel), got {group_size}")


def _to_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[..., 32 / bits]`` -> int32 ``[...]``: code ``i`` in bits ``bits*i ..``."""
    shifts = torch.arange(0, 32, bits, device=codes.device)
    words = (codes.to(torch.int64) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _from_words(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[...]`` -> uint8 ``[..., 32 / bits]``; inverse of :func:`_to_words`."""
    # int32 throughout: the arithmetic shift's sign copies fall outside the mask.
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8)


def pack_mma(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
             group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ layout -> mma layout, exactly as ``lowbit.ops.pack_mma`` (module docstring).

    ``qweight`` int32 ``[K * bits / 32, N]`` (``K = qweight.shape[0] * 32 // bits``),
    ``scales`` float ``[G, N]``, ``zeros`` int32/uint8 ``[G, N]`` -> ``(packed int32
    [K / 16, N * bits / 2], scales [G, N] (scales.dtype), zeros uint8 [G, N])``, the last
    two with each 64-column block permuted (:func:`param_order`).

    Raises:
        ValueError: bits not 4 or 8, K not a multiple of 16, N not a multiple of 64, a
            group_size that cuts a k16 row, scales / zeros of the wrong shape, or a zero
            point outside ``0..255``.
    """
    if bits not in (4, 8):   # before K = rows * 32 / bits is computed
        _check_shape("pack_mma", bits, 0, 0, 1)
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    _check_shape("pack_mma", bits, k, n, group_size)
    g = num_groups(k, group_size)
    if tuple(scales.shape) != (g, n):
        raise ValueError(f"lowbit.pack_mma: argument 'scales' must have shape [{g}, {n}] (groups x "
                         f"out_features for K={k}, group_size {group_size}), got {list(scales.shape)}")
    if zeros.shape != scales.shape:
        raise ValueError(f"lowbit.pack_mma: argument 'zeros' must have the shape of 'scales' "
                         f"{list(scales.shape)}, got {list(zeros.shape)}")
    if zeros.dtype != torch.uint8 and zeros.numel() and bool(((zeros < 0) | (zeros > 255)).any()):
        raise ValueError("lowbit.pack_mma: argument 'zeros' must hold zero points in 0..255 for the mma "
                         f"layout, got values outside it (min {int(zeros.min())}, max {int(zeros.max())})")
    codes = unpack_int32(qweight, bits, k)                           # [K, N]
    krow, col = _row_positions(n, bits, qweight.device)              # [W, 32 / bits]
    packed = _to_words(codes.reshape(k // 16, 16, n)[:, krow, col], bits)
    order = param_order(n, scales.device)
    return (packed.contiguous(), scales[:, order].contiguous(),
            zeros.to(torch.uint8)[:, order].contiguous())


def mma_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes of a packed mma-layout weight: uint8 ``[N, K]`` (``K = 16 *
    packed.shape[0]``, ``N = packed.shape[1] * 2 / bits``)."""
    kb, words = packed.shape
    n = words * 2 // bits
    krow, col = _row_positions(n, bits, packed.device)
    codes = torch.empty(kb, 16, n, dtype=torch.uint8, device=packed.device)
    codes[:, krow, col] = _from_words(packed, bits)
    return codes.reshape(kb * 16, n).t()


def unpack_mma(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mma layout -> GPTQ layout; the inverse of :func:`pack_mma`: ``(qweight int32
    [K * bits / 32, N], scales [G, N] (scales.dtype), zeros uint8 [G, N])``, scales and
    zeros un-permuted. Pure tensor ops (fast on any device)."""
    qweight = pack_int32(mma_codes(packed, bits).t(), bits)
    return qweight, _unpermute(scales), _unpermute(zeros.to(torch.uint8))


def _unpermute(t: torch.Tensor) -> torch.Tensor:
    """Permuted ``[G, N]`` scales or zeros -> columns in order (contiguous)."""
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out[:, param_order(t.shape[1], t.device)] = t
    return out


def mma_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    accumulate: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ W.t() + bias`` from the mma layout (module docstring): ``x`` float ``[..., K]``,
    ``packed`` / ``scales`` / ``zeros`` from :func:`pack_mma`, ``bias`` optional float
    ``[N]``; returns ``out_dtype`` (default ``x.dtype``) ``[..., N]``.

    ``accumulate`` (float32, or float64 for tests) is the dtype of the matmul and the bias
    add; ``W`` is always computed in float32 and rounded to ``x.dtype`` first.
    """
    k = x.shape[-1]
    codes = mma_codes(packed, bits)                                  # [N, K]
    n = codes.shape[0]
    s = expand_groups(_unpermute(scales).to(x.dtype).float().t(), k, group_size)   # [N, K]
    z = expand_groups(_unpermute(zeros).float().t(), k, group_size)
    w = ((codes.float() - z) * s).to(x.dtype).to(accumulate)
    m = 1
    for d in x.shape[:-1]:
        m *= d
    y = x.reshape(m, k).to(accumulate) @ w.t()
    if bias is not None:
        y = y + bias.to(accumulate)
    return y.reshape(*x.shape[:-1], n).to(out_dtype or x.dtype)
