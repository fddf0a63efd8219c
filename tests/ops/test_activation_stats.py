"""lowbit.ops.activation_stats against the reference: absmax bit-exact, abssum to float64
rounding.

abssum is a float64 sum of non-negative float32 values, so no term cancels another: each
of the R additions of a row's contribution (plus the one into the running total) errs by
at most 2**-53 of the partial sum, which is at most the final sum. Any two summation
orders (kernel and reference) therefore differ by at most 2 * (R + 1) * 2**-53 relative,
while a missing or doubled row changes a column's sum by about 1 / R of it.
"""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops
from lowbit.reference import activation as ref
from _helpers import FLOAT_DTYPES, misaligned, raises


def _rows(shape) -> int:
    r = 1
    for d in shape[:-1]:
        r *= d
    return r


def _start(k, device):
    """Running statistics from earlier batches: random, so the update is tested too."""
    absmax = torch.rand(k, device=device) * 2
    abssum = torch.rand(k, device=device, dtype=torch.float64) * 100
    return absmax, abssum


def _check(x, absmax, abssum, rows_before=0):
    am, asum = absmax.clone(), abssum.clone()
    ra, rs = absmax.clone(), abssum.clone()
    ops.activation_stats(am, asum, x)
    ref.activation_stats(ra, rs, x)
    assert torch.equal(am, ra)
    rows = _rows(x.shape) + rows_before
    torch.testing.assert_close(asum, rs, rtol=2 * (rows + 1) * 2.0**-53, atol=0)
    return am, asum


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
# Empty either way, one element, K not a multiple of any vector width or column slice
# (37, 300), 3-D, more rows than one CUDA chunk holds (5000 x 40), K over two CPU slices.
@pytest.mark.parametrize("shape", [(1,), (1, 1), (0, 8), (4, 0), (7, 37), (2, 3, 50), (5000, 40), (33, 600)])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_matches_reference(device, dtype, shape, noncontiguous):
    x = (torch.randn(shape) * torch.rand(shape[-1]) * 10).to(dtype=dtype, device=device)
    if noncontiguous and x.dim() >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    _check(x, *_start(shape[-1], device))


def test_accumulates_over_calls(device):
    k = 96
    absmax = torch.zeros(k, device=device)
    abssum = torch.zeros(k, device=device, dtype=torch.float64)
    ra, rs = absmax.clone(), abssum.clone()
    rows = 0
    for m in (3, 100, 1, 64):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        ops.activation_stats(absmax, abssum, x)
        ref.activation_stats(ra, rs, x)
        rows += m
    assert torch.equal(absmax, ra)
    torch.testing.assert_close(abssum, rs, rtol=2 * (rows + 4) * 2.0**-53, atol=0)
    # The documented use: the mean |x| and max |x| of everything seen.
    assert abssum.min() > 0 and (absmax > 0).all()


@pytest.mark.parametrize("k", [64, 2048])
def test_misaligned_input(device, k):
    x = misaligned(torch.randn(5, k, device=device, dtype=torch.float16))
    _check(x, *_start(k, device))


def test_opcheck(device):
    x = torch.randn(2, 5, 40, device=device, dtype=torch.bfloat16)
    absmax, abssum = _start(40, device)
    opcheck(torch.ops.lowbit.activation_stats.default, (absmax, abssum, x))


def test_bad_input(check_device):
    d = check_device
    k = 16
    x = torch.randn(4, k, device=d)
    am = torch.zeros(k, device=d)
    asum = torch.zeros(k, device=d, dtype=torch.float64)
    f = ops.activation_stats
    raises(TypeError, "'absmax' must be torch.float32", f, am.double(), asum, x)
    raises(ValueError, "'absmax' must be 1-D", f, am.view(2, 8), asum, x)
    raises(TypeError, "'abssum' must be torch.float64", f, am, asum.float(), x)
    raises(ValueError, "'abssum' must be 1-D", f, am, asum.view(2, 8), x)
    raises(TypeError, "'x' must be float32, float16 or bfloat16", f, am, asum, x.double())
    raises(ValueError, "'x' must have at least 1 dimension", f, am, asum, x[0, 0])
    raises(ValueError, r"'abssum' must have shape \[16\] like 'absmax', got \[8\]", f, am, asum[:8], x)
    raises(ValueError, r"'x' must have last dimension K = 16 \(the length of 'absmax'\), got shape \[4, 8\]",
           f, am, asum, x[:, :8])
    raises(ValueError, "'absmax' and 'abssum' must be contiguous",
           f, torch.zeros(2 * k, device=d)[::2], asum, x)
    raises(ValueError, "'absmax' and 'abssum' must be contiguous",
           f, am, torch.zeros(2 * k, device=d, dtype=torch.float64)[::2], x)
    if d != "meta":
        raises(ValueError, "'x' is on meta but 'absmax' is on", f, am, asum, x.to("meta"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_is_an_error_and_writes_nothing(device, bad):
    k = 300
    x = torch.randn(40, k, device=device)
    x[31, 7] = bad
    x[29, 250] = bad   # the first bad row is in a later slice (CPU) / column tile (CUDA)
    absmax, abssum = _start(k, device)
    am, asum = absmax.clone(), abssum.clone()
    raises(ValueError, r"'x' holds NaN or Inf \(row 29\)", ops.activation_stats, am, asum, x)
    assert torch.equal(am, absmax) and torch.equal(asum, abssum)
    raises(ValueError, r"'x' holds NaN or Inf \(row 29\)", ref.activation_stats, am, asum, x)
