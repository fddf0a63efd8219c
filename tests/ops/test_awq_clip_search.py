"""lowbit.ops.awq_clip_search against reference.awq.awq_clip_search.

Every candidate grid (stored scale, zero, rounded weights) is computed with the
reference's arithmetic, so it is equal bit for bit; the errors ``d G_gg d^T`` differ in
summation order only. Groups of up to 128 columns are summed in float64 by the kernels:
relative to ``sum(|d| |G_gg| |d|)`` the difference is below ``gs * 2**-52`` (each float64
sum of ``gs`` terms, twice). Longer groups go through a float32 GEMM: ``gs * 2**-24``. Where
the reference's best and the kernel's pick are further apart than those bounds, the pick
must be the reference's (scales, zeros and ratio bit for bit); elsewhere the pick's grid
must still be the reference's grid at that ratio, and its error within the bounds of the best.
"""
import math

import pytest
import torch
from torch.library import opcheck

from lowbit import ops
from lowbit.reference import awq as ra
from _helpers import misaligned, random_weight, raises

U32, U64 = 2.0 ** -24, 2.0 ** -52


def _gram(k, device):
    """X^T X / m of activations with channel scales spread over e^(+-2) and a mean offset."""
    m = max(2 * k, 16)
    x = (torch.randn(m, k, dtype=torch.float64) + 0.3 * torch.randn(k, dtype=torch.float64)) * torch.exp(
        torch.randn(k, dtype=torch.float64))
    return (x.t() @ x / m).float().to(device)


def _candidates(w, gram, bits, gs, sym, n_grid, max_shrink, scale_dtype):
    """Per ratio, from the reference: errors [N, G] (NaN as inf), the kernel's tolerance
    [N, G], stored scales and zeros."""
    k = w.shape[1]
    gsz = min(gs, k) if k else gs
    unit = U64 if gsz <= 128 else U32
    errs, tols, scales, zeros = [], [], [], []
    for r in ra.clip_ratios(n_grid, max_shrink):
        w_hat, sc, z = ra.fake_quantize(w, bits, gs, sym, scale_dtype, r)
        d = w_hat - w
        e = ra.group_errors(d, gram, gs)
        errs.append(torch.where(torch.isnan(e), torch.full_like(e, math.inf), e))
        tols.append(gsz * unit * ra.group_errors(d.abs(), gram.abs(), gs).nan_to_num(0.0) + 1e-300)
        scales.append(sc)
        zeros.append(z)
    return torch.stack(errs), torch.stack(tols), torch.stack(scales), torch.stack(zeros)


def _index_of(ratios, table):
    hit = ratios[..., None] == table
    assert hit.any(-1).all(), "a returned ratio is not one of the ratios tried"
    return hit.int().argmax(-1)


def _check(w, gram, bits, gs, sym, n_grid=20, max_shrink=0.5, scale_dtype=torch.float16):
    scales, zeros, ratios = ops.awq_clip_search(w, gram, bits, gs, sym, n_grid, max_shrink, scale_dtype)
    rs, rz, rr = ra.awq_clip_search(w, gram, bits, gs, sym, n_grid, max_shrink, scale_dtype)
    n, k = w.shape
    g = -(-k // gs)
    for t, dt in ((scales, torch.float32), (zeros, torch.int32), (ratios, torch.float32)):
        assert t.dtype == dt and t.shape == (n, g) and t.device == w.device
    if n * g == 0:
        return scales, zeros, ratios
    errs, tols, cand_s, cand_z = _candidates(w, gram, bits, gs, sym, n_grid, max_shrink, scale_dtype)
    table = torch.tensor(ra.clip_ratios(n_grid, max_shrink), dtype=torch.float32, device=w.device)
    pick, best = _index_of(ratios, table), _index_of(rr, table)
    at = lambda t, i: t.gather(0, i[None])[0]   # noqa: E731
    same = pick == best
    assert torch.equal(scales[same], rs[same]) and torch.equal(zeros[same], rz[same])
    # A different pick: the grid is the reference's at that ratio, the two errors within
    # their tolerances (a near-tie).
    assert torch.equal(scales, at(cand_s, pick)) and torch.equal(zeros, at(cand_z, pick))
    gap = (at(errs, pick) - at(errs, best)).abs()
    assert (gap[~same] <= (at(tols, pick) + at(tols, best))[~same]).all()
    # Never worse than plain RTN (r = 1), within the tolerances.
    assert (at(errs, pick) <= errs[0] + at(tols, pick) + tols[0]).all()
    return scales, zeros, ratios


@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (33, 200)])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("gs", [1, 7, 32, 128, None])
@pytest.mark.parametrize("sym", [True, False])
def test_matches_reference(device, shape, bits, gs, sym):
    n, k = shape
    _check(random_weight(n, k, device=device), _gram(k, device), bits, gs or k, sym)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gs", [64, 150, 200, 300, 10**9])
