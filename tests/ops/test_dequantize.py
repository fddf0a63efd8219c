"""lowbit.ops.dequantize against reference.dequantize (bit-exact in every output dtype)."""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops, reference as ref
from _helpers import FLOAT_DTYPES, GROUP_SIZES, WEIGHT_SHAPES, bits_equal, misaligned, raises


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("scale_dtype", FLOAT_DTYPES)
def test_matches_reference(device, dtype, shape, group_size, scale_dtype):
    n, k = shape
    g = group_size or max(k, 1)
    ng = ref.num_groups(k, g)
    for bits in (2, 3, 4, 8):
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device=device)
        s = (torch.rand(n, ng, device=device) * 0.1 + 1e-3).to(scale_dtype)
        z = torch.randint(0, 2**bits, (n, ng), dtype=torch.int32, device=device)
        out = ops.dequantize(codes, s, z, g, dtype)
        assert out.dtype == dtype and out.shape == (n, k)
        assert bits_equal(out, ref.dequantize(codes, s, z, g, dtype)), bits


def test_noncontiguous_codes(device):
    codes = torch.randint(0, 16, (40, 24), dtype=torch.uint8, device=device).t()
    s = torch.rand(24, 2, device=device)
    z = torch.randint(0, 16, (24, 2), dtype=torch.int32, device=device)
    assert bits_equal(ops.dequantize(codes, s, z, 32, torch.float16),
                      ref.dequantize(codes, s, z, 32, torch.float16))


def test_roundtrip_error_is_half_a_step(device):
    w = torch.randn(8, 256, device=device)
    s, z = ops.quant_params(w, 4, 64, True)
    deq = ops.dequantize(ops.quantize(w, s, z, 4, 64), s, z, 64, torch.float32)
    step = ref.expand_groups(s, 256, 64)
    # Half a step, plus the float32 rounding of w / scale and of (q - zero) * scale.
    assert ((deq - w).abs() <= step / 2 + w.abs() * 2.0**-22).all()


def test_opcheck(device):
    codes = torch.randint(0, 8, (5, 50), dtype=torch.uint8, device=device)
    s = torch.rand(5, 4, device=device, dtype=torch.float16)
    z = torch.randint(0, 8, (5, 4), dtype=torch.int32, device=device)
    opcheck(torch.ops.lowbit.dequantize.default, (codes, s, z, 16, torch.bfloat16))


def test_bad_input(check_device):
    d = check_device
    codes = torch.randint(0, 16, (4, 64), dtype=torch.uint8, device=d)
    s = torch.rand(4, 2, device=d)
    z = torch.full((4, 2), 8, dtype=torch.int32, device=d)
    f = ops.dequantize
    raises(TypeError, "'codes' must be", f, codes.to(torch.int32), s, z, 32, torch.float16)
    raises(TypeError, "'dtype' must be torch.float32", f, codes, s, z, 32, torch.int8)
    raises(ValueError, r"'scales' must have shape \[4, 3\]", f, codes, s, z, 30, torch.float16)
    raises(ValueError, "'group_size' must be a positive", f, codes, s, z, -1, torch.float16)
    raises(TypeError, "'zeros' must be", f, codes, s, z.to(torch.int64), 32, torch.float16)


@pytest.mark.parametrize("shape,group_size", [((3, 40000), 17000), ((1, 70001), 70001)])
def test_long_groups(device, shape, group_size):
    n, k = shape
    g = ref.num_groups(k, group_size)
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    s = torch.rand(n, g, device=device) + 0.01
    z = torch.randint(0, 256, (n, g), dtype=torch.int32, device=device)
    assert bits_equal(ops.dequantize(codes, s, z, group_size, torch.bfloat16),
                      ref.dequantize(codes, s, z, group_size, torch.bfloat16))


def test_misaligned_codes(device):
    codes = misaligned(torch.randint(0, 16, (6, 64), dtype=torch.uint8, device=device))
    s = torch.rand(6, 2, device=device)
    z = torch.randint(0, 16, (6, 2), dtype=torch.int32, device=device)
    assert bits_equal(ops.dequantize(codes, s, z, 32, torch.float16), ref.dequantize(codes, s, z, 32, torch.float16))
