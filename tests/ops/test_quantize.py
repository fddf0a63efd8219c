"""lowbit.ops.quantize against reference.quantize (codes bit-exact)."""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops, reference as ref
from _helpers import FLOAT_DTYPES, GROUP_SIZES, WEIGHT_SHAPES, misaligned, random_weight, raises


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_matches_reference(device, dtype, shape, group_size, noncontiguous):
    n, k = shape
    g = group_size or max(k, 1)
    w = random_weight(n, k, dtype, device, noncontiguous)
    for bits in (2, 3, 4, 6, 8):
        for symmetric in (True, False):
            s, z = ref.quant_params(w, bits, g, symmetric, 0.9 if symmetric else 1.0)
            codes = ops.quantize(w, s, z, bits, g)
            assert codes.dtype == torch.uint8 and codes.shape == (n, k) and codes.is_contiguous()
            assert torch.equal(codes, ref.quantize(w, s, z, bits, g)), (bits, symmetric)
            if codes.numel():
                assert int(codes.max()) < 2**bits


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scales(device, scale_dtype):
    w = random_weight(9, 100, torch.float16, device)
    s, z = ref.quant_params(w, 4, 32, False)
    s = s.to(scale_dtype)
    assert torch.equal(ops.quantize(w, s, z, 4, 32), ref.quantize(w, s, z, 4, 32))


def test_ties_round_half_to_even(device):
    # Power-of-two scale: w / scale is exact, so every value sits on a .5 tie and the
    # rounding rule alone decides the code.
    scale = 2.0 ** -3
    w = ((torch.arange(-20, 20, dtype=torch.float32) + 0.5) * scale).reshape(2, 20).to(device)
    s = torch.full((2, 1), scale, device=device)
    z = torch.full((2, 1), 128, dtype=torch.int32, device=device)
    codes = ops.quantize(w, s, z, 8, 20)
    assert torch.equal(codes, ref.quantize(w, s, z, 8, 20))
    expected = torch.round(w.cpu() / scale) + 128   # torch.round is half-to-even
    assert torch.equal(codes.cpu().float(), expected)


def test_opcheck(device):
    w = random_weight(6, 70, torch.bfloat16, device)
    s, z = ref.quant_params(w, 4, 32, False)
    opcheck(torch.ops.lowbit.quantize.default, (w, s, z, 4, 32))


def test_bad_input(check_device):
    d = check_device
    w = torch.randn(4, 64, device=d)
    s = torch.rand(4, 2, device=d) + 0.1
    z = torch.full((4, 2), 8, dtype=torch.int32, device=d)
    f = ops.quantize
    raises(TypeError, "'w' must be float32", f, w.to(torch.int8), s, z, 4, 32)
    raises(TypeError, "'scales' must be float32", f, w, s.to(torch.int32), z, 4, 32)
    raises(TypeError, "'zeros' must be torch.int32", f, w, s, z.float(), 4, 32)
    raises(ValueError, r"'scales' must have shape \[4, 2\]", f, w, s[:, :1], z[:, :1], 4, 32)
    raises(ValueError, r"'scales' must have shape \[4, 4\]", f, w, s, z, 4, 16)
    raises(ValueError, "'zeros' must have the shape of 'scales'", f, w, s, z[:3], 4, 32)
    raises(ValueError, "'bits' must be in", f, w, s, z, 0, 32)
    raises(ValueError, "'group_size' must be a positive", f, w, s, z, 4, 0)
    raises(ValueError, "'w' must be 2-D", f, w[0], s, z, 4, 32)


def test_bad_values(device):
    w = torch.randn(4, 64, device=device)
    s = torch.rand(4, 2, device=device) + 0.1
    z = torch.full((4, 2), 8, dtype=torch.int32, device=device)
    bad = s.clone()
    bad[2, 1] = 0.0
    raises(ValueError, "'scales' must be positive and finite.*row 2, group 1", ops.quantize, w, bad, z, 4, 32)
    bad[2, 1] = float("nan")
    raises(ValueError, "'scales' must be positive and finite", ops.quantize, w, bad, z, 4, 32)
    w[1, 40] = float("nan")
    raises(ValueError, r"'w' holds NaN or Inf \(row 1\)", ops.quantize, w, s, z, 4, 32)


@pytest.mark.parametrize("shape,group_size", [((3, 40000), 17000), ((1, 70001), 70001)])
def test_long_groups(device, shape, group_size):
    w = random_weight(*shape, torch.float16, device)
    s, z = ref.quant_params(w, 8, group_size, False)
    assert torch.equal(ops.quantize(w, s, z, 8, group_size), ref.quantize(w, s, z, 8, group_size))
    w[0, 20000] = float("inf")
    raises(ValueError, r"'w' holds NaN or Inf \(row 0\)", ops.quantize, w, s, z, 8, group_size)


def test_misaligned_input(device):
    w = misaligned(random_weight(5, 72, torch.float16, device))
    s, z = ref.quant_params(w, 4, 24, False)
    assert torch.equal(ops.quantize(w, s, z, 4, 24), ref.quantize(w, s, z, 4, 24))
