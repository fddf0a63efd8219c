"""lowbit.ops.awq_scale_search against reference.awq.awq_scale_search.

The kernels compute the candidates' ``s`` with the reference's own torch ops on the same
device and every rounded weight with the reference's arithmetic, so the differences
``D = W_hat - W`` are equal bit for bit; only ``D @ gram`` differs: a float32 GEMM in the
kernel, float64 in the reference. Its error is bounded elementwise by
``gamma_K * (|D| @ |gram|)`` with ``gamma_K ~ K * 2**-24`` (the worst case of any
summation order), so each finite loss is held to ``K * 2**-24 * sum((|D| @ |gram|) * |D|)``
(the float64 sums add ~1e-16 of that). The returned ``s`` is checked bit for bit against
the reference's candidate that the kernel's losses pick, and that pick against the
reference's best: it may differ only where the two losses lie within their bounds.
"""
import math

import pytest
import torch
from torch.library import opcheck

from lowbit import ops
from lowbit.nn import QuantLinear
from lowbit.reference import awq as ra
from _helpers import misaligned, random_weight, raises

U32 = 2.0 ** -24


def _problem(n, k, device, rows=None):
    """w [n, k]; gram = X^T X / m and act_mean = mean |X| of activations whose channels
    have scales spread over e^(+-2), with a mean offset (correlated columns)."""
    m = rows or max(2 * k, 16)
    x = (torch.randn(m, k, dtype=torch.float64) + 0.3 * torch.randn(k, dtype=torch.float64)) * torch.exp(
        torch.randn(k, dtype=torch.float64))
    gram = (x.t() @ x / m).float().to(device)
    act_mean = x.abs().mean(0).float().to(device)
    return random_weight(n, k, device=device), gram, act_mean, x.to(device)


def _bounds(w, gram, act_mean, bits, gs, sym, n_grid, scale_dtype, max_value):
    """Per candidate: |loss_kernel - loss_ref| may reach this (inf where rejected)."""
    k = w.shape[1]
    cands = ra.scale_candidates(act_mean, n_grid)
    out = []
    for i in range(n_grid):
        s = cands[i]
        if not ra.candidate_is_valid(w, s, max_value):
            out.append(math.inf)
            continue
        w_hat, _, _ = ra.fake_quantize(w * s, bits, gs, sym, scale_dtype)
        d = (w_hat / s - w).double().abs()
        out.append(k * U32 * float(((d @ gram.double().abs()) * d).sum()) + 1e-300)
    return out


def _check(w, gram, act_mean, bits, gs, sym, n_grid=20, scale_dtype=torch.float16, max_value=math.inf):
    losses, s = ops.awq_scale_search(w, gram, act_mean, bits, gs, sym, n_grid, scale_dtype, max_value)
    rl, rs = ra.awq_scale_search(w, gram, act_mean, bits, gs, sym, n_grid, scale_dtype, max_value)
    k = w.shape[1]
    assert losses.dtype == torch.float64 and losses.shape == (n_grid,) and losses.device == w.device
    assert s.dtype == torch.float32 and s.shape == (k,) and s.device == w.device
    bound = _bounds(w, gram, act_mean, bits, gs, sym, n_grid, scale_dtype, max_value)
    lc, rc = losses.cpu(), rl.cpu()
    assert torch.equal(torch.isinf(lc), torch.isinf(rc)), (lc, rc)
    fin = torch.isfinite(rc)
    err = (lc[fin] - rc[fin]).abs()
    assert (err <= torch.tensor(bound, dtype=torch.float64)[fin]).all(), (err, bound)
    pick = min(range(n_grid), key=lambda i: (float(lc[i]), i))
    best = min(range(n_grid), key=lambda i: (float(rc[i]), i))
    assert pick == best or abs(float(rc[pick]) - float(rc[best])) <= bound[pick] + bound[best]
    assert torch.equal(s, ra.scale_candidates(act_mean, n_grid)[pick])
    if pick == best:
        assert torch.equal(s, rs)
    return losses, s


@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (33, 200)])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("gs", [1, 7, 32, None])
@pytest.mark.parametrize("sym", [True, False])
def test_matches_reference(device, shape, bits, gs, sym):
    n, k = shape
    w, gram, act_mean, _ = _problem(n, k, device)
    _check(w, gram, act_mean, bits, gs or k, sym, n_grid=10)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gs", [16, 50, 10**9])   # ragged last group (50 of 120), huge = per-channel
def test_scale_dtypes_and_groups(device, scale_dtype, gs):
    w, gram, act_mean, _ = _problem(12, 120, device)
    _check(w, gram, act_mean, 4, gs, False, 10, scale_dtype)


