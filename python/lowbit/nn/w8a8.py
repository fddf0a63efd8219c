"""Weight-and-activation quantized layers: :class:`W8A8Linear` (int8, with the LLM.int8
outlier split) and :class:`FP8Linear` (float8 e4m3).

Both quantize their input on every call (dynamic per-token scales, or one static
per-tensor scale calibrated beforehand) and multiply in 8 bits with the dequantization
fused into the matmul's output (:func:`lowbit.ops.int8_matmul`,
:func:`lowbit.ops.fp8_matmul`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..config import QuantScheme

__all__ = ["W8A8Linear", "FP8Linear", "make_w8a8"]

_FP8 = torch.float8_e4m3fn


def _bias_param(bias: Tensor | None, n: int, device, dtype) -> nn.Parameter | None:
    if bias is None:
        return None
    p = nn.Parameter(torch.zeros(n, dtype=dtype or bias.dtype, device=device), requires_grad=False)
    p.data.copy_(bias)
    return p


def _check_input_scale(input_scale: Tensor | None, where: str) -> Tensor | None:
    if input_scale is None:
        return None
    s = torch.as_tensor(input_scale, dtype=torch.float32).reshape(())
    if not (torch.isfinite(s) and s > 0):
        raise ValueError(f"{where}: input_scale must be a positive finite number, got {float(s)}; calibrate "
                         "it as max |x| / 127 (int8) or / 448 (FP8) over real inputs")
    return s


class _Scaled8Linear(nn.Module):
    """What W8A8Linear and FP8Linear share: an 8-bit ``weight`` ``[N, K]`` with float32
    ``weight_scale``, an optional static ``input_scale`` (0-d) and a frozen float bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, static: bool, weight_dtype: torch.dtype,
                 scale_shape: tuple, device, dtype: torch.dtype | None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=weight_dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device) if static else None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _fill(self, weight: Tensor, weight_scale: Tensor, input_scale: Tensor | None, bias: Tensor | None):
        self.weight.copy_(weight)
        self.weight_scale.copy_(weight_scale.reshape(self.weight_scale.shape))
        if input_scale is not None:
            self.input_scale.copy_(input_scale)
        if bias is not None:
            self.bias.data.copy_(bias)
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the layer's tensors (weight, scales, bias)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.weight, self.weight_scale, self.input_scale, self.bias) if t is not None)


class W8A8Linear(_Scaled8Linear):
    """``y = x @ W^T + b`` with int8 weights and int8 activations (W8A8).

    Buffers:
        weight: int8 ``[N, K]``, per-output-channel absmax codes (``W ~= weight * weight_scale[:, None]``).
        weight_scale: float32 ``[N]``.
        input_scale: float32 0-d, the static activation scale (``max |x| / 127`` from
            calibration), or None for dynamic per-token scales.
        bias: float ``[N]`` or None.

    Attributes:
        outlier_threshold: LLM.int8 mode (Dettmers et al., 2022, sec. 3.2) when set: the
            input columns where any ``|x|`` exceeds it are multiplied in ``x.dtype`` against
            the dequantized weight columns, the rest in int8, and the two sums added.

    ``forward`` takes float32/float16/bfloat16 ``[..., K]`` and returns ``x.dtype``
    ``[..., N]``. Dynamic: :func:`lowbit.ops.quantize_per_token_int8` then
    :func:`lowbit.ops.int8_matmul`; static: :func:`lowbit.ops.quantize_per_tensor_int8`
    (values beyond the calibrated range saturate).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, static: bool = False,
                 outlier_threshold: float | None = None, device=None, dtype: torch.dtype | None = None):
        if static and outlier_threshold is not None:
            raise ValueError("W8A8Linear: the LLM.int8 outlier split uses dynamic per-token scales; "
                             "pass static=False with outlier_threshold")
        super().__init__(in_features, out_features, bias, static, torch.int8, (out_features,), device, dtype)
        self.outlier_threshold = outlier_threshold

    @classmethod
    def from_weight(cls, w: Tensor, bias: Tensor | None = None, *, input_scale: Tensor | float | None = None,
                    outlier_threshold: float | None = None) -> "W8A8Linear":
        """Round-to-nearest int8 of a float weight ``w`` ``[N, K]`` (per-channel absmax:
        ``scale = max |w[n]| / 127``), with a static ``input_scale`` (None: dynamic)."""
        n, k = w.shape
        scales, zeros = ops.quant_params(w.detach().float(), 8, max(k, 1), True)
        codes = ops.quantize(w.detach().float(), scales, zeros, 8, max(k, 1))
        return cls.from_codes((codes.to(torch.int16) - 128).to(torch.int8), scales.reshape(-1), bias,
                              input_scale=input_scale, outlier_threshold=outlier_threshold)

    @classmethod
    def from_codes(cls, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None, *,
                   input_scale: Tensor | float | None = None,
                   outlier_threshold: float | None = None) -> "W8A8Linear":
        """A layer from int8 codes ``[N, K]`` and float32 per-channel scales ``[N]``."""
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise TypeError(f"W8A8Linear.from_codes: weight must be int8 [N, K], got {weight.dtype} "
                            f"{list(weight.shape)}")
        n, k = weight.shape
        if weight_scale.numel() != n or not weight_scale.dtype.is_floating_point:
            raise ValueError(f"W8A8Linear.from_codes: weight_scale must be float [{n}] (one per output channel), got "
                             f"{weight_scale.dtype} {list(weight_scale.shape)}")
        if n and not (torch.isfinite(weight_scale).all() and (weight_scale > 0).all()):
            raise ValueError("W8A8Linear.from_codes: weight_scale must be positive and finite")
        s = _check_input_scale(input_scale, "W8A8Linear")
        layer = cls(k, n, bias=bias is not None, static=s is not None, outlier_threshold=outlier_threshold,
                    device=weight.device, dtype=None if bias is None else bias.dtype)
        return layer._fill(weight, weight_scale.float(), s, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the layer multiplies by, ``dtype`` ``[N, K]``."""
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def _int8(self, x2: Tensor, out_dtype: torch.dtype) -> Tensor:
        if self.input_scale is not None:
            xq = ops.quantize_per_tensor_int8(x2, self.input_scale)
            xs = self.input_scale
        else:
            xq, xs = ops.quantize_per_token_int8(x2)
        return ops.int8_matmul(xq, xs, self.weight, self.weight_scale, self.bias, out_dtype)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.outlier_threshold is None:
            y = self._int8(x2, x.dtype)
        else:
            cols = (x2.abs() > self.outlier_threshold).any(dim=0).nonzero().flatten()
            if cols.numel() == 0:
                y = self._int8(x2, x.dtype)
            else:
                # Outlier features carry most of the output's magnitude (Dettmers et al.,
                # 2022, sec. 3.2): they stay in 16 bits, and no longer set every token's
                # int8 scale for the other columns.
                x_in = x2.index_fill(1, cols, 0)
                w_out = self.weight.index_select(1, cols).float() * self.weight_scale[:, None]
                y = (self._int8(x_in, torch.float32) + x2.index_select(1, cols).float() @ w_out.t()).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        act = "static" if self.input_scale is not None else "dynamic per-token"
        extra = f", outlier_threshold={self.outlier_threshold:g}" if self.outlier_threshold is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights=int8 per-channel, activations=int8 {act}{extra}")


