"""lowbit.ops.quantize_fp8_dynamic (absmax scales) against the reference, bit-exact."""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops, reference as ref
from _helpers import FLOAT_DTYPES, FP8_DTYPES, bits_equal, misaligned, raises


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1, 1), (0, 8), (4, 0), (7, 37), (2, 3, 50), (300, 129), (3, 2100)])
@pytest.mark.parametrize("per_row", [True, False])
def test_matches_reference(device, dtype, fp8, shape, per_row):
    x = (torch.randn(shape) * torch.rand(*shape[:-1], 1) * 50).to(dtype=dtype, device=device)
    if x.numel():
        x.view(-1)[0] = 0.0
    q, s = ops.quantize_fp8_dynamic(x, fp8, per_row)
    rq, rs = ref.quantize_fp8_dynamic(x, fp8, per_row)
    assert s.dtype == torch.float32 and s.shape == rs.shape
    assert torch.equal(s, rs) and bits_equal(q, rq)


def test_zero_rows_get_unit_scale(device):
    x = torch.zeros(3, 8, device=device)
    x[1] = 2.0
    q, s = ops.quantize_fp8_dynamic(x, torch.float8_e4m3fn, True)
    assert s[0, 0] == 1 and s[2, 0] == 1 and q[1].float().eq(448).all()


def test_dequantized_error(device):
    # e4m3 keeps 3 mantissa bits: relative error of a normal value is at most 2**-4.
    x = torch.randn(64, 256, device=device) + 0.5
    q, s = ops.quantize_fp8_dynamic(x, torch.float8_e4m3fn, True)
    back = ops.dequantize_fp8(q, s, torch.float32)
    normal = x.abs() > s * 2.0 ** -6
    assert ((back - x).abs() <= x.abs() * 2.0 ** -4 + 1e-12)[normal].all()


def test_opcheck(device):
    x = torch.randn(3, 4, 33, device=device, dtype=torch.float16)
    opcheck(torch.ops.lowbit.quantize_fp8_dynamic.default, (x, torch.float8_e4m3fn, True))
    opcheck(torch.ops.lowbit.quantize_fp8_dynamic.default, (x, torch.float8_e5m2, False))


def test_bad_input(check_device):
    x = torch.randn(4, 16, device=check_device)
    f = ops.quantize_fp8_dynamic
    raises(TypeError, "'x' must be float32", f, x.to(torch.int16), torch.float8_e4m3fn, True)
    raises(TypeError, "'dtype' must be torch.float8_e4m3fn", f, x, torch.int8, True)
    raises(ValueError, "'x' must have at least 1 dimension", f, x[0, 0], torch.float8_e4m3fn, True)


@pytest.mark.parametrize("per_row", [True, False])
def test_nonfinite_is_an_error(device, per_row):
    x = torch.randn(4, 16, device=device)
    x[2, 5] = float("inf")
    raises(ValueError, r"'x' holds NaN or Inf \(row 2\)", ops.quantize_fp8_dynamic, x, torch.float8_e4m3fn, per_row)


@pytest.mark.parametrize("k", [64, 2048])
def test_misaligned_input(device, k):
    x = misaligned(torch.randn(5, k, device=device, dtype=torch.float16))
    for per_row in (True, False):
        q, s = ops.quantize_fp8_dynamic(x, torch.float8_e5m2, per_row)
        rq, rs = ref.quantize_fp8_dynamic(x, torch.float8_e5m2, per_row)
        assert torch.equal(s, rs) and bits_equal(q, rq)
