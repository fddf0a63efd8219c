"""Typed wrappers and fake (meta) kernels of lowbit's custom ops, in schema order.

Schemas live in ``csrc/torch_bindings.cpp``; semantics in ``lowbit.reference``. Each
fake kernel makes the same argument checks as the C++ kernels, with the same wording,
so ``torch.compile`` and meta-device tracing reject bad input the way eager does.

Conventions (see ``lowbit.reference.quant``): a weight is ``[N, K]`` (out, in); groups
run along K, ``G = ceil(K / group_size)``; scales float32 ``[N, G]``; zero points int32
``[N, G]``; codes uint8 ``[N, K]``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "quant_params", "quantize", "dequantize", "pack_int32", "unpack_int32",
    "quantize_fp8", "quantize_fp8_dynamic", "dequantize_fp8", "quantize_per_token_int8",
    "weight_only_matmul", "accumulate_hessian", "gptq_solve", "activation_stats", "awq_scale_search",
    "awq_clip_search", "quantize_per_tensor_int8", "int8_matmul", "fp8_matmul", "pack_mma", "mma_matmul",
]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_lib = torch.ops.lowbit


# -- argument checks (mirror csrc/core/check.h) ------------------------------------------

def _msg(op: str, text: str):
    return lambda: f"lowbit.{op}: {text}"


def _check_float(op: str, arg: str, t: Tensor) -> None:
    torch._check_type(t.dtype in _FLOATS, _msg(
        op, f"argument '{arg}' must be float32, float16 or bfloat16, got {t.dtype}"))


def _check_float_dtype_arg(op: str, arg: str, dtype: torch.dtype) -> None:
    torch._check_type(dtype in _FLOATS, _msg(
        op, f"argument '{arg}' must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}"))


def _check_fp8_dtype_arg(op: str, arg: str, dtype: torch.dtype) -> None:
    torch._check_type(dtype in _FP8, _msg(
        op, f"argument '{arg}' must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}"))


def _check_dtype(op: str, arg: str, t: Tensor, want: torch.dtype) -> None:
    torch._check_type(t.dtype == want, _msg(op, f"argument '{arg}' must be {want}, got {t.dtype}"))


def _check_dim(op: str, arg: str, t: Tensor, dim: int) -> None:
    torch._check_value(t.dim() == dim, _msg(
        op, f"argument '{arg}' must be {dim}-D, got shape {list(t.shape)}"))


def _check_min_dim(op: str, arg: str, t: Tensor, dim: int) -> None:
    torch._check_value(t.dim() >= dim, _msg(
        op, f"argument '{arg}' must have at least {dim} dimension(s), got shape {list(t.shape)}"))


def _check_bits(op: str, bits: int) -> None:
    torch._check_value(2 <= bits <= 8, _msg(op, f"argument 'bits' must be in [2, 8], got {bits}"))


def _check_group_size(op: str, group_size: int) -> None:
    torch._check_value(group_size > 0, _msg(
        op, "argument 'group_size' must be a positive number of columns "
        f"(use group_size = K for per-channel), got {group_size}"))


def _check_same_device(op: str, arg: str, t: Tensor, ref_arg: str, ref: Tensor) -> None:
    torch._check_value(t.device == ref.device, _msg(
        op, f"argument '{arg}' is on {t.device} but '{ref_arg}' is on {ref.device}; "
        "move them to one device"))


def _num_groups(k, group_size: int):
    return (k + group_size - 1) // group_size


def _packed_rows(rows, bits: int):
    return (rows * bits + 31) // 32


def _check_grid(op: str, arg: str, t: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> None:
    _check_group_size(op, group_size)
    _check_dim(op, arg, t, 2)
    _check_float(op, "scales", scales)
    _check_dtype(op, "zeros", zeros, torch.int32)
    _check_same_device(op, "scales", scales, arg, t)
    _check_same_device(op, "zeros", zeros, arg, t)
    n, g = t.shape[0], _num_groups(t.shape[1], group_size)
    torch._check_value(scales.dim() == 2 and scales.shape[0] == n and scales.shape[1] == g, _msg(
        op, f"argument 'scales' must have shape [{n}, {g}] for '{arg}' of shape {list(t.shape)} "
        f"and group_size {group_size}, got {list(scales.shape)}"))
    torch._check_value(zeros.shape == scales.shape, _msg(
        op, f"argument 'zeros' must have the shape of 'scales' {list(scales.shape)}, "
        f"got {list(zeros.shape)}"))


def _row_scale_shape(x: Tensor) -> list:
    return [*x.shape[:-1], 1]


def _check_row_scale(op: str, x: Tensor, scale: Tensor) -> None:
    _check_dtype(op, "scale", scale, torch.float32)
    _check_same_device(op, "scale", scale, "x", x)
    if scale.numel() == 1:
        return
    rows = 1
    for d in x.shape[:-1]:
        rows = rows * d
    shape = _row_scale_shape(x)
    ok = list(scale.shape) == shape or (scale.dim() == 1 and scale.shape[0] == rows)
    torch._check_value(ok, _msg(
        op, f"argument 'scale' must hold one value (per-tensor) or one per row, shape {shape}, "
        f"for 'x' of shape {list(x.shape)}; got {list(scale.shape)}"))


# -- integer grids ---------------------------------------------------------------------

def quant_params(
    w: Tensor, bits: int, group_size: int, symmetric: bool = True, clip_ratio: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Per-group scales and zero points of a weight.

    Args:
        w: float32/float16/bfloat16 ``[N, K]``, any strides.
        bits: 2..8.
        group_size: columns per group along K (positive); ``>= K`` is per-channel.
            The last group is ragged when it does not divide K.
        symmetric: absmax grid (zero = 2**(bits-1)) if True, else min/max zero-point grid.
        clip_ratio: in (0, 1]; shrinks the range before the scale is taken.

    Returns:
        ``scales`` float32 ``[N, G]`` and ``zeros`` int32 ``[N, G]``, ``G = ceil(K / group_size)``.
        Raises ValueError if ``w`` holds NaN or Inf.
    """
    return _lib.quant_params.default(w, bits, group_size, symmetric, clip_ratio)


