"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression
and Acceleration", arXiv:2306.00978): the specification of ``awq_scale_search`` and
``awq_clip_search``, in plain PyTorch.

Both searches measure a candidate grid by the output error it causes on the calibration
inputs ``X`` ``[n, K]`` of the layer, through their Gram matrix ``gram = X^T X / n``
``[K, K]``: for a weight ``W`` ``[N, K]`` and its rounded ``W_hat``, with ``D = W_hat - W``,

    |X W_hat^T - X W^T|^2 / n = sum_n D[n] gram D[n]^T = tr(D gram D^T),

so a candidate costs one product with ``[K, K]`` instead of a forward over every token.

Rounding a candidate (:func:`fake_quantize`) is exactly what
:meth:`lowbit.nn.QuantLinear.from_linear` stores: :func:`~lowbit.reference.quant.quant_params`
(float32), the scales raised to ``scale_dtype``'s smallest normal value and rounded to
it, the codes computed against those stored scales, dequantized in float32.

Scale search (sec. 3.2). For ``i = 0 .. n_grid-1``, ``alpha = i / n_grid``:

    s     = clamp(act_mean, min=1e-4) ** alpha                 (float32, torch.pow)
    s     = s / sqrt(max(s) * min(s))                          (float32, 0-d tensors)
    W_hat = fake_quantize(W * s) / s                           (float32, column-wise)
    loss  = tr((W_hat - W) gram (W_hat - W)^T)                 (float64)