def test_gemm_path_and_scale_dtypes(device, scale_dtype, gs):
    # Groups over 128 columns take the GEMM path: 2 groups (150), ragged (200 + 100),
    # per-channel (300, and a huge group_size).
    _check(random_weight(9, 300, device=device), _gram(300, device), 4, gs, False, scale_dtype=scale_dtype)


def test_long_groups(device):
    # Groups over 1024 columns: the CUDA difference kernel takes a block per group.
    _check(random_weight(6, 1500, device=device), _gram(1500, device), 3, 1500, True, n_grid=10)


@pytest.mark.parametrize("n_grid,max_shrink,count", [(20, 0.5, 10), (1, 0.0, 1), (10, 0.95, 9), (3, 0.5, 1),
                                                     (7, 0.9, 6)])
def test_ratio_grid(device, n_grid, max_shrink, count):
    w, gram = random_weight(8, 64, device=device), _gram(64, device)
    assert len(ra.clip_ratios(n_grid, max_shrink)) == count
    _, _, ratios = _check(w, gram, 4, 16, True, n_grid, max_shrink)
    assert ratios.min() >= 1 - (count - 1) / n_grid - 1e-6


def test_no_shrink_is_rtn(device):
    w, gram = random_weight(12, 80, device=device), _gram(80, device)
    scales, zeros, ratios = ops.awq_clip_search(w, gram, 4, 32, False, 20, 0.0, torch.float16)
    _, rs, rz = ra.fake_quantize(w, 4, 32, False, torch.float16)
    assert torch.equal(scales, rs) and torch.equal(zeros, rz) and (ratios == 1).all()
    # and the RTN codes of the layer: quantize() with the returned grid
    assert torch.equal(ops.quantize(w, scales, zeros, 4, 32), ops.quantize(w, rs, rz, 4, 32))


def test_scale_overflow_takes_a_smaller_ratio(device):
    # Row 0's absmax 6e5: its 4-bit float16 scale (absmax * r / 7) overflows for r >= 0.77
    # and fits below, so that row must pick a ratio < 0.77; row 1 holds 1e6 everywhere:
    # every ratio overflows (scale inf), and it keeps r = 1's grid.
    w, gram = random_weight(3, 16, device=device), _gram(16, device)
    w[0] = w[0] / w[0].abs().max() * 6e5
    w[1] = 1e6
    scales, _, ratios = _check(w, gram, 4, 16, True)
    assert float(ratios[0, 0]) < 0.77 and math.isfinite(float(scales[0, 0]))
    assert float(ratios[1, 0]) == 1.0 and math.isinf(float(scales[1, 0]))