class FP8Linear(_Scaled8Linear):
    """``y = x @ W^T + b`` with float8 e4m3 weights and activations.

    Buffers:
        weight: float8_e4m3fn ``[N, K]`` (``W ~= weight * weight_scale``).
        weight_scale: float32 ``[N]`` (per-channel, ``max |w[n]| / 448``) or 0-d (per-tensor).
        input_scale: float32 0-d static activation scale (``max |x| / 448``), or None for
            dynamic per-token scales.
        bias: float ``[N]`` or None.

    ``forward``: :func:`lowbit.ops.quantize_fp8_dynamic` (per token) or
    :func:`lowbit.ops.quantize_fp8` (static) then :func:`lowbit.ops.fp8_matmul` (cuBLASLt
    FP8 on sm_89+, an emulation with the same numerics elsewhere).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, static: bool = False,
                 per_tensor_weight: bool = False, device=None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, static, _FP8, () if per_tensor_weight else (out_features,),
                         device, dtype)

    @classmethod
    def from_weight(cls, w: Tensor, bias: Tensor | None = None, *, input_scale: Tensor | float | None = None,
                    per_tensor_weight: bool = False) -> "FP8Linear":
        """FP8 e4m3 of a float weight ``w`` ``[N, K]`` with absmax scales (per channel, or
        one for the tensor), and a static ``input_scale`` (None: dynamic)."""
        n, k = w.shape
        q, scale = ops.quantize_fp8_dynamic(w.detach().float().contiguous(), _FP8, not per_tensor_weight)
        s = _check_input_scale(input_scale, "FP8Linear")
        layer = cls(k, n, bias=bias is not None, static=s is not None, per_tensor_weight=per_tensor_weight,
                    device=w.device, dtype=None if bias is None else bias.dtype)
        return layer._fill(q, scale, s, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the layer multiplies by, ``dtype`` ``[N, K]``."""
        s = self.weight_scale[:, None] if self.weight_scale.dim() else self.weight_scale
        return (self.weight.float() * s).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            xq, xs = ops.quantize_fp8(x2, self.input_scale, _FP8), self.input_scale
        else:
            xq, xs = ops.quantize_fp8_dynamic(x2, _FP8, True)
        y = ops.fp8_matmul(xq, xs, self.weight, self.weight_scale, self.bias, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        act = "static" if self.input_scale is not None else "dynamic per-token"
        w = "per-tensor" if self.weight_scale.dim() == 0 else "per-channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights=fp8 e4m3 {w}, activations=fp8 e4m3 {act}")


def make_w8a8(w: Tensor, bias: Tensor | None, scheme: QuantScheme, input_absmax: float | None = None,
              codes: Tensor | None = None, weight_scale: Tensor | None = None) -> nn.Module:
    """The W8A8 / FP8 layer of ``scheme`` for a float weight ``w`` ``[N, K]`` (on its device).

    ``input_absmax``: the calibrated ``max |x|`` of the layer's input, required by static
    schemes (the scale is ``input_absmax / 127`` for int8, ``/ 448`` for FP8). ``codes`` and
    ``weight_scale``: an int8 grid computed elsewhere (GPTQ), used instead of RTN.
    """
    if scheme.activations is None:
        raise ValueError(f"make_w8a8: {scheme.name} is weight-only; use QuantLinear")
    input_scale = None
    if scheme.static_activations:
        if input_absmax is None:
            raise ValueError(f"make_w8a8: {scheme.name} needs the calibrated max |x| of the layer's input")
        fmax = 448.0 if scheme.weight_format == "fp8" else 127.0
        input_scale = max(float(input_absmax), 1e-8) / fmax
    if scheme.weight_format == "fp8":
        return FP8Linear.from_weight(w, bias, input_scale=input_scale, per_tensor_weight=scheme.weight_per_tensor)
    if codes is not None:
        return W8A8Linear.from_codes(codes, weight_scale, bias, input_scale=input_scale,
                                     outlier_threshold=scheme.outlier_threshold)
    return W8A8Linear.from_weight(w, bias, input_scale=input_scale, outlier_threshold=scheme.outlier_threshold)
