"""Quantized layers: :class:`QuantLinear`, the weight-only replacement of ``nn.Linear``.

Layers that can be quantized ("linear-like", :func:`is_linear_like`): ``nn.Linear`` (and
its subclasses) and transformers' GPT-2 ``Conv1D`` (``transformers.pytorch_utils.Conv1D``:
weight ``[in, out]`` = ``[nx, nf]``, ``forward`` is ``x @ W + b``). ``Conv1D`` is recognised
by its class name and shape, so lowbit never imports transformers to find it;
:func:`linear_weight` gives either kind's weight in the ``nn.Linear`` layout ``[out, in]``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..config import QuantScheme
from ..reference.packing import packed_rows
from ..reference.quant import num_groups

__all__ = ["QuantLinear", "is_linear_like", "linear_weight", "pack_mma"]


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a class named ``Conv1D`` (or a subclass of one) with
    an int ``nf`` and a 2-D ``weight`` ``[nx, nf]``."""
    if not any(c.__name__ == "Conv1D" for c in type(module).__mro__):
        return False
    w = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    if not isinstance(w, Tensor) or w.dim() != 2 or not isinstance(nf, int) or w.shape[1] != nf:
        return False
    return getattr(module, "nx", w.shape[0]) == w.shape[0]


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` computes ``x @ W^T + b`` with a 2-D weight lowbit can quantize:
    an ``nn.Linear`` (or subclass) or a transformers GPT-2 ``Conv1D`` (not
    :class:`QuantLinear`, which is already quantized)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_weight(module: nn.Module) -> Tensor:
    """The weight of a linear-like ``module`` in the ``nn.Linear`` layout, ``[out, in]``.

    A view (no copy): ``module.weight`` for ``nn.Linear``, ``module.weight.t()`` for a
    GPT-2 ``Conv1D`` (whose weight is stored ``[in, out]``). Raises TypeError for any
    other module.
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if _is_conv1d(module):
        return module.weight.t()
    raise TypeError(f"linear_weight: {type(module).__name__} is neither an nn.Linear nor a transformers "
                    "GPT-2 Conv1D (class Conv1D with nf and a [nx, nf] weight)")


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
        perm: int64 ``[K]`` or None (default). Set for act-order (GPTQ ``desc_act``) layers,
            whose codes are stored with their input columns permuted: stored column ``j``
            is input feature ``perm[j]``, and groups run along the stored order. Only in the
            ``state_dict`` when set; a layer built without it takes one from a state dict
            that has it.

    After :meth:`pack_mma_` (or :func:`pack_mma` on a model) the layer holds its weight in
    the tensor-core layout of :func:`lowbit.ops.pack_mma` instead (``layout == "mma"``:
    ``qweight`` int32 ``[K / 16, N * bits / 2]``, ``scales`` / ``zeros`` ``[G, N]`` with
    permuted columns) and ``forward`` calls :func:`lowbit.ops.mma_matmul`. Its
    ``state_dict`` is still written (and read) in the GPTQ layout above.

    ``forward`` takes ``x`` float32/float16/bfloat16 ``[..., K]`` and returns ``[..., N]`` in
    ``x.dtype`` through :func:`lowbit.ops.weight_only_matmul` (packed reads for decode,
    dequantize + BLAS/cuBLAS for large batches; fp32 accumulation); with ``perm`` set it
    first gathers ``x.index_select(-1, perm)`` (a copy of ``x``). :meth:`codes`,
    :meth:`dequantize` and :attr:`g_idx` always answer in the original input order.
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
        self.register_buffer("perm", None)
        self.layout = "gptq"

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
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

        ``linear`` is an ``nn.Linear`` or a transformers GPT-2 ``Conv1D`` (its ``[in, out]``
        weight is transposed; the layer computes the same ``x @ W + b``); see
        :func:`is_linear_like`.

        Scales are rounded to ``scale_dtype`` first (and raised to its smallest normal value,
        6.1e-5 for float16, where a group of tiny weights would underflow), and the codes
        computed against the stored scales, so the layer is exactly RTN on the grid it stores.
        """
        if scheme is None:
            scheme = QuantScheme(bits, group_size, symmetric, scale_dtype, clip_ratio)
        if not is_linear_like(linear):
            raise TypeError(f"QuantLinear.from_linear: expected an nn.Linear or a transformers GPT-2 "
                            f"Conv1D, got {type(linear).__name__}")
        w = linear_weight(linear).detach()
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
        perm: Tensor | None = None,
    ) -> "QuantLinear":
        """A layer from a grid computed elsewhere (RTN, GPTQ, AWQ...).

        Args:
            codes: uint8 ``[N, K]``, each ``< 2**bits``; with ``perm``, in the permuted
                column order (column ``j`` is input feature ``perm[j]``), and ``scales`` /
                ``zeros`` group the permuted columns (group ``j // group_size``).
            scales: float ``[N, G]``; stored as ``scale_dtype`` (default: its own dtype).
            zeros: int32 or uint8 ``[N, G]``.
            group_size: columns per group, None for per-channel.
            symmetric: recorded for ``extra_repr`` and checkpoints; the zeros are used as given.
            bias: float ``[N]`` or None.
            perm: integer ``[K]``, a permutation of ``0..K-1`` (act-order GPTQ), or None;
                stored as int64 on the codes' device.
        """
        n, k = codes.shape
        if perm is not None:
            if perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool:
                raise TypeError(f"QuantLinear.from_codes: perm must be an integer tensor, got {perm.dtype}")
            perm = perm.to(device=codes.device, dtype=torch.int64)
            if tuple(perm.shape) != (k,):
                raise ValueError(f"QuantLinear.from_codes: perm must be [{k}] for codes {list(codes.shape)}, "
                                 f"got {list(perm.shape)}")
            if not torch.equal(perm.sort().values, torch.arange(k, device=perm.device)):
                raise ValueError(f"QuantLinear.from_codes: perm must be a permutation of 0..{k - 1} (each input "
                                 "feature once); it has repeated or out-of-range entries")
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
        layer.perm = perm
        return layer

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # An act-order checkpoint loads into a layer built without perm: make room for it.
        if self.perm is None and prefix + "perm" in state_dict:
            self.perm = torch.empty(self.in_features, dtype=torch.int64, device=self.qweight.device)
        # Checkpoints are in the GPTQ layout: load into it, then re-lay the weight again.
        repack = self.layout == "mma"
        if repack:
            self._unpack_mma()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if repack:
            self.pack_mma_()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == "mma":
            qweight, scales, zeros = self._gptq_tensors()
            destination[prefix + "qweight"] = qweight
            destination[prefix + "scales"] = scales
            destination[prefix + "zeros"] = zeros

    # -- the tensor-core layout ------------------------------------------------------------

    def can_pack_mma(self) -> bool:
        """Whether :meth:`pack_mma_` applies: 4- or 8-bit codes, ``in_features`` a multiple
        of 16, ``out_features`` of 64, and groups of a multiple of 16 (or per-channel)."""
        k, n = self.in_features, self.out_features
        return (self.bits in (4, 8) and k % 16 == 0 and n % 64 == 0 and k > 0
                and (self.group_size >= k or self.group_size % 16 == 0))

    def pack_mma_(self, dtype: torch.dtype | None = None) -> bool:
        """Re-lay the weight, in place and once, into the tensor-core layout of
        :func:`lowbit.ops.pack_mma`, so ``forward`` runs :func:`lowbit.ops.mma_matmul`
        (the fast path on CUDA GPUs from sm_80 on; on CPU it is correct but slower than the
        GPTQ layout's kernel). Memory stays the same size.

        Args:
            dtype: store the scales in this dtype (the activations' dtype, e.g.
                ``torch.bfloat16``), so no call converts them; ``None`` keeps
                ``scales.dtype``. The kernel rounds scales to the activations' dtype anyway,
                so for activations of that dtype results do not change.

        Returns:
            True if the layer now has the mma layout (also when it already had it), False
            if its shape or bit width does not fit the layout (see :meth:`can_pack_mma`);
            the layer is then left as it is.
        """
        if self.layout == "mma":
            if dtype is not None and self.scales.dtype != dtype:
                self.scales = self.scales.to(dtype)
            return True
        if not self.can_pack_mma():
            return False
        scales = self.scales if dtype is None else self.scales.to(dtype)
        self.qweight, self.scales, self.zeros = ops.pack_mma(self.qweight, scales, self.zeros, self.bits,
                                                             self.group_size)
        self.layout = "mma"
        return True

    def _gptq_tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(qweight, scales, zeros)`` in the GPTQ layout, whatever the layer holds."""
        if self.layout == "gptq":
            return self.qweight, self.scales, self.zeros
        from ..reference.mma import unpack_mma
        return unpack_mma(self.qweight, self.scales, self.zeros, self.bits)

    def _unpack_mma(self) -> None:
        if self.layout == "mma":
            self.qweight, self.scales, self.zeros = self._gptq_tensors()
            self.layout = "gptq"

    # -- use ---------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.layout == "mma":
            return ops.mma_matmul(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                  self.bias)
        return ops.weight_only_matmul(x, self.qweight, self.scales.t(), self.zeros.t(), self.bits,
                                      self.group_size, self.bias)

    def _unpermute(self, t: Tensor) -> Tensor:
        """Columns of ``t`` ``[N, K]`` from the stored (permuted) order to the input order."""
        if self.perm is None:
            return t
        return torch.empty_like(t).index_copy_(1, self.perm, t)

    def codes(self) -> Tensor:
        """The integer codes, uint8 ``[N, K]``, in the input order (column ``k`` multiplies
        ``x[..., k]``, whether or not the layer has a ``perm``)."""
        qweight = self._gptq_tensors()[0]
        codes = ops.unpack_int32(qweight, self.bits, self.in_features).t().contiguous()
        return self._unpermute(codes)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight the layer computes with, ``dtype`` ``[N, K]``, in the input order
        (``forward(x) == x @ dequantize().T + bias`` up to float32 rounding)."""
        qweight, scales, zeros = self._gptq_tensors()
        codes = ops.unpack_int32(qweight, self.bits, self.in_features).t()
        w = ops.dequantize(codes, scales.t(), zeros.t().to(torch.int32), self.group_size, dtype)
        return self._unpermute(w)

    @property
    def g_idx(self) -> Tensor:
        """int32 ``[K]``: the group (row of ``scales`` / ``zeros``) of each input feature, in
        the input order, as in GPTQ checkpoints: ``arange(K) // group_size`` without
        ``perm``; with it, input feature ``perm[j]`` is in group ``j // group_size``."""
        g = torch.div(torch.arange(self.in_features, device=self.qweight.device), self.group_size,
                      rounding_mode="floor").to(torch.int32)
        if self.perm is None:
            return g
        return torch.empty_like(g).index_copy_(0, self.perm, g)

    @property
    def nbytes(self) -> int:
        """Bytes of the layer's tensors (packed codes, scales, zero points, bias and perm)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.scales, self.zeros, self.bias, self.perm) if t is not None)

    def extra_repr(self) -> str:
        group = "per-channel" if self.per_channel else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, {group}, "
                f"symmetric={self.symmetric}, scale_dtype={self.scales.dtype}"
                + (", act_order=True" if self.perm is not None else "")
                + (", layout=mma" if self.layout == "mma" else ""))


def pack_mma(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Re-lay every :class:`QuantLinear` of ``model`` that fits into the tensor-core layout
    (:meth:`QuantLinear.pack_mma_`), in place; call it once after loading, with the model
    on its GPU. Layers that do not fit (3-bit codes, widths not a multiple of 16 / 64) keep
    the GPTQ layout and its kernels.

    Args:
        model: any module; its QuantLinear submodules are re-laid.
        dtype: the activations' dtype, to store the scales in (see ``pack_mma_``).

    Returns:
        The number of layers now in the mma layout.
    """
    return sum(int(m.pack_mma_(dtype)) for m in model.modules() if isinstance(m, QuantLinear))


from .w8a8 import FP8Linear, W8A8Linear, make_w8a8  # noqa: E402  (they use QuantScheme only)

__all__ += ["W8A8Linear", "FP8Linear", "make_w8a8"]
