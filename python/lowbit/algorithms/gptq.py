"""GPTQ for one layer (Frantar et al., 2022, arXiv:2210.17323) on lowbit's grids.

The math is one op, :func:`lowbit.ops.gptq_solve` (specification:
:mod:`lowbit.reference.gptq`); this module adds the options users set, the dampening
retry, and the conversion of the result to a :class:`lowbit.nn.QuantLinear`. The
block-by-block pipeline that collects each layer's Hessian is
:mod:`lowbit.calibration`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from ..config import QuantScheme

__all__ = ["GPTQ", "GPTQResult", "gptq_quantize_weight"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQ:
    """GPTQ options: pass ``method=GPTQ(...)`` to :func:`lowbit.quantize` (``"gptq"`` is
    ``GPTQ()``).

    Attributes:
        act_order: quantize columns in descending ``diag(H)`` order (the paper's
            "act-order" / GPTQModel's ``desc_act``). Without ``static_groups`` the groups
            follow that order too, and the layer stores a column permutation (``perm``;
            ``g_idx`` in checkpoints) that its forward applies to ``x``.
        static_groups: compute every group's scale from the original weight before the
            solve, in natural column order (no permutation at inference even with
            act-order).
        damp: fraction of the mean Hessian diagonal added to the diagonal (1% in the paper).
        max_damp_retries: when the damped Hessian is not positive definite, multiply
            ``damp`` by 10 (0 becomes 0.01) and retry this many times (logged) before failing.
        block_size: columns per lazy batch (128 in the paper); widened to whole groups.
        true_sequential: inside a transformer block, quantize the layers in the order the
            block calls them (attention inputs, attention output, MLP...), recomputing the
            later layers' inputs with the earlier layers already quantized.
        hessian_dtype: float32 (default) or float64 accumulation and solve.
    """

    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    max_damp_retries: int = 3
    block_size: int = 128
    true_sequential: bool = True
    hessian_dtype: torch.dtype = torch.float32

    name = "gptq"

    def __post_init__(self):
        if not (self.damp >= 0 and self.damp < float("inf")):
            raise ValueError(f"GPTQ: damp must be a finite fraction >= 0 of the mean diagonal, got {self.damp}")
        if self.block_size <= 0:
            raise ValueError(f"GPTQ: block_size must be positive, got {self.block_size}")
        if self.max_damp_retries < 0:
            raise ValueError(f"GPTQ: max_damp_retries must be >= 0, got {self.max_damp_retries}")
        if self.hessian_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"GPTQ: hessian_dtype must be torch.float32 or torch.float64, got {self.hessian_dtype}")


@dataclass
class GPTQResult:
    """One layer's GPTQ grid.

    Attributes:
        codes: uint8 ``[N, K]``, original column order. scales: float32 ``[N, G]``
            (already representable in the scheme's ``scale_dtype``). zeros: int32 ``[N, G]``.
        g_idx: int32 ``[K]``, each input column's group.
        perm: int64 ``[K]`` with groups contiguous (``codes[:, perm]`` groups by
            ``j // group_size``), or None when ``g_idx`` is already ``arange(K) // gs``.
        loss: GPTQ's objective, ``sum (w - w_hat)^2 / U[q, q]^2 / 2``.
        damp: the dampening that succeeded.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    perm: Tensor | None
    loss: float
    damp: float

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W_hat`` ``[N, K]`` in the original column order, as ``dtype``."""
        g = self.g_idx.long()
        s = self.scales.index_select(1, g)
        z = self.zeros.index_select(1, g).float()
        return ((self.codes.float() - z) * s).to(dtype)


def gptq_quantize_weight(w: Tensor, hessian: Tensor, scheme: QuantScheme, options: GPTQ | None = None,
                         name: str = "layer") -> GPTQResult:
    """GPTQ of weight ``w`` (float ``[N, K]``) given its Hessian ``2 X^T X / n``
    (float32/float64 ``[K, K]``, same device), with the dampening retry.

    Raises:
        ValueError: naming ``name``, for NaN/Inf in the Hessian (from NaN activations) or a
            Hessian still not positive definite after ``options.max_damp_retries`` retries.
    """
    o = options or GPTQ()
    k = w.shape[1]
    gs = scheme.group_size or k
    damp = o.damp
    for attempt in range(o.max_damp_retries + 1):
        try:
            codes, scales, zeros, g_idx, loss = ops.gptq_solve(
                w, hessian, scheme.bits, gs, scheme.symmetric, damp, o.act_order, o.static_groups,
                o.block_size, scheme.clip_ratio, scheme.scale_dtype)
            break
        except ValueError as e:
            msg = str(e)
            if "not positive definite" not in msg:
                raise ValueError(f"lowbit GPTQ: layer '{name}': {msg}") from e
            if attempt == o.max_damp_retries:
                raise ValueError(
                    f"lowbit GPTQ: layer '{name}': the Hessian is not positive definite even with damp = "
                    f"{damp:g} (after {o.max_damp_retries} retries from {o.damp:g}); calibrate on more "
                    "or more varied samples, or pass GPTQ(damp=...) larger") from e
            nxt = damp * 10 if damp > 0 else 0.01
            log.warning("GPTQ %s: damped Hessian not positive definite with damp=%g; retrying with %g",
                        name, damp, nxt)
            damp = nxt
    if not torch.isfinite(scales).all():
        raise ValueError(f"lowbit GPTQ: layer '{name}': a scale overflows {scheme.scale_dtype}; "
                         "use scale_dtype=torch.float32 for this layer")
    perm = None
    if o.act_order and not o.static_groups and scheme.group_size is not None and gs < k:
        perm = torch.argsort(g_idx, stable=True)
    return GPTQResult(codes, scales, zeros, g_idx, perm, float(loss), damp)
