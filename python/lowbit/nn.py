"""Quantized layers: :class:`QuantLinear`, the weight-only replacement of ``nn.Linear``."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops
from .config import QuantScheme
from .reference.packing import packed_rows
from .reference.quant import num_groups

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` stored on a weight-only integer grid (W2..W8, A16).

    The weight ``[N, K]`` (``N = out_features``, ``K = in_features``) is kept as codes on
    the grid of :mod:`lowbit.reference.quant`, ``W[n, k] = (q[n, k] - zero[g]) * scale[g]``
    with ``g = k // group_size``, in the tensor layout of GPTQ checkpoints:

    Buffers:
        qweight: int32 ``[ceil(K * bits / 32), N]``: codes packed along K
            (``ops.pack_int32(q.t(), bits)``; layout in :mod:`lowbit.reference.packing`).
        scales: ``scale_dtype`` ``[G, N]``, ``G = ceil(K / group_size)`` (N-contiguous, so
            kernels read one group's scales for consecutive output columns in one run).
        zeros: uint8 ``[G, N]`` zero points (``2**(bits-1)`` everywhere when symmetric).
        bias: float ``[N]`` or None (a frozen ``nn.Parameter``, as in ``nn.Linear``).

    ``forward`` takes ``x`` float32/float16/bfloat16 ``[..., K]`` and returns ``[..., N]`` in
    ``x.dtype`` through :func:`lowbit.ops.weight_only_matmul` (packed reads for decode,
    dequantize + BLAS/cuBLAS for large batches; fp32 accumulation).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int | None = 128,
        symmetric: bool = True,
        scale_dtype: torch.dtype = torch.float16,
        device=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric,
                    scale_dtype=scale_dtype).check_in_features(in_features, "QuantLinear")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.per_channel = group_size is None
        self.group_size = max(in_features, 1) if group_size is None else group_size
        self.symmetric = symmetric
        g = num_groups(in_features, self.group_size)
        self.register_buffer("qweight", torch.zeros(
            packed_rows(in_features, bits), out_features, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(g, out_features, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", torch.full(
            (g, out_features), 2 ** (bits - 1) if symmetric else 0, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int | None = 128,
        symmetric: bool = True,
        scale_dtype: torch.dtype = torch.float16,
        clip_ratio: float = 1.0,
        *,
        scheme: QuantScheme | None = None,
    ) -> "QuantLinear":
        """Round-to-nearest quantization of ``linear`` onto a grid (a new module; ``linear``
        is left as it is). ``scheme``, if given, replaces the grid arguments.

        Scales are rounded to ``scale_dtype`` first (and raised to its smallest normal value,
        6.1e-5 for float16, where a group of tiny weights would underflow), and the codes
        computed against the stored scales, so the layer is exactly RTN on the grid it stores.
        """
        if scheme is None:
            scheme = QuantScheme(bits, group_size, symmetric, scale_dtype, clip_ratio)
        w = linear.weight.detach()
        n, k = w.shape
        scheme.check_in_features(k, "QuantLinear.from_linear")
        g = k if scheme.group_size is None else scheme.group_size
        scales, zeros = ops.quant_params(w, scheme.bits, max(g, 1), scheme.symmetric, scheme.clip_ratio)
        # Groups of tiny weights would underflow float16 scales; their smallest normal value
        # keeps those groups' absolute error below tiny * qmax (6.1e-5 * 2**(bits-1) for fp16).
        stored = scales.clamp(min=torch.finfo(scheme.scale_dtype).tiny).to(scheme.scale_dtype)
        if not torch.isfinite(stored).all():
            raise ValueError(
                f"QuantLinear.from_linear: a scale of this weight overflows {scheme.scale_dtype} "
                f"(scales range {scales.min().item():.3g} .. {scales.max().item():.3g}); "
                "use scale_dtype=torch.float32")
        codes = ops.quantize(w, stored.float(), zeros, scheme.bits, max(g, 1))
        return cls.from_codes(codes, stored, zeros, scheme.bits, scheme.group_size, symmetric=scheme.symmetric,
                              bias=None if linear.bias is None else linear.bias.detach())

    @classmethod
    def from_codes(
        cls,
        codes: Tensor,
        scales: Tensor,
        zeros: Tensor,
        bits: int,
        group_size: int | None,
        *,
        symmetric: bool = False,
        bias: Tensor | None = None,
        scale_dtype: torch.dtype | None = None,
    ) -> "QuantLinear":
        """A layer from a grid computed elsewhere (RTN, GPTQ, AWQ...).

        Args:
            codes: uint8 ``[N, K]``, each ``< 2**bits``.
            scales: float ``[N, G]``; stored as ``scale_dtype`` (default: its own dtype).
            zeros: int32 or uint8 ``[N, G]``.
            group_size: columns per group, None for per-channel.
            symmetric: recorded for ``extra_repr`` and checkpoints; the zeros are used as given.
            bias: float ``[N]`` or None.
        """
        n, k = codes.shape
        scale_dtype = scale_dtype or scales.dtype
        layer = cls(k, n, bias=bias is not None, bits=bits, group_size=group_size, symmetric=symmetric,
                    scale_dtype=scale_dtype, device=codes.device,
                    dtype=None if bias is None else bias.dtype)
        g = num_groups(k, layer.group_size)
        if tuple(scales.shape) != (n, g) or tuple(zeros.shape) != (n, g):
            raise ValueError(f"QuantLinear.from_codes: scales and zeros must be [{n}, {g}] for codes "
                             f"{list(codes.shape)} and group_size {layer.group_size}, got "
                             f"{list(scales.shape)} and {list(zeros.shape)}")
        if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) >= 2 ** bits):
            raise ValueError(f"QuantLinear.from_codes: zeros must be in [0, {2 ** bits - 1}] for bits={bits}, "
                             f"got values in [{int(zeros.min())}, {int(zeros.max())}]")
        layer.qweight.copy_(ops.pack_int32(codes.t(), bits))
        layer.scales.copy_(scales.t())
        layer.zeros.copy_(zeros.t())
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    # -- use ---------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        return ops.weight_only_matmul(x, self.qweight, self.scales.t(), self.zeros.t(), self.bits,
                                      self.group_size, self.bias)

    def codes(self) -> Tensor:
        """The integer codes, uint8 ``[N, K]``."""
        return ops.unpack_int32(self.qweight, self.bits, self.in_features).t().contiguous()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the layer computes with, ``dtype`` ``[N, K]``."""
        codes = ops.unpack_int32(self.qweight, self.bits, self.in_features).t()
        return ops.dequantize(codes, self.scales.t(), self.zeros.t().to(torch.int32), self.group_size, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the layer's tensors (packed codes, scales, zero points and bias)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.scales, self.zeros, self.bias) if t is not None)

    def extra_repr(self) -> str:
        group = "per-channel" if self.per_channel else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, {group}, "
                f"symmetric={self.symmetric}, scale_dtype={self.scales.dtype}")