A candidate is rejected (``loss = inf``) when ``s``, ``1 / s`` or ``W * s`` is not
finite, when ``1 / s`` or ``|W * s|`` exceeds ``max_value`` (the folded weights and
the divided activations must fit the model's dtype), or when a stored scale overflows
``scale_dtype``. A loss that comes out NaN counts as ``inf``. The result is the losses
and the ``s`` of the first smallest loss (the smallest alpha among equal losses; all
``inf`` gives ``alpha = 0``, ``s = 1``). The elementwise steps are torch ops on the
input's device, so the kernels (which run the same ops for ``s``) match them bit for bit
on that device; only the GEMM's summation order differs.

Clip search (the authors' ``auto_clip``). For ratios ``r = 1 - i / n_grid``,
``i = 0 .. max(1, int(max_shrink * n_grid)) - 1`` (1.0, 0.95, ..., 0.55 for the defaults),
``W_hat = fake_quantize(W, clip_ratio=r)``; per row ``n`` and group ``g`` (columns
``c_g``, the last group ragged), with ``d = W_hat[n, c_g] - W[n, c_g]`` (float32):

    err[n, g] = d gram[c_g, c_g] d^T                          (float64)

Each (row, group) keeps the ratio of the smallest error; among equal errors the first,
i.e. the largest ratio. A stored scale that overflows ``scale_dtype`` makes that
(row, group, ratio)'s error ``inf`` (NaN counts as ``inf`` too); if every ratio is
``inf`` the group keeps ``r = 1``'s grid. Returned: the chosen stored scales (float32),
zero points (int32) and ratios (float32, ``float32(r)``), each ``[N, G]``.

Empty shapes: ``N == 0`` gives zero losses (a valid candidate rounds nothing), ``K == 0``
zero losses and an empty ``s``; the clip search returns ``[N, G]`` outputs with a zero
dimension.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .quant import dequantize, num_groups, quant_params, quantize

__all__ = ["fake_quantize", "scale_candidates", "candidate_is_valid", "awq_scale_search",
           "clip_ratios", "group_errors", "awq_clip_search"]


def _effective_group(k: int, group_size: int) -> int:
    # group_size >= K is one group per row; min() keeps the reference from padding rows
    # to a huge group_size (the grid and every result are the same).
    return min(group_size, k) if k > 0 else group_size


def fake_quantize(
    w: Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    clip_ratio: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest ``w`` on the grid :meth:`lowbit.nn.QuantLinear.from_linear` stores.

    Args:
        w: float ``[N, K]`` (used as float32).
        bits, group_size, symmetric, clip_ratio: the grid, as in
            :func:`lowbit.reference.quant.quant_params`.
        scale_dtype: float32/float16/bfloat16, the dtype the layer stores scales in.

    Returns:
        ``w_hat`` float32 ``[N, K]`` (dequantized), the stored ``scales`` float32 ``[N, G]``
        (values of ``scale_dtype``) and ``zeros`` int32 ``[N, G]``. A group whose scale
        overflows ``scale_dtype`` has scale ``inf`` and ``w_hat`` NaN.
    """
    k = w.shape[1]
    gs = _effective_group(k, group_size)
    wf = w.float()
    scales, zeros = quant_params(wf, bits, gs, symmetric, clip_ratio)
    stored = scales.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype).float()
    codes = quantize(wf, stored, zeros, bits, gs)
    return dequantize(codes, stored, zeros, gs, torch.float32), stored, zeros


def scale_candidates(act_mean: Tensor, n_grid: int) -> Tensor:
    """The candidates' ``s``: float32 ``[n_grid, K]``, row ``i`` for ``alpha = i / n_grid``."""
    x = act_mean.float().clamp(min=1e-4)
    out = torch.empty(n_grid, x.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0] == 0:
        return out
    for i in range(n_grid):
        s = x.pow(i / n_grid)
        out[i] = s / (s.max() * s.min()).sqrt()
    return out


def candidate_is_valid(w: Tensor, s: Tensor, max_value: float) -> bool:
    """Whether ``s`` float32 ``[K]`` may be folded into ``w`` float32 ``[N, K]``: ``s``,
    ``1 / s`` and ``w * s`` finite, ``1 / s <= max_value`` and ``|w * s| <= max_value``."""
    inv = s.reciprocal()
    ws = w * s
    return bool(torch.isfinite(s).all() and torch.isfinite(inv).all() and (inv <= max_value).all()
                and torch.isfinite(ws).all() and (ws.abs() <= max_value).all())


def awq_scale_search(
    w: Tensor,
    gram: Tensor,
    act_mean: Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    n_grid: int = 20,
    scale_dtype: torch.dtype = torch.float16,
    max_value: float = math.inf,
) -> tuple[Tensor, Tensor]:
    """AWQ's scale search (module docstring).

    Args:
        w: float32 ``[N, K]``, the weights of the linears that read one input, stacked.
        gram: float32 ``[K, K]``, ``X^T X / n`` of that input.
        act_mean: float32 ``[K]``, mean ``|x|`` per input channel (>= 0).
        bits, group_size, symmetric, scale_dtype: the grid. n_grid: alphas (>= 1).
        max_value: largest allowed ``|w * s|`` and ``1 / s``.

    Returns:
        ``losses`` float64 ``[n_grid]`` (``inf`` for rejected candidates) and the best
        ``s`` float32 ``[K]``, on ``w``'s device.
    """
    n, k = w.shape
    wf = w.float()
    g64 = gram.double()
    cands = scale_candidates(act_mean, n_grid)
    losses = torch.full((n_grid,), math.inf, dtype=torch.float64)
    for i in range(n_grid):
        s = cands[i]
        if not candidate_is_valid(wf, s, max_value):
            continue
        w_hat, _, _ = fake_quantize(wf * s, bits, group_size, symmetric, scale_dtype)
        d = (w_hat / s - wf).double()
        loss = float(((d @ g64) * d).sum())
        losses[i] = math.inf if math.isnan(loss) else loss
    best = min(range(n_grid), key=lambda i: (float(losses[i]), i))
    return losses.to(w.device), cands[best].clone()


def clip_ratios(n_grid: int, max_shrink: float) -> list[float]:
    """The clip ratios tried, largest first: ``1 - i / n_grid`` (Python floats; the grid
    uses them rounded to float32)."""
    return [1 - i / n_grid for i in range(max(1, int(max_shrink * n_grid)))]


def group_errors(d: Tensor, gram: Tensor, group_size: int) -> Tensor:
    """``err[n, g] = d[n, c_g] gram[c_g, c_g] d[n, c_g]^T`` in float64, ``d`` ``[N, K]``."""
    n, k = d.shape
    gs = _effective_group(k, group_size)
    g = num_groups(k, gs)
    blocks = torch.zeros(g, gs, gs, dtype=torch.float64, device=d.device)
    for j in range(g):
        k0, k1 = j * gs, min(k, (j + 1) * gs)
        blocks[j, : k1 - k0, : k1 - k0] = gram[k0:k1, k0:k1].double()
    dp = torch.nn.functional.pad(d.double(), (0, g * gs - k)).view(n, g, gs)
    return torch.einsum("ngi,gij,ngj->ng", dp, blocks, dp)


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
    """AWQ's clip search (module docstring).

    Args:
        w: float32 ``[N, K]``. gram: float32 ``[K, K]`` (only its diagonal blocks are read).
        bits, group_size, symmetric, scale_dtype: the grid. n_grid: ratio step
            ``1 / n_grid``. max_shrink: in [0, 1), the largest shrink.

    Returns:
        ``scales`` float32 ``[N, G]`` (stored values), ``zeros`` int32 ``[N, G]`` and the
        chosen ratios float32 ``[N, G]``.
    """
    n, k = w.shape
    wf = w.float()
    g = num_groups(k, group_size)
    best = None
    for r in clip_ratios(n_grid, max_shrink):
        w_hat, scales, zeros = fake_quantize(wf, bits, group_size, symmetric, scale_dtype, r)
        err = group_errors(w_hat - wf, gram, group_size)
        err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
        ratio = torch.full((n, g), r, dtype=torch.float32, device=w.device)
        if best is None:
            best = [err, scales, zeros, ratio]
            continue
        better = err < best[0]   # strict: equal errors keep the larger ratio
        best = [torch.where(better, new, old) for new, old in zip((err, scales, zeros, ratio), best)]
    _, scales, zeros, ratio = best
    return scales, zeros, ratio