@torch.library.register_fake("lowbit::quant_params")
def _quant_params_fake(w, bits, group_size, symmetric, clip_ratio=1.0):
    op = "quant_params"
    _check_dim(op, "w", w, 2)
    _check_float(op, "w", w)
    _check_bits(op, bits)
    _check_group_size(op, group_size)
    torch._check_value(0.0 < clip_ratio <= 1.0, _msg(
        op, f"argument 'clip_ratio' must be in (0, 1], got {clip_ratio}"))
    n, g = w.shape[0], _num_groups(w.shape[1], group_size)
    return w.new_empty(n, g, dtype=torch.float32), w.new_empty(n, g, dtype=torch.int32)


def quantize(w: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> Tensor:
    """Integer codes of ``w`` on a grid.

    Args:
        w: float ``[N, K]``; must be finite.
        scales: float ``[N, G]``, positive and finite; zeros: int32 ``[N, G]``.
        bits: 2..8; group_size: as in :func:`quant_params`.

    Returns:
        uint8 codes ``[N, K]``: ``clamp(rint(w / scale) + zero, 0, 2**bits - 1)``.
    """
    return _lib.quantize.default(w, scales, zeros, bits, group_size)


@torch.library.register_fake("lowbit::quantize")
def _quantize_fake(w, scales, zeros, bits, group_size):
    op = "quantize"
    _check_float(op, "w", w)
    _check_bits(op, bits)
    _check_grid(op, "w", w, scales, zeros, group_size)
    return torch.empty_like(w, dtype=torch.uint8, memory_format=torch.contiguous_format)


def dequantize(
    codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, dtype: torch.dtype = torch.float16
) -> Tensor:
    """Float values of integer codes: ``(codes - zero) * scale``.

    Args:
        codes: uint8 ``[N, K]``; scales: float ``[N, G]``; zeros: int32 ``[N, G]``.
        dtype: output dtype (float32, float16 or bfloat16).

    Returns:
        ``dtype`` ``[N, K]``, contiguous; computed in float32 and rounded once.
    """
    return _lib.dequantize.default(codes, scales, zeros, group_size, dtype)


@torch.library.register_fake("lowbit::dequantize")
def _dequantize_fake(codes, scales, zeros, group_size, dtype):
    op = "dequantize"
    _check_dtype(op, "codes", codes, torch.uint8)
    _check_float_dtype_arg(op, "dtype", dtype)
    _check_grid(op, "codes", codes, scales, zeros, group_size)
    return codes.new_empty(codes.shape, dtype=dtype)


# -- bit packing -----------------------------------------------------------------------

def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes ``[R, C]`` (each ``< 2**bits``) along dim 0 into int32 words.

    Returns int32 ``[ceil(R * bits / 32), C]``; the layout (GPTQ's) is defined in
    :mod:`lowbit.reference.packing`. GPTQ's ``qweight`` is ``pack_int32(codes.t(), bits)``.
    """
    return _lib.pack_int32.default(codes, bits)


@torch.library.register_fake("lowbit::pack_int32")
def _pack_int32_fake(codes, bits):
    op = "pack_int32"
    _check_dtype(op, "codes", codes, torch.uint8)
    _check_dim(op, "codes", codes, 2)
    _check_bits(op, bits)
    return codes.new_empty(_packed_rows(codes.shape[0], bits), codes.shape[1], dtype=torch.int32)


def unpack_int32(packed: Tensor, bits: int, rows: int) -> Tensor:
    """Inverse of :func:`pack_int32`: int32 ``[ceil(rows * bits / 32), C]`` -> uint8 ``[rows, C]``."""
    return _lib.unpack_int32.default(packed, bits, rows)


@torch.library.register_fake("lowbit::unpack_int32")
def _unpack_int32_fake(packed, bits, rows):
    op = "unpack_int32"
    _check_dtype(op, "packed", packed, torch.int32)
    _check_dim(op, "packed", packed, 2)
    _check_bits(op, bits)
    torch._check_value(rows >= 0, _msg(op, f"argument 'rows' must be >= 0, got {rows}"))
    torch._check_value(packed.shape[0] == _packed_rows(rows, bits), _msg(
        op, f"argument 'packed' must have {_packed_rows(rows, bits)} rows of words for "
        f"rows={rows} and bits={bits}, got shape {list(packed.shape)}"))
    return packed.new_empty(rows, packed.shape[1], dtype=torch.uint8)


# -- FP8 -------------------------------------------------------------------------------

def quantize_fp8(x: Tensor, scale: Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> Tensor:
    """FP8 codes of ``x`` ``[..., K]`` with a given (static) scale.

    Args:
        x: float ``[..., K]``.
        scale: float32, one value (per-tensor) or one per row (``x.shape[:-1] + (1,)``).
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.

    Returns:
        ``dtype`` ``[..., K]``: ``x / scale`` saturated at the format's maximum (NaN stays NaN).
    """
    return _lib.quantize_fp8.default(x, scale, dtype)


@torch.library.register_fake("lowbit::quantize_fp8")
def _quantize_fp8_fake(x, scale, dtype):
    op = "quantize_fp8"
    _check_float(op, "x", x)
    _check_min_dim(op, "x", x, 1)
    _check_fp8_dtype_arg(op, "dtype", dtype)
    _check_row_scale(op, x, scale)
    return x.new_empty(x.shape, dtype=dtype)


def quantize_fp8_dynamic(
    x: Tensor, dtype: torch.dtype = torch.float8_e4m3fn, per_row: bool = True
) -> tuple[Tensor, Tensor]:
    """FP8 codes of ``x`` ``[..., K]`` with absmax scales computed on the fly.

    Returns ``(q, scale)``: ``q`` ``dtype`` ``[..., K]``; ``scale`` float32
    ``x.shape[:-1] + (1,)`` when ``per_row`` (per token / per channel), else 0-dim.
    Raises ValueError if ``x`` holds NaN or Inf.
    """
    return _lib.quantize_fp8_dynamic.default(x, dtype, per_row)


@torch.library.register_fake("lowbit::quantize_fp8_dynamic")
def _quantize_fp8_dynamic_fake(x, dtype, per_row):
    op = "quantize_fp8_dynamic"
    _check_float(op, "x", x)
    _check_min_dim(op, "x", x, 1)
    _check_fp8_dtype_arg(op, "dtype", dtype)
    scale_shape = _row_scale_shape(x) if per_row else []
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(scale_shape, dtype=torch.float32)


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float16) -> Tensor:
    """``q * scale`` as ``dtype`` ``[..., K]`` from FP8 ``q`` ``[..., K]`` and a per-tensor or per-row scale."""
    return _lib.dequantize_fp8.default(q, scale, dtype)


@torch.library.register_fake("lowbit::dequantize_fp8")
def _dequantize_fp8_fake(q, scale, dtype):
    op = "dequantize_fp8"
    torch._check_type(q.dtype in _FP8, _msg(
        op, f"argument 'q' must be torch.float8_e4m3fn or torch.float8_e5m2, got {q.dtype}"))
    _check_min_dim(op, "q", q, 1)
    _check_float_dtype_arg(op, "dtype", dtype)
    _check_row_scale(op, q, scale)
    return q.new_empty(q.shape, dtype=dtype)


# -- int8 activations ------------------------------------------------------------------

def quantize_per_token_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-token (per-row) absmax int8 quantization of activations.

    Args:
        x: float ``[..., K]``; must be finite.

    Returns:
        ``codes`` int8 ``[..., K]`` and ``scales`` float32 ``x.shape[:-1] + (1,)``,
        with ``x ~= codes * scales``.
    """
    return _lib.quantize_per_token_int8.default(x)


@torch.library.register_fake("lowbit::quantize_per_token_int8")
def _quantize_per_token_int8_fake(x):
    op = "quantize_per_token_int8"
    _check_float(op, "x", x)
    _check_min_dim(op, "x", x, 1)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(_row_scale_shape(x), dtype=torch.float32)


# -- weight-only matmul ----------------------------------------------------------------

def weight_only_matmul(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int,
    bias: Tensor | None = None,
) -> Tensor:
    """A linear layer with a quantized weight: ``x @ W.t() + bias``, float32 accumulation.

    ``W = (q - zero) * scale`` ``[N, K]`` is never stored: kernels read the packed codes.
    Semantics (and the tolerance kernels meet): :mod:`lowbit.reference.matmul`.

    Args:
        x: float32/float16/bfloat16 ``[..., K]``, any strides; ``M`` = product of the
            leading dims (0 is allowed).
        qweight: int32 ``[ceil(K * bits / 32), N]``, GPTQ's qweight:
            ``pack_int32(q.t(), bits)`` for uint8 codes ``q`` ``[N, K]``.
        scales: float32/float16/bfloat16 ``[N, G]``, ``G = ceil(K / group_size)``. Any
            strides; the fast layout is ``scales.stride(0) == 1`` (the transpose of a
            contiguous ``[G, N]``, as GPTQ stores them): the CPU kernel copies other
            layouts to it on every call (the CUDA kernel reads any strides). Not checked for NaN, Inf or zero (the hot path reads them once).
        zeros: int32 or uint8 ``[N, G]``, zero points; same layout rules as ``scales``.
        bits: 2..8 (the CPU kernel reads 2, 4 and 8 bits directly; 3, 5, 6, 7 through
            dequantized tiles).
        group_size: columns per group along K (positive); ``>= K`` is per-channel; the last
            group is ragged when it does not divide K.
        bias: optional float ``[N]``.

    Returns:
        ``x.dtype`` ``[..., N]``, contiguous, rounded once from float32. NaN or Inf in ``x``
        propagate (as NaN or Inf) like in any matmul; they are not errors.
    """
    return _lib.weight_only_matmul.default(x, qweight, scales, zeros, bits, group_size, bias)


def _check_weight_only_matmul(op, x, qweight, scales, zeros, bits, group_size, bias):
    # Mirrors csrc/core/matmul.h (check_weight_only_matmul), in the same order.
    _check_float(op, "x", x)
    _check_min_dim(op, "x", x, 1)
    _check_dtype(op, "qweight", qweight, torch.int32)
    _check_dim(op, "qweight", qweight, 2)
    _check_float(op, "scales", scales)
    torch._check_type(zeros.dtype in (torch.int32, torch.uint8), _msg(
        op, f"argument 'zeros' must be torch.int32 or torch.uint8, got {zeros.dtype}"))
    _check_bits(op, bits)
    _check_group_size(op, group_size)
    _check_same_device(op, "qweight", qweight, "x", x)
    _check_same_device(op, "scales", scales, "x", x)
    _check_same_device(op, "zeros", zeros, "x", x)
    k, n = x.shape[-1], qweight.shape[1]
    g = _num_groups(k, group_size)
    torch._check_value(qweight.shape[0] == _packed_rows(k, bits), _msg(
        op, f"argument 'qweight' must have {_packed_rows(k, bits)} rows of words for K={k} "
        f"(the last dim of 'x') and bits={bits}, got shape {list(qweight.shape)}"))
    torch._check_value(scales.dim() == 2 and scales.shape[0] == n and scales.shape[1] == g, _msg(
        op, f"argument 'scales' must have shape [{n}, {g}] for 'qweight' of shape "
        f"{list(qweight.shape)}, K={k} and group_size {group_size}, got {list(scales.shape)}"))
    torch._check_value(zeros.shape == scales.shape, _msg(
        op, f"argument 'zeros' must have the shape of 'scales' {list(scales.shape)}, "
        f"got {list(zeros.shape)}"))
    if bias is not None:
        _check_float(op, "bias", bias)
        _check_same_device(op, "bias", bias, "x", x)
        torch._check_value(bias.dim() == 1 and bias.shape[0] == n, _msg(
            op, f"argument 'bias' must have shape [{n}], got {list(bias.shape)}"))


@torch.library.register_fake("lowbit::weight_only_matmul")
def _weight_only_matmul_fake(x, qweight, scales, zeros, bits, group_size, bias=None):
    _check_weight_only_matmul("weight_only_matmul", x, qweight, scales, zeros, bits, group_size, bias)
    return x.new_empty(*x.shape[:-1], qweight.shape[1])


# -- GPTQ (reference/gptq.py) -------------------------------------------------------------

def accumulate_hessian(hessian: Tensor, x: Tensor, num_seen: int) -> None:
    """Add calibration rows to a GPTQ Hessian, in place (Frantar et al., 2022).

    ``hessian <- (num_seen * hessian + 2 X^T X) / (num_seen + m)``: after any sequence of
    batches it is ``2 X^T X / n`` over all ``n`` rows seen, in ``hessian``'s dtype (one
    GEMM per call). The caller keeps the count: ``num_seen += x.reshape(-1, K).shape[0]``.

    Args:
        hessian: float32/float64 ``[K, K]``, contiguous, updated in place (zeros to start).
        x: float ``[..., K]`` on the same device: a linear layer's inputs, every leading
            index one row (token).
        num_seen: rows already accumulated into ``hessian`` (>= 0).
    """
    _lib.accumulate_hessian.default(hessian, x, num_seen)


def _check_accumulate_hessian(op, hessian, x, num_seen):
    _check_dim(op, "hessian", hessian, 2)
    torch._check_type(hessian.dtype in (torch.float32, torch.float64), _msg(
        op, f"argument 'hessian' must be float32 or float64, got {hessian.dtype}"))
    torch._check_value(hessian.shape[0] == hessian.shape[1], _msg(
        op, f"argument 'hessian' must be square [K, K], got shape {list(hessian.shape)}"))
    torch._check_value(hessian.is_contiguous(), _msg(
        op, "argument 'hessian' must be contiguous (it is updated in place)"))
    torch._check_type(x.dtype in _FLOATS + (torch.float64,), _msg(
        op, f"argument 'x' must be float32, float16, bfloat16 or float64, got {x.dtype}"))
    _check_min_dim(op, "x", x, 1)
    torch._check_value(x.shape[-1] == hessian.shape[0], _msg(
        op, f"argument 'x' must have last dimension K = {hessian.shape[0]} (the Hessian's size), "
        f"got shape {list(x.shape)}"))
    _check_same_device(op, "x", x, "hessian", hessian)
    torch._check_value(num_seen >= 0, _msg(op, f"argument 'num_seen' must be >= 0, got {num_seen}"))


@torch.library.register_fake("lowbit::accumulate_hessian")
def _accumulate_hessian_fake(hessian, x, num_seen):
    _check_accumulate_hessian("accumulate_hessian", hessian, x, num_seen)


def gptq_solve(
    w: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    clip_ratio: float = 1.0,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """GPTQ of one linear layer (Frantar et al., 2022, Algorithm 1) in one call.

    Dead inputs, act-order, dampening, the Cholesky factor of ``H^-1`` and the lazy
    batches of ``block_size`` columns (each block's column loop is one C++ loop / one CUDA
    kernel, the rest one GEMM). Computed in float64 when ``w`` or ``hessian`` is float64,
    else float32. Semantics: :mod:`lowbit.reference.gptq`.

    Args:
        w: float ``[N, K]`` (out, in). hessian: float32/float64 ``[K, K]``, ``2 X^T X / n``
            (:func:`accumulate_hessian`), same device.
        bits: 2..8. group_size: columns per group (``>= K``: per-channel); without static
            groups each block is widened to whole groups.
        symmetric: absmax grid (zero ``2**(bits-1)``) or min/max zero-point grid.
        damp: fraction of the mean diagonal added to it (GPTQ's 1%).
        act_order: quantize columns in descending ``diag(H)`` order.
        static_groups: group scales from the original weight, in natural column order.
        clip_ratio: shrinks each group's range, in (0, 1].
        scale_dtype: the dtype the scales will be stored in; codes are computed against
            the scales rounded to it.

    Returns:
        ``codes`` uint8 ``[N, K]`` in the original column order; ``scales`` float32
        ``[N, G]``; ``zeros`` int32 ``[N, G]``; ``g_idx`` int32 ``[K]`` (input column ->
        group; with act-order and no static groups, groups are runs of the processing
        order); ``loss`` float64 0-d, ``sum (w - w_hat)^2 / U[q, q]^2 / 2``.

    Raises:
        ValueError: NaN/Inf in ``w`` or ``hessian``, or a damped Hessian that is not
            positive definite (message contains "not positive definite").
    """
    return _lib.gptq_solve.default(w, hessian, bits, group_size, symmetric, damp, act_order,
                                   static_groups, block_size, clip_ratio, scale_dtype)


def _check_gptq_solve(op, w, hessian, bits, group_size, damp, block_size, clip_ratio, scale_dtype):
    _check_dim(op, "w", w, 2)
    torch._check_type(w.dtype in _FLOATS + (torch.float64,), _msg(
        op, f"argument 'w' must be float32, float16, bfloat16 or float64, got {w.dtype}"))
    _check_dim(op, "hessian", hessian, 2)
    torch._check_type(hessian.dtype in (torch.float32, torch.float64), _msg(
        op, f"argument 'hessian' must be float32 or float64, got {hessian.dtype}"))
    k = w.shape[1]
    torch._check_value(hessian.shape[0] == k and hessian.shape[1] == k, _msg(
        op, f"argument 'hessian' must be [K, K] = [{k}, {k}] for a weight of shape {list(w.shape)}, "
        f"got {list(hessian.shape)}"))
    _check_same_device(op, "hessian", hessian, "w", w)
    _check_bits(op, bits)
    _check_group_size(op, group_size)
    torch._check_value(damp >= 0 and damp == damp and damp != float("inf"), _msg(
        op, f"argument 'damp' must be a finite fraction >= 0 of the mean diagonal, got {damp}"))
    torch._check_value(block_size > 0, _msg(op, f"argument 'block_size' must be positive, got {block_size}"))
    torch._check_value(0 < clip_ratio <= 1, _msg(op, f"argument 'clip_ratio' must be in (0, 1], got {clip_ratio}"))
    _check_float_dtype_arg(op, "scale_dtype", scale_dtype)


@torch.library.register_fake("lowbit::gptq_solve")
def _gptq_solve_fake(w, hessian, bits, group_size, symmetric, damp, act_order, static_groups, block_size,
                     clip_ratio, scale_dtype):
    _check_gptq_solve("gptq_solve", w, hessian, bits, group_size, damp, block_size, clip_ratio, scale_dtype)
    n, k = w.shape
    g = _num_groups(k, min(group_size, k) if k > 0 else group_size)
    return (w.new_empty(n, k, dtype=torch.uint8), w.new_empty(n, g, dtype=torch.float32),
            w.new_empty(n, g, dtype=torch.int32), w.new_empty(k, dtype=torch.int32),
            w.new_empty((), dtype=torch.float64))


# -- calibration statistics (reference/activation.py) ------------------------------------

def activation_stats(absmax: Tensor, abssum: Tensor, x: Tensor) -> None:
    """Accumulate per-input-channel statistics of a linear layer's input, in place.

    ``absmax <- max(absmax, max_rows |x|)`` and ``abssum <- abssum + sum_rows |x|``; the
    caller keeps the row count (``rows += x.numel() // K``), so ``abssum / rows`` is AWQ's
    mean ``|x|`` and ``absmax`` is SmoothQuant's (and static activation scales') ``max |x|``.

    Args:
        absmax: float32 ``[K]``, contiguous (zeros to start), updated in place.
        abssum: float64 ``[K]``, contiguous (zeros to start), updated in place; float64 so
            that millions of calibration tokens sum without losing the small ones.
        x: float32/float16/bfloat16 ``[..., K]`` on the same device, every leading index one
            row (token).

    Raises:
        ValueError: ``x`` holds NaN or Inf (the message names the first bad row). ``x`` is
            checked before anything is written: ``absmax`` and ``abssum`` are then unchanged.
    """
    _lib.activation_stats.default(absmax, abssum, x)


def _check_activation_stats(op, absmax, abssum, x):
    _check_dtype(op, "absmax", absmax, torch.float32)
    _check_dim(op, "absmax", absmax, 1)
    _check_dtype(op, "abssum", abssum, torch.float64)
    _check_dim(op, "abssum", abssum, 1)
    _check_float(op, "x", x)
    _check_min_dim(op, "x", x, 1)
    k = absmax.shape[0]
    torch._check_value(abssum.shape[0] == k, _msg(
        op, f"argument 'abssum' must have shape [{k}] like 'absmax', got {list(abssum.shape)}"))
    torch._check_value(x.shape[-1] == k, _msg(
        op, f"argument 'x' must have last dimension K = {k} (the length of 'absmax'), got shape {list(x.shape)}"))
    torch._check_value(absmax.is_contiguous() and abssum.is_contiguous(), _msg(
        op, "arguments 'absmax' and 'abssum' must be contiguous (they are updated in place)"))
    _check_same_device(op, "abssum", abssum, "absmax", absmax)
    _check_same_device(op, "x", x, "absmax", absmax)


@torch.library.register_fake("lowbit::activation_stats")
def _activation_stats_fake(absmax, abssum, x):
    _check_activation_stats("activation_stats", absmax, abssum, x)


# -- AWQ (reference/awq.py) --------------------------------------------------------------

def awq_scale_search(
    w: Tensor,
    gram: Tensor,
    act_mean: Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    n_grid: int = 20,
    scale_dtype: torch.dtype = torch.float16,
    max_value: float = float("inf"),
) -> tuple[Tensor, Tensor]:
    """AWQ's activation-aware scale search (Lin et al., 2023, sec. 3.2) in one call.

    For ``alpha = i / n_grid``, ``i = 0 .. n_grid-1``: ``s = clamp(act_mean, 1e-4)**alpha``,
    normalised by ``sqrt(max(s) * min(s))``; ``W_hat = Q(W diag(s)) diag(s)^-1`` on the RTN
    grid (scales rounded to ``scale_dtype``, as :class:`lowbit.nn.QuantLinear` stores them);
    ``loss = tr((W_hat - W) G (W_hat - W)^T)``, i.e. ``|X W_hat^T - X W^T|^2 / n`` when
    ``G = X^T X / n``. A candidate whose ``W diag(s)`` or ``1 / s`` exceeds ``max_value``
    (the model dtype's largest value: the folded weights must stay finite) gets an infinite
    loss. ``alpha = 0`` (``s = 1``) is plain RTN, so the best loss is never above RTN's.

    Args:
        w: float32 ``[N, K]``: the weights of the linears that read the same input, stacked.
        gram: float32 ``[K, K]``, symmetric PSD, ``X^T X / n`` of that input (any positive
            multiple works: it only scales the losses).
        act_mean: float32 ``[K]``, mean ``|x|`` per input channel (>= 0).
        bits: 2..8. group_size: columns per group (``>= K``: per-channel).
        symmetric: absmax grid or min/max zero-point grid.
        n_grid: number of alphas (>= 1; AWQ uses 20).
        scale_dtype: float32/float16/bfloat16, the dtype the layer stores scales in.
        max_value: largest allowed magnitude of the scaled weights and of ``1 / s``.

    Returns:
        ``losses`` float64 ``[n_grid]`` (``inf`` for rejected candidates) and the best
        candidate's ``s`` float32 ``[K]`` (the first of equal losses: the smallest alpha).

    Raises:
        ValueError: NaN/Inf in ``w``, ``gram`` or ``act_mean``, a negative ``act_mean``.
    """
    return _lib.awq_scale_search.default(w, gram, act_mean, bits, group_size, symmetric, n_grid, scale_dtype,
                                         max_value)


def _check_awq_common(op, w, gram, bits, group_size, scale_dtype):
    _check_dtype(op, "w", w, torch.float32)
    _check_dim(op, "w", w, 2)
    _check_dtype(op, "gram", gram, torch.float32)
    k = w.shape[1]
    torch._check_value(gram.dim() == 2 and gram.shape[0] == k and gram.shape[1] == k, _msg(
        op, f"argument 'gram' must be [K, K] = [{k}, {k}] for 'w' of shape {list(w.shape)}, got {list(gram.shape)}"))
    _check_same_device(op, "gram", gram, "w", w)
    _check_bits(op, bits)
    _check_group_size(op, group_size)
    _check_float_dtype_arg(op, "scale_dtype", scale_dtype)


@torch.library.register_fake("lowbit::awq_scale_search")
def _awq_scale_search_fake(w, gram, act_mean, bits, group_size, symmetric, n_grid, scale_dtype, max_value):
    op = "awq_scale_search"
    _check_awq_common(op, w, gram, bits, group_size, scale_dtype)
    _check_dtype(op, "act_mean", act_mean, torch.float32)
    k = w.shape[1]
    torch._check_value(act_mean.dim() == 1 and act_mean.shape[0] == k, _msg(
        op, f"argument 'act_mean' must have shape [{k}] (K of 'w'), got {list(act_mean.shape)}"))
    _check_same_device(op, "act_mean", act_mean, "w", w)
    torch._check_value(n_grid >= 1, _msg(op, f"argument 'n_grid' must be >= 1, got {n_grid}"))
    torch._check_value(max_value > 0, _msg(op, f"argument 'max_value' must be positive, got {max_value}"))
    return w.new_empty(n_grid, dtype=torch.float64), w.new_empty(k, dtype=torch.float32)


def awq_clip_search(
    w: Tensor,
    gram: Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[Tensor, Tensor, Tensor]:
    """AWQ's clip search (Lin et al., 2023, sec. 3.3 / its ``auto_clip``) in one call.

    For each ratio ``r = 1 - i / n_grid``, ``i = 0 .. int(max_shrink * n_grid) - 1`` (at
    least ``r = 1``), every group's range is shrunk by ``r`` (:func:`quant_params`'
    ``clip_ratio``), the scales rounded to ``scale_dtype``, and the group's output error
    ``d G_gg d^T`` measured, ``d = W_hat[n, g] - W[n, g]`` and ``G_gg`` the group's diagonal
    block of ``gram``. Each (row, group) keeps its best ratio (the largest of equal errors).

    Args:
        w: float32 ``[N, K]``. gram: float32 ``[K, K]``, ``X^T X / n`` of the layer's input
            (only the ``group_size`` diagonal blocks are read).
        bits, group_size, symmetric, scale_dtype: the grid, as in :func:`quant_params`.
        n_grid: ratio step ``1 / n_grid`` (>= 1). max_shrink: in [0, 1), the largest shrink.

    Returns:
        ``scales`` float32 ``[N, G]`` (representable in ``scale_dtype``), ``zeros`` int32
        ``[N, G]`` and the chosen ratios float32 ``[N, G]``: :func:`quantize` with these
        scales and zeros gives the codes.

    Raises:
        ValueError: NaN/Inf in ``w`` or ``gram``.
    """
    return _lib.awq_clip_search.default(w, gram, bits, group_size, symmetric, n_grid, max_shrink, scale_dtype)


@torch.library.register_fake("lowbit::awq_clip_search")
def _awq_clip_search_fake(w, gram, bits, group_size, symmetric, n_grid, max_shrink, scale_dtype):
    op = "awq_clip_search"
    _check_awq_common(op, w, gram, bits, group_size, scale_dtype)
    torch._check_value(n_grid >= 1, _msg(op, f"argument 'n_grid' must be >= 1, got {n_grid}"))
    torch._check_value(0 <= max_shrink < 1, _msg(op, f"argument 'max_shrink' must be in [0, 1), got {max_shrink}"))
    n, k = w.shape
    g = _num_groups(k, group_size)
    return (w.new_empty(n, g, dtype=torch.float32), w.new_empty(n, g, dtype=torch.int32),
            w.new_empty(n, g, dtype=torch.float32))


# -- W8A8 ----------------------------------------------------------------------------------

def quantize_per_tensor_int8(x: Tensor, scale: Tensor) -> Tensor:
    """Static per-tensor int8 activations: ``clamp(rint(x / scale), -128, 127)``.

    Args:
        x: float32/float16/bfloat16 ``[..., K]``.
        scale: float32, one positive finite value (any shape with one element), e.g. a
            calibrated ``max |x| / 127``; its value is checked when the kernel runs (the
            fake kernel checks dtype and shape only).

    Returns:
        int8 ``[..., K]`` (float32 math, round half to even; NaN is an error, +-Inf
        saturates like any value beyond the range).
    """
    return _lib.quantize_per_tensor_int8.default(x, scale)


@torch.library.register_fake("lowbit::quantize_per_tensor_int8")
def _quantize_per_tensor_int8_fake(x, scale):
    op = "quantize_per_tensor_int8"
    _check_float(op, "x", x)
    _check_min_dim(op, "x", x, 1)
    _check_dtype(op, "scale", scale, torch.float32)
    torch._check_value(scale.numel() == 1, _msg(
        op, f"argument 'scale' must hold exactly one value (per-tensor), got shape {list(scale.shape)}"))
    _check_same_device(op, "scale", scale, "x", x)
    return x.new_empty(x.shape, dtype=torch.int8)


def _check_scaled_matmul(op, x, x_scale, w, w_scale, bias, out_dtype, qdtype):
    _check_dtype(op, "x", x, qdtype)
    _check_min_dim(op, "x", x, 1)
    _check_dtype(op, "w", w, qdtype)
    _check_dim(op, "w", w, 2)
    _check_dtype(op, "x_scale", x_scale, torch.float32)
    _check_dtype(op, "w_scale", w_scale, torch.float32)
    _check_float_dtype_arg(op, "out_dtype", out_dtype)
    _check_same_device(op, "w", w, "x", x)
    _check_same_device(op, "x_scale", x_scale, "x", x)
    _check_same_device(op, "w_scale", w_scale, "x", x)
    n, k = w.shape
    torch._check_value(x.shape[-1] == k, _msg(
        op, f"argument 'x' must have last dimension K = {k} (the columns of 'w' {list(w.shape)}), "
        f"got shape {list(x.shape)}"))
    rows = 1
    for d in x.shape[:-1]:
        rows = rows * d
    xs_ok = x_scale.numel() == 1 or list(x_scale.shape) == _row_scale_shape(x) or (
        x_scale.dim() == 1 and x_scale.shape[0] == rows)
    torch._check_value(xs_ok, _msg(
        op, f"argument 'x_scale' must hold one value (per-tensor) or one per row of 'x', shape "
        f"{_row_scale_shape(x)}; got {list(x_scale.shape)}"))
    torch._check_value(w_scale.numel() == 1 or (w_scale.dim() == 1 and w_scale.shape[0] == n), _msg(
        op, f"argument 'w_scale' must hold one value (per-tensor) or one per output channel, shape [{n}]; "
        f"got {list(w_scale.shape)}"))
    if bias is not None:
        _check_float(op, "bias", bias)
        _check_same_device(op, "bias", bias, "x", x)
        torch._check_value(bias.dim() == 1 and bias.shape[0] == n, _msg(
            op, f"argument 'bias' must have shape [{n}], got {list(bias.shape)}"))


def int8_matmul(
    x: Tensor,
    x_scale: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> Tensor:
    """W8A8 int8 linear: ``y = (x @ w^T as int32) * x_scale * w_scale + bias``.

    The product accumulates exactly in int32; the dequantization (per-row activation scale,
    per-channel weight scale, bias) is applied to the accumulator in float32 inside the
    kernel and rounded once to ``out_dtype``. CPU: AVX-512 VNNI / AVX-VNNI where the CPU has
    it, AVX2 otherwise; CUDA: int8 tensor cores. Semantics: :mod:`lowbit.reference.matmul`.

    Args:
        x: int8 ``[..., K]`` (e.g. from :func:`quantize_per_token_int8` or
            :func:`quantize_per_tensor_int8`), ``M`` = product of the leading dims.
        x_scale: float32, one per row (``[..., 1]`` or ``[M]``) or one value.
        w: int8 ``[N, K]`` (out, in).
        w_scale: float32 ``[N]`` (per output channel) or one value.
        bias: optional float ``[N]``.
        out_dtype: float32/float16/bfloat16.

    Returns:
        ``out_dtype`` ``[..., N]``, contiguous.

    Raises:
        ValueError: ``K > 131071`` (the int32 accumulator could overflow), or a NaN/Inf
            scale (checked when the kernel runs; on CUDA that check reads one flag back,
            a stream synchronisation per call).
    """
    return _lib.int8_matmul.default(x, x_scale, w, w_scale, bias, out_dtype)


@torch.library.register_fake("lowbit::int8_matmul")
def _int8_matmul_fake(x, x_scale, w, w_scale, bias, out_dtype):
    op = "int8_matmul"
    _check_scaled_matmul(op, x, x_scale, w, w_scale, bias, out_dtype, torch.int8)
    k = w.shape[1]
    torch._check_value(k <= 131071, _msg(
        op, f"K = {k} is too large: the int32 accumulator is exact only for K <= 131071 "
        "(|sum_k x*w| <= 128 * 128 * K < 2^31)"))
    return x.new_empty(*x.shape[:-1], w.shape[0], dtype=out_dtype)


def fp8_matmul(
    x: Tensor,
    x_scale: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """FP8 (e4m3) linear: ``y = (x @ w^T, float32 accumulation) * x_scale * w_scale + bias``.

    On CUDA devices with FP8 tensor cores (sm_89+) through ``torch._scaled_mm`` (cuBLASLt);
    elsewhere (CPU, older GPUs) an emulation with the same numerics: FP8 products are exact
    in float32, so only the summation order differs. Semantics: :mod:`lowbit.reference.fp8`.

    Args:
        x: float8_e4m3fn ``[..., K]`` (e.g. from :func:`quantize_fp8_dynamic`).
        x_scale: float32, one per row (``[..., 1]`` or ``[M]``) or one value.
        w: float8_e4m3fn ``[N, K]``. w_scale: float32 ``[N]`` or one value.
        bias: optional float ``[N]``. out_dtype: float32/float16/bfloat16.

    Returns:
        ``out_dtype`` ``[..., N]``, contiguous.
    """
    return _lib.fp8_matmul.default(x, x_scale, w, w_scale, bias, out_dtype)


@torch.library.register_fake("lowbit::fp8_matmul")
def _fp8_matmul_fake(x, x_scale, w, w_scale, bias, out_dtype):
    _check_scaled_matmul("fp8_matmul", x, x_scale, w, w_scale, bias, out_dtype, torch.float8_e4m3fn)
    return x.new_empty(*x.shape[:-1], w.shape[0], dtype=out_dtype)


# -- tensor-core weight-only matmul (reference/mma.py) ------------------------------------

def pack_mma(qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int,
             group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Re-lay a GPTQ-layout weight into the mma layout of :func:`mma_matmul` (done once,
    at load time). Layout: :mod:`lowbit.reference.mma`.

    Args:
        qweight: int32 ``[K * bits / 32, N]``, GPTQ's qweight (``QuantLinear.qweight``).
        scales: float32/float16/bfloat16 ``[G, N]`` (groups x out features, as
            ``QuantLinear.scales``), ``G = ceil(K / group_size)``.
        zeros: int32 or uint8 ``[G, N]``, each in ``0..255``.
        bits: 4 or 8. group_size: a multiple of 16, or ``>= K`` (per-channel).
        K (``in_features``) must be a multiple of 16 and N (``out_features``) of 64.

    Returns:
        ``(packed, scales, zeros)``: int32 ``[K / 16, N * bits / 2]``, ``scales.dtype``
        ``[G, N]`` and uint8 ``[G, N]``, the last two with the columns of each block of 64
        permuted (``reference.mma.param_order``), all contiguous, on ``qweight``'s device.

    Raises:
        ValueError: a shape the layout cannot hold (the message says which), or a zero
            point outside ``0..255``.
    """
    return _lib.pack_mma.default(qweight, scales, zeros, bits, group_size)


def _check_mma_shape(op, bits, k, n, group_size):
    # Mirrors csrc/core/mma.h (check_mma_shape).
    torch._check_value(bits in (4, 8), _msg(
        op, f"the mma layout holds 4- or 8-bit codes, got bits={bits}; use weight_only_matmul for other widths"))
    torch._check_value(k % 16 == 0, _msg(
        op, f"the mma layout needs K (in_features) divisible by 16, got K={k}; use weight_only_matmul "
        "for this layer"))
    torch._check_value(n % 64 == 0, _msg(
        op, f"the mma layout needs N (out_features) divisible by 64, got N={n}; use weight_only_matmul "
        "for this layer"))
    torch._check_value(group_size >= k or group_size % 16 == 0, _msg(
        op, f"the mma layout needs group_size divisible by 16 (or >= K for per-channel), got {group_size}"))


@torch.library.register_fake("lowbit::pack_mma")
def _pack_mma_fake(qweight, scales, zeros, bits, group_size):
    op = "pack_mma"
    _check_dtype(op, "qweight", qweight, torch.int32)
    _check_dim(op, "qweight", qweight, 2)
    _check_float(op, "scales", scales)
    _check_dim(op, "scales", scales, 2)
    torch._check_type(zeros.dtype in (torch.int32, torch.uint8), _msg(
        op, f"argument 'zeros' must be torch.int32 or torch.uint8, got {zeros.dtype}"))
    _check_group_size(op, group_size)
    torch._check_value(bits in (4, 8), _msg(
        op, f"the mma layout holds 4- or 8-bit codes, got bits={bits}; use weight_only_matmul for other widths"))
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    _check_mma_shape(op, bits, k, n, group_size)
    _check_same_device(op, "scales", scales, "qweight", qweight)
    _check_same_device(op, "zeros", zeros, "qweight", qweight)
    g = _num_groups(k, group_size)
    torch._check_value(scales.shape[0] == g and scales.shape[1] == n, _msg(
        op, f"argument 'scales' must have shape [{g}, {n}] (groups x out_features for K={k}, group_size "
        f"{group_size}), got {list(scales.shape)}"))
    torch._check_value(zeros.shape == scales.shape, _msg(
        op, f"argument 'zeros' must have the shape of 'scales' {list(scales.shape)}, got {list(zeros.shape)}"))
    return (qweight.new_empty(k // 16, n * bits // 2), scales.new_empty(g, n),
            zeros.new_empty(g, n, dtype=torch.uint8))


def mma_matmul(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int,
    bias: Tensor | None = None,
    max_mma_rows: int = -1,
) -> Tensor:
    """A weight-only quantized linear layer from the mma layout: ``x @ W.t() + bias``.

    ``W = (q - zero) * scale`` ``[N, K]`` with the scale first rounded to ``x.dtype``, and
    ``W`` rounded to ``x.dtype`` (the value a tensor core multiplies); float32
    accumulation, one rounding of the result. Semantics: :mod:`lowbit.reference.mma`.

    On CUDA (sm_80+, float16/bfloat16 ``x``) rows up to ``max_mma_rows`` run on a
    tensor-core kernel that reads the packed codes once (``mma.sync`` with an
    asynchronous multi-stage copy pipeline and split-K); more rows dequantize ``W`` once
    and call cuBLAS. float32 ``x``, the CPU and older GPUs always take the second path.

    Args:
        x: float32/float16/bfloat16 ``[..., K]``; ``M`` = product of the leading dims.
        packed, scales, zeros: from :func:`pack_mma` (int32 ``[K / 16, N * bits / 2]``,
            float ``[G, N]``, uint8 ``[G, N]``).
        bits: 4 or 8, as packed. group_size: as packed.
        bias: optional float ``[N]``.
        max_mma_rows: ``-1`` (default) picks the path from crossovers measured on an H200
            (``benchmarks/bench_mma.py``: the kernel up to 128 rows for layers of at least
            2**25 weights, 64 below); ``0`` always dequantizes + GEMM; a large value always
            runs the tensor-core kernel (benchmarks and tests).

    Returns:
        ``x.dtype`` ``[..., N]``, contiguous.
    """
    return _lib.mma_matmul.default(x, packed, scales, zeros, bits, group_size, bias, max_mma_rows)


@torch.library.register_fake("lowbit::mma_matmul")
def _mma_matmul_fake(x, packed, scales, zeros, bits, group_size, bias=None, max_mma_rows=-1):
    op = "mma_matmul"
    _check_float(op, "x", x)
    _check_min_dim(op, "x", x, 1)
    _check_dtype(op, "packed", packed, torch.int32)
    _check_dim(op, "packed", packed, 2)
    _check_float(op, "scales", scales)
    _check_dim(op, "scales", scales, 2)
    _check_dtype(op, "zeros", zeros, torch.uint8)
    _check_group_size(op, group_size)
    torch._check_value(bits in (4, 8), _msg(op, f"the mma layout holds 4- or 8-bit codes, got bits={bits}"))
    _check_same_device(op, "packed", packed, "x", x)
    _check_same_device(op, "scales", scales, "x", x)
    _check_same_device(op, "zeros", zeros, "x", x)
    k = x.shape[-1]
    torch._check_value(packed.shape[0] * 16 == k, _msg(
        op, f"argument 'packed' must have K/16 = {k // 16} rows for K={k} (the last dim of 'x'), got shape "
        f"{list(packed.shape)}"))
    torch._check_value((packed.shape[1] * 2) % bits == 0, _msg(
        op, f"argument 'packed' has {packed.shape[1]} words per row, not a whole number of columns at "
        f"bits={bits}"))
    n = packed.shape[1] * 2 // bits
    _check_mma_shape(op, bits, k, n, group_size)
    g = _num_groups(k, group_size)
    torch._check_value(scales.shape[0] == g and scales.shape[1] == n, _msg(
        op, f"argument 'scales' must have shape [{g}, {n}] for K={k}, N={n} and group_size {group_size}, "
        f"got {list(scales.shape)}"))
    torch._check_value(zeros.shape == scales.shape, _msg(
        op, f"argument 'zeros' must have the shape of 'scales' {list(scales.shape)}, got {list(zeros.shape)}"))
    if bias is not None:
        _check_float(op, "bias", bias)
        _check_same_device(op, "bias", bias, "x", x)
        torch._check_value(bias.dim() == 1 and bias.shape[0] == n, _msg(
            op, f"argument 'bias' must have shape [{n}], got {list(bias.shape)}"))
    return x.new_empty(*x.shape[:-1], n)
