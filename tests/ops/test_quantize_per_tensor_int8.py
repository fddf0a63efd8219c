"""lowbit.ops.quantize_per_tensor_int8 against the reference (codes bit-exact)."""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops
from lowbit.reference import activation as ref
from _helpers import FLOAT_DTYPES, misaligned, raises


def _scale(x) -> torch.Tensor:
    """A calibrated-style scale: max |x| / 127 of a typical batch, so some values of x
    land beyond the range and saturate; the shape varies (any one-element shape is valid)."""
    amax = float(x.float().abs().amax()) if x.numel() else 1.0
    s = torch.tensor(max(amax, 1e-3) / 127 * 0.8, device=x.device)
    return s.reshape([(), (1,), (1, 1)][torch.randint(0, 3, ()).item()])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1, 1), (0, 8), (4, 0), (7, 37), (2, 3, 50), (300, 4096)])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_matches_reference(device, dtype, shape, noncontiguous):
    x = (torch.randn(shape) * torch.rand(*shape[:-1], 1) * 10).to(dtype=dtype, device=device)
    if noncontiguous and x.dim() >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    scale = _scale(x)
    codes = ops.quantize_per_tensor_int8(x, scale)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and codes.is_contiguous()
    assert torch.equal(codes, ref.quantize_per_tensor_int8(x, scale))


def test_ties_round_to_even(device):
    # x / scale lands exactly on .5 (scale a power of two): half to even, as torch.round.
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -128.5, -127.5], device=device) * 0.25
    codes = ops.quantize_per_tensor_int8(x, torch.tensor(0.25, device=device))
    assert codes.tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -128, -128]


def test_inf_saturates(device):
    x = torch.tensor([[1.0, float("inf")], [float("-inf"), -1e30]], device=device, dtype=torch.bfloat16)
    codes = ops.quantize_per_tensor_int8(x, torch.tensor(0.5, device=device))
    assert codes.tolist() == [[2, 127], [-128, -128]]


def test_error_bound(device):
    x = torch.randn(32, 512, device=device)
    scale = x.abs().amax() / 127
    codes = ops.quantize_per_tensor_int8(x, scale)
    # Half a step, plus the float32 rounding of x / scale and of codes * scale.
    assert ((codes.float() * scale - x).abs() <= scale / 2 + x.abs() * 2.0**-22).all()
    assert codes.abs().max() == 127


@pytest.mark.parametrize("k", [64, 2048])
def test_misaligned_input(device, k):
    x = misaligned(torch.randn(5, k, device=device, dtype=torch.bfloat16))
    scale = _scale(x)
    assert torch.equal(ops.quantize_per_tensor_int8(x, scale), ref.quantize_per_tensor_int8(x, scale))


def test_opcheck(device):
    x = torch.randn(2, 5, 40, device=device, dtype=torch.float16)
    opcheck(torch.ops.lowbit.quantize_per_tensor_int8.default, (x, torch.tensor([0.02], device=device)))


def test_bad_input(check_device):
    x = torch.randn(4, 16, device=check_device)
    s = torch.tensor(0.1, device=check_device)
    f = ops.quantize_per_tensor_int8
    raises(TypeError, "'x' must be float32, float16 or bfloat16", f, x.double(), s)
    raises(ValueError, "'x' must have at least 1 dimension", f, x[0, 0], s)
    raises(TypeError, "'scale' must be torch.float32", f, x, s.half())
    raises(ValueError, r"'scale' must hold exactly one value \(per-tensor\), got shape \[4, 1\]",
           f, x, torch.full((4, 1), 0.1, device=check_device))
    raises(ValueError, r"'scale' must hold exactly one value \(per-tensor\), got shape \[0\]",
           f, x, torch.ones(0, device=check_device))
    if check_device != "meta":
        raises(ValueError, "'scale' is on meta but 'x' is on", f, x, s.to("meta"))


@pytest.mark.parametrize("value", [0.0, -0.5, float("inf"), float("nan")])
def test_scale_must_be_positive_and_finite(device, value):
    # A value check: only the real kernels can make it (the fake one sees no data).
    x = torch.randn(4, 16, device=device)
    raises(ValueError, "'scale' must be positive and finite", ops.quantize_per_tensor_int8, x,
           torch.tensor(value, device=device))


def test_nan_is_an_error(device):
    x = torch.randn(6, 700, device=device)
    x[5, 100] = float("nan")
    x[3, 699] = float("nan")   # two bad rows in different blocks: the first is named
    x[1] = float("inf")        # Inf is no error, even in a row before the NaN
    raises(ValueError, r"'x' holds NaN \(row 3\)", ops.quantize_per_tensor_int8, x, torch.tensor(0.1, device=device))
