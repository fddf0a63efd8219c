"""lowbit.ops.quantize_fp8 (static scales) against reference.quantize_fp8, bit-exact."""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops, reference as ref
from _helpers import FLOAT_DTYPES, FP8_DTYPES, bits_equal, misaligned, raises

X_SHAPES = [(1,), (1, 1), (0, 8), (4, 0), (7, 37), (2, 3, 50), (130, 64)]


def _scales(shape, device):
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return {
        "tensor": torch.rand((), device=device) + 0.01,
        "row": torch.rand(*shape[:-1], 1, device=device) + 0.01,
        "flat": torch.rand(rows, device=device) + 0.01,
    }


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
@pytest.mark.parametrize("shape", X_SHAPES)
def test_matches_reference(device, dtype, fp8, shape):
    x = (torch.randn(shape) * 300).to(dtype=dtype, device=device)
    for kind, scale in _scales(shape, device).items():
        if kind == "flat" and len(shape) < 2:
            continue
        q = ops.quantize_fp8(x, scale, fp8)
        assert q.dtype == fp8 and q.shape == x.shape
        assert bits_equal(q, ref.quantize_fp8(x, scale, fp8)), kind


@pytest.mark.parametrize("fp8", FP8_DTYPES)
def test_saturates_and_keeps_nan(device, fp8):
    fmax = torch.finfo(fp8).max
    x = torch.tensor([[1e30, -1e30, float("inf"), -float("inf"), float("nan"), 1.0]], device=device)
    q = ops.quantize_fp8(x, torch.tensor(1.0, device=device), fp8).float().cpu()
    assert q[0, :4].tolist() == [fmax, -fmax, fmax, -fmax]
    assert torch.isnan(q[0, 4]) and q[0, 5] == 1.0


@pytest.mark.parametrize("fp8", FP8_DTYPES)
def test_every_rounding_boundary(device, fp8):
    # Every finite FP8 value, the midpoints between neighbours (ties, which round to the
    # even code), and the float32 values one ulp either side of each: the cases a
    # hand-written encoder gets wrong. Subnormals and the maximum included.
    values = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    values = values[torch.isfinite(values)].unique()
    mids = (values[1:] + values[:-1]) / 2
    pts = torch.cat([values, mids])
    x = torch.cat([pts, torch.nextafter(pts, pts + 1), torch.nextafter(pts, pts - 1), -pts])
    x = x.reshape(1, -1).to(device)
    one = torch.tensor(1.0, device=device)
    assert bits_equal(ops.quantize_fp8(x, one, fp8), ref.quantize_fp8(x, one, fp8))


def test_noncontiguous(device):
    x = torch.randn(40, 24, device=device).t()
    s = torch.rand(24, 1, device=device)
    assert bits_equal(ops.quantize_fp8(x, s, torch.float8_e4m3fn), ref.quantize_fp8(x, s, torch.float8_e4m3fn))


def test_opcheck(device):
    x = torch.randn(5, 33, device=device, dtype=torch.bfloat16)
    opcheck(torch.ops.lowbit.quantize_fp8.default, (x, torch.rand(5, 1, device=device), torch.float8_e4m3fn))
    opcheck(torch.ops.lowbit.quantize_fp8.default, (x, torch.rand((), device=device), torch.float8_e5m2))


def test_bad_input(check_device):
    d = check_device
    x = torch.randn(4, 16, device=d)
    s = torch.rand(4, 1, device=d)
    f = ops.quantize_fp8
    raises(TypeError, "'x' must be float32", f, x.int(), s, torch.float8_e4m3fn)
    raises(TypeError, "'dtype' must be torch.float8_e4m3fn or torch.float8_e5m2, got torch.float16",
           f, x, s, torch.float16)
    raises(TypeError, "'scale' must be torch.float32, got torch.float16", f, x, s.half(), torch.float8_e4m3fn)
    raises(ValueError, r"'scale' must hold one value \(per-tensor\) or one per row", f, x, s[:3],
           torch.float8_e4m3fn)
    raises(ValueError, "'x' must have at least 1 dimension", f, x[0, 0], s[0, 0], torch.float8_e4m3fn)


def test_misaligned_input(device):
    x = misaligned(torch.randn(6, 64, device=device, dtype=torch.bfloat16) * 100)
    s = torch.rand(6, 1, device=device)
    assert bits_equal(ops.quantize_fp8(x, s, torch.float8_e4m3fn), ref.quantize_fp8(x, s, torch.float8_e4m3fn))
