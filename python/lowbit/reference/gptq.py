"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323): the specification of ``accumulate_hessian``
and ``gptq_solve``, in plain PyTorch.

Notation follows the paper: a layer ``W`` ``[N, K]`` (rows = outputs, columns = inputs)
sees inputs ``X`` ``[n, K]``; the layer-wise objective ``||W X^T - W_hat X^T||^2`` has the
Hessian ``H = 2 X^T X / n`` ``[K, K]``. Columns are quantized one at a time, in order
(act-order: by descending ``diag(H)``); the rounding error of column ``q`` is spread over
the columns not yet quantized through the upper Cholesky factor ``U`` of ``H^-1``
(Algorithm 1):

    err      = (w_q - quant(w_q)) / U[q, q]
    W[:, j] -= err * U[q, j]            for j > q
    loss    += (w_q - quant(w_q))^2 / U[q, q]^2 / 2

Grids (bits, group size including a ragged last group, symmetric or zero-point) are those
of :mod:`lowbit.reference.quant`. A group's scale and zero point are computed when the
solve reaches the group's first column, from the group's columns as they are then (all
updates from earlier columns applied); with ``static_groups`` they are computed up front
from the original weight, in natural column order. Scales are then rounded to
``scale_dtype`` (raised to its smallest normal value first, as ``QuantLinear.from_linear``
stores them), and the codes are computed against the rounded scale, so the returned grid
is exactly the one a layer stores.

Details that the paper leaves open, fixed here and followed by the kernels:
* dead inputs (``H[i, i] == 0``: the input is always zero) get ``H[i, i] = 1`` and
  ``W[:, i] = 0``;
* dampening adds ``damp * mean(diag(H))`` to the diagonal, after the act-order permutation;
* act-order is a stable sort of ``diag(H)`` (after the dead-input fix), descending;
* without static groups, group ``g`` is the processing positions ``[g * gs, (g+1) * gs)``;
  ``g_idx[perm[p]] = p // gs``. With static groups ``g_idx[k] = k // gs``;
* the lazy batch (``block_size``) changes only the order of floating-point operations.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .quant import num_groups

__all__ = ["accumulate_hessian", "gptq_solve", "group_params"]


def accumulate_hessian(hessian: Tensor, x: Tensor, num_seen: int) -> Tensor:
    """``H`` after seeing ``x`` too: ``(num_seen * H + 2 X^T X) / (num_seen + m)``.

    ``hessian``: float ``[K, K]``, the mean over the ``num_seen`` rows seen so far (zeros
    when ``num_seen == 0``); ``x``: float ``[..., K]``, ``m`` rows once flattened. Returns a
    new ``[K, K]`` tensor of ``hessian``'s dtype, accumulated in float64 here.
    """
    k = hessian.shape[0]
    if k == 0:
        return hessian.clone()
    xf = x.reshape(-1, k).double()
    m = xf.shape[0]
    if m == 0:
        return hessian.clone()
    h = hessian.double() * (num_seen / (num_seen + m)) + (xf.t() @ xf) * (2.0 / (num_seen + m))
    return h.to(hessian.dtype)