@pytest.mark.parametrize("shape", [(0, 16), (5, 0), (0, 0)])
def test_empty(device, shape):
    n, k = shape
    out = _check(torch.zeros(n, k, device=device), torch.zeros(k, k, device=device), 4, 8, True)
    assert [t.shape for t in out] == [(n, -(-k // 8))] * 3


def test_zero_rows_and_groups(device):
    w, gram = random_weight(6, 40, device=device), _gram(40, device)
    w[2] = 0
    w[:, 8:16] = 0
    scales, _, ratios = _check(w, gram, 4, 8, False)
    assert (scales[2] == 1).all() and (ratios[2] == 1).all()   # scale 1, all errors 0: the first ratio


def test_noncontiguous_and_misaligned(device):
    w, gram = random_weight(10, 72, device=device), _gram(72, device)
    _check(w.t().contiguous().t(), gram.t().contiguous().t(), 4, 24, True)
    _check(misaligned(w), misaligned(gram), 4, 24, False)
    _check(misaligned(w), misaligned(gram), 4, 72, False, scale_dtype=torch.bfloat16)


def test_chunks(device):
    """260200 rows of K = 129 (per-channel: the GEMM path) is more than one 128 MiB chunk
    (260112 rows). Rows are independent, so the result must equal the two halves' (each
    one chunk) bit for bit: with a power-of-two diagonal gram the GEMM is exact in float32
    and every row's errors are computed the same way in all three calls."""
    k = 129
    w = random_weight(260200, k, device=device)
    gram = torch.diag(2.0 ** torch.randint(-3, 4, (k,)).float()).to(device)
    full = ops.awq_clip_search(w, gram, 4, k, True, 4, 0.5, torch.float16)   # 2 ratios
    top = ops.awq_clip_search(w[:130100], gram, 4, k, True, 4, 0.5, torch.float16)
    bottom = ops.awq_clip_search(w[130100:], gram, 4, k, True, 4, 0.5, torch.float16)
    for f, t, b in zip(full, top, bottom):
        assert torch.equal(f, torch.cat([t, b]))
    assert (full[2] < 1).any() and (full[2] == 1).any()   # both ratios are picked somewhere


def test_opcheck(device):
    w, gram = random_weight(6, 40, device=device), _gram(40, device)
    opcheck(torch.ops.lowbit.awq_clip_search.default, (w, gram, 4, 16, True, 10, 0.5, torch.float16))
    opcheck(torch.ops.lowbit.awq_clip_search.default, (w, gram, 3, 40, False, 4, 0.5, torch.bfloat16))


def test_bad_input(check_device):
    w = torch.randn(4, 16, device=check_device)
    gram = torch.eye(16, device=check_device)
    f = ops.awq_clip_search
    raises(TypeError, "'w' must be torch.float32", f, w.bfloat16(), gram, 4, 8, True)
    raises(ValueError, "'w' must be 2-D", f, w[None], gram, 4, 8, True)
    raises(TypeError, "'gram' must be torch.float32", f, w, gram.half(), 4, 8, True)
    raises(ValueError, r"'gram' must be \[K, K\] = \[16, 16\]", f, w, gram[:, :4], 4, 8, True)
    raises(ValueError, r"'bits' must be in \[2, 8\]", f, w, gram, 1, 8, True)
    raises(ValueError, "'group_size' must be a positive", f, w, gram, 4, -8, True)
    raises(TypeError, "'scale_dtype' must be torch.float32", f, w, gram, 4, 8, True, 20, 0.5, torch.int8)
    raises(ValueError, "'n_grid' must be >= 1", f, w, gram, 4, 8, True, 0)
    raises(ValueError, r"'max_shrink' must be in \[0, 1\)", f, w, gram, 4, 8, True, 20, 1.0)
    raises(ValueError, r"'max_shrink' must be in \[0, 1\)", f, w, gram, 4, 8, True, 20, -0.1)
    if check_device != "cpu":
        raises(ValueError, "'gram' is on cpu but 'w' is on", f, w, torch.eye(16), 4, 8, True)


def test_nonfinite_is_an_error(device):
    w, gram = random_weight(5, 16, device=device), _gram(16, device)
    bad = w.clone()
    bad[4, 0] = float("inf")
    raises(ValueError, r"'w' holds NaN or Inf \(row 4\)", ops.awq_clip_search, bad, gram, 4, 8, True)
    bad = gram.clone()
    bad[3, 9] = float("nan")
    raises(ValueError, r"'gram' holds NaN or Inf \(row 3\)", ops.awq_clip_search, w, bad, 4, 8, True)