def test_long_groups(device):
    # K > 1024: the CUDA kernel takes a block per group instead of a warp.
    w, gram, act_mean, _ = _problem(6, 1500, device, rows=64)
    _check(w, gram, act_mean, 4, 1500, True, 4)
    _check(w, gram, act_mean, 4, 1100, False, 4)


@pytest.mark.parametrize("n_grid", [1, 3, 20])
def test_alpha_zero_is_rtn(device, n_grid):
    """loss[0] (s = 1) is plain RTN's output error |X W_hat^T - X W^T|^2 / m, W_hat the
    weight QuantLinear.from_linear stores; the best loss is never above it."""
    w, gram, act_mean, x = _problem(24, 96, device)
    losses, _ = ops.awq_scale_search(w, gram, act_mean, 4, 32, True, n_grid, torch.float16)
    lin = torch.nn.Linear(96, 24, bias=False).to(device)
    lin.weight.data.copy_(w)
    d = (QuantLinear.from_linear(lin, 4, 32, True, torch.float16).dequantize(torch.float32) - w).double()
    out_err = float((x @ d.t()).pow(2).sum()) / x.shape[0]
    # gram is X^T X / m rounded to float32 (2**-24 per entry) and the kernel's GEMM adds
    # K * 2**-24: (K + 1) * 2**-24 of the absolute-value bound.
    bound = (96 + 1) * U32 * float(((d.abs() @ gram.double().abs()) * d.abs()).sum())
    assert abs(float(losses[0]) - out_err) <= bound
    assert float(losses.min()) <= float(losses[0])


def test_max_value_rejects_candidates(device):
    w, gram, act_mean, _ = _problem(8, 64, device)
    w = w / w.abs().max()   # s = 1 needs max_value >= 1 only
    act_mean[:8] *= 50      # a wide spread: large alphas push 1 / s and |w * s| far above 1
    s_last = ra.scale_candidates(act_mean, 20)[-1]
    need_last = max(float((w * s_last).abs().max()), float(s_last.reciprocal().max()))
    assert need_last > 4
    losses, _ = _check(w, gram, act_mean, 4, 32, True, 20, torch.float16, need_last / 2)
    assert math.isfinite(float(losses[0])) and math.isinf(float(losses[-1]))
    # max_value < 1 rejects even s = 1 (1 / s = 1): every loss inf, s = 1 returned.
    losses, s = ops.awq_scale_search(w, gram, act_mean, 4, 32, True, 5, torch.float16, 0.5)
    assert torch.isinf(losses).all() and torch.equal(s, torch.ones_like(s))


def test_scale_overflow_is_rejected(device):
    # Weights near 1e6: a 4-bit float16 scale (absmax / 7) overflows for s = 1, so those
    # candidates get inf; float32 scales are fine.
    w, gram, act_mean, _ = _problem(4, 32, device)
    w = w / w.abs().max() * 1e6
    losses, _ = _check(w, gram, act_mean, 4, 32, True, 10, torch.float16)
    assert math.isinf(float(losses[0]))
    losses, _ = _check(w, gram, act_mean, 4, 32, True, 10, torch.float32)
    assert torch.isfinite(losses).all()


def test_zero_and_tiny_activations(device):
    w, gram, act_mean, _ = _problem(8, 48, device)
    act_mean[::3] = 0          # clamped to 1e-4
    act_mean[1::3] *= 1e-7
    _check(w, gram, act_mean, 4, 16, False)


@pytest.mark.parametrize("shape", [(0, 16), (5, 0), (0, 0)])
def test_empty(device, shape):
    n, k = shape
    w = torch.zeros(n, k, device=device)
    gram = torch.zeros(k, k, device=device)
    act_mean = torch.rand(k, device=device)
    losses, s = ops.awq_scale_search(w, gram, act_mean, 4, 8, True, 5)
    assert torch.equal(losses.cpu(), torch.zeros(5, dtype=torch.float64)) and s.shape == (k,)
    rl, rs = ra.awq_scale_search(w, gram, act_mean, 4, 8, True, 5)
    assert torch.equal(losses, rl) and torch.equal(s, rs)


def test_noncontiguous_and_misaligned(device):
    w, gram, act_mean, _ = _problem(10, 72, device)
    wt = w.t().contiguous().t()
    gt = gram.t().contiguous().t()
    at = torch.stack([act_mean, act_mean], 1)[:, 0]
    assert not (wt.is_contiguous() or gt.is_contiguous() or at.is_contiguous())
    _check(wt, gt, at, 4, 24, True)
    _check(misaligned(w), misaligned(gram), misaligned(act_mean), 4, 24, False)


