"""lowbit.ops.quantize_per_token_int8 against the reference (codes and scales bit-exact)."""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops, reference as ref
from _helpers import FLOAT_DTYPES, misaligned, raises


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1, 1), (0, 8), (4, 0), (7, 37), (2, 3, 50), (300, 4096)])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_matches_reference(device, dtype, shape, noncontiguous):
    x = (torch.randn(shape) * torch.rand(*shape[:-1], 1) * 10).to(dtype=dtype, device=device)
    if noncontiguous and x.dim() >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    codes, scales = ops.quantize_per_token_int8(x)
    rc, rs = ref.quantize_per_token_int8(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert scales.shape == (*shape[:-1], 1)
    assert torch.equal(scales, rs) and torch.equal(codes, rc)


def test_error_bound(device):
    x = torch.randn(32, 512, device=device)
    codes, scales = ops.quantize_per_token_int8(x)
    # Half a step, plus the float32 rounding of x / scale and of codes * scale.
    assert ((codes.float() * scales - x).abs() <= scales / 2 + x.abs() * 2.0**-22).all()
    assert codes.abs().amax(dim=-1).eq(127).all()   # every row uses the full range


def test_opcheck(device):
    x = torch.randn(2, 5, 40, device=device, dtype=torch.bfloat16)
    opcheck(torch.ops.lowbit.quantize_per_token_int8.default, (x,))


def test_bad_input(check_device):
    x = torch.randn(4, 16, device=check_device)
    raises(TypeError, "'x' must be float32", ops.quantize_per_token_int8, x.to(torch.float64))
    raises(ValueError, "'x' must have at least 1 dimension", ops.quantize_per_token_int8, x[0, 0])


def test_nonfinite_is_an_error(device):
    x = torch.randn(4, 16, device=device)
    x[3, 0] = float("nan")
    raises(ValueError, r"'x' holds NaN or Inf \(row 3\)", ops.quantize_per_token_int8, x)


@pytest.mark.parametrize("k", [64, 2048])
def test_misaligned_input(device, k):
    x = misaligned(torch.randn(5, k, device=device, dtype=torch.bfloat16))
    codes, scales = ops.quantize_per_token_int8(x)
    rc, rs = ref.quantize_per_token_int8(x)
    assert torch.equal(codes, rc) and torch.equal(scales, rs)