def group_params(w: Tensor, bits: int, symmetric: bool, clip_ratio: float,
                 scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Scale (rounded through ``scale_dtype``, returned in ``w``'s dtype) and zero point
    (int64) of each row of ``w`` ``[N, g]``, in ``w``'s dtype (the formulas of
    :func:`lowbit.reference.quant.quant_params`)."""
    one = torch.ones((), dtype=w.dtype, device=w.device)
    if symmetric:
        amax = w.abs().amax(dim=1)
        scale = (amax * clip_ratio) / (2 ** (bits - 1) - 1)
        scale = torch.where(scale == 0, one, scale)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        maxq = 2 ** bits - 1
        hi = w.amax(dim=1).clamp(min=0) * clip_ratio
        lo = w.amin(dim=1).clamp(max=0) * clip_ratio
        scale = (hi - lo) / maxq
        scale = torch.where(scale == 0, one, scale)
        zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    stored = scale.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype).to(w.dtype)
    return stored, zero.to(torch.int64)


def gptq_solve(
    w: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int | None = None,
    clip_ratio: float = 1.0,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """GPTQ of one layer, computed in ``w``'s dtype (float64 for the tests' reference).

    Args:
        w: float ``[N, K]``. hessian: float ``[K, K]`` (``2 X^T X / n``).
        group_size: columns per group (``>= K``: per-channel).
        block_size: lazy-batch width (Algorithm 1); None updates all later columns after
            every column (the plain form; same result up to rounding).

    Returns:
        ``codes`` uint8 ``[N, K]`` (original column order), ``scales`` float32 ``[N, G]``,
        ``zeros`` int32 ``[N, G]``, ``g_idx`` int32 ``[K]`` (the group of each input
        column) and ``loss`` (0-d, ``w``'s dtype: the sum of the per-column losses above).

    Raises:
        ValueError: the damped Hessian is not positive definite.
    """
    n, k = w.shape
    dt = w.dtype
    gs = min(group_size, k) if k > 0 else group_size
    g_count = num_groups(k, gs)
    maxq = 2 ** bits - 1
    W = w.clone()
    H = hessian.to(dt).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if static_groups:
        st_scale = torch.empty(n, g_count, dtype=dt)
        st_zero = torch.empty(n, g_count, dtype=torch.int64)
        for g in range(g_count):
            st_scale[:, g], st_zero[:, g] = group_params(W[:, g * gs:(g + 1) * gs], bits, symmetric,
                                                        clip_ratio, scale_dtype)

    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = torch.arange(k)
    H.diagonal().add_(damp * torch.diagonal(H).mean() if k > 0 else 0.0)
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError("gptq_solve: the damped Hessian is not positive definite")
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.ones(n, g_count, dtype=torch.float32)
    zeros = torch.zeros(n, g_count, dtype=torch.int32)
    g_idx = torch.zeros(k, dtype=torch.int32)
    loss = torch.zeros((), dtype=dt)
    B = block_size or k
    if not static_groups and gs < k:
        B = gs * max(1, B // gs)          # whole groups per block: params see every update
    scale = zero = None
    for b0 in range(0, k, max(B, 1)):
        b1 = min(b0 + B, k)
        err = torch.zeros(n, b1 - b0, dtype=dt)
        for q in range(b0, b1):
            if static_groups:
                g = int(perm[q]) // gs
                scale, zero = st_scale[:, g], st_zero[:, g]
            else:
                g = q // gs
                if q % gs == 0:
                    scale, zero = group_params(W[:, q:q + gs], bits, symmetric, clip_ratio, scale_dtype)
                    scales[:, g] = scale.float()
                    zeros[:, g] = zero.int()
            g_idx[perm[q]] = g
            col = W[:, q]
            c = torch.clamp(torch.round(col / scale) + zero.to(dt), 0, maxq)
            w_hat = (c - zero.to(dt)) * scale
            codes[:, perm[q]] = c.to(torch.uint8)
            d = U[q, q]
            e = (col - w_hat) / d
            loss += ((col - w_hat) ** 2).sum() / (d * d) / 2
            err[:, q - b0] = e
            if block_size is None:
                W[:, q + 1:] -= e.unsqueeze(1) * U[q, q + 1:].unsqueeze(0)
            else:
                W[:, q + 1:b1] -= e.unsqueeze(1) * U[q, q + 1:b1].unsqueeze(0)
        if block_size is not None:
            W[:, b1:] -= err @ U[b0:b1, b1:]
    if static_groups:
        scales = st_scale.float()
        zeros = st_zero.int()
    return codes, scales, zeros, g_idx, loss


def layer_loss(w: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)``: the output error ``||(W - W_hat) X^T||^2 * 2/n``."""
    d = (w - w_hat).double()
    return float(torch.einsum("nk,kl,nl->", d, hessian.double(), d))