def test_chunks(device):
    """20 candidates x 26300 rows x K = 64 is more than one 128 MiB chunk of differences
    (524288 rows of 64): a candidate's loss then spans two chunks. Losses add over rows,
    so it must equal the sum of the losses of the two halves, each one chunk. With a
    power-of-two diagonal gram, D @ gram is exact in float32 (and each row's float64 dot
    is computed the same way in both calls): only the float64 sums over rows differ, by
    ~1e-16 per row; 1e-12 relative allows 26300 of them many times over."""
    k = 64
    w = random_weight(26300, k, device=device)
    gram = torch.diag(2.0 ** torch.randint(-3, 4, (k,)).float()).to(device)
    act_mean = torch.rand(k, device=device) * 4
    full, s = ops.awq_scale_search(w, gram, act_mean, 4, 32, True, 20)
    top, _ = ops.awq_scale_search(w[:13000], gram, act_mean, 4, 32, True, 20)
    bottom, _ = ops.awq_scale_search(w[13000:], gram, act_mean, 4, 32, True, 20)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full, top + bottom, rtol=1e-12, atol=0)
    assert torch.equal(s, ra.scale_candidates(act_mean, 20)[int(torch.argmin(full))])


def test_matches_rtn_only_grid_when_n_grid_is_1(device):
    w, gram, act_mean, _ = _problem(7, 40, device)
    losses, s = ops.awq_scale_search(w, gram, act_mean, 4, 8, True, 1)
    assert losses.shape == (1,) and torch.equal(s, torch.ones_like(s))


def test_opcheck(device):
    w, gram, act_mean, _ = _problem(6, 40, device)
    opcheck(torch.ops.lowbit.awq_scale_search.default, (w, gram, act_mean, 4, 16, True, 5, torch.float16, 1e4))


def test_bad_input(check_device):
    w = torch.randn(4, 16, device=check_device)
    gram = torch.eye(16, device=check_device)
    am = torch.rand(16, device=check_device)
    f = ops.awq_scale_search
    raises(TypeError, "'w' must be torch.float32", f, w.half(), gram, am, 4, 8, True)
    raises(ValueError, "'w' must be 2-D", f, w[0], gram, am, 4, 8, True)
    raises(TypeError, "'gram' must be torch.float32", f, w, gram.double(), am, 4, 8, True)
    raises(ValueError, r"'gram' must be \[K, K\] = \[16, 16\]", f, w, gram[:8], am, 4, 8, True)
    raises(ValueError, r"'bits' must be in \[2, 8\]", f, w, gram, am, 9, 8, True)
    raises(ValueError, "'group_size' must be a positive", f, w, gram, am, 4, 0, True)
    raises(TypeError, "'scale_dtype' must be torch.float32", f, w, gram, am, 4, 8, True, 20, torch.float64)
    raises(TypeError, "'act_mean' must be torch.float32", f, w, gram, am.double(), 4, 8, True)
    raises(ValueError, r"'act_mean' must have shape \[16\]", f, w, gram, am[:3], 4, 8, True)
    raises(ValueError, "'n_grid' must be >= 1", f, w, gram, am, 4, 8, True, 0)
    raises(ValueError, "'max_value' must be positive", f, w, gram, am, 4, 8, True, 20, torch.float16, 0.0)
    if check_device != "cpu":
        raises(ValueError, "'gram' is on cpu but 'w' is on", f, w, torch.eye(16), am, 4, 8, True)
        raises(ValueError, "'act_mean' is on cpu but 'w' is on", f, w, gram, torch.rand(16), 4, 8, True)


def test_nonfinite_and_negative_are_errors(device):
    w, gram, am, _ = _problem(4, 16, device)
    f = ops.awq_scale_search
    bad = w.clone()
    bad[2, 5] = float("nan")
    raises(ValueError, r"'w' holds NaN or Inf \(row 2\)", f, bad, gram, am, 4, 8, True)
    bad = gram.clone()
    bad[7, 1] = float("inf")
    raises(ValueError, r"'gram' holds NaN or Inf \(row 7\)", f, w, bad, am, 4, 8, True)
    bad = am.clone()
    bad[3] = float("-inf")
    raises(ValueError, r"'act_mean' holds NaN or Inf \(channel 3\)", f, w, gram, bad, 4, 8, True)
    bad = am.clone()
    bad[11] = -0.5
    raises(ValueError, r"'act_mean' must be >= 0 .* at channel 11", f, w, gram, bad, 4, 8, True)
