"""lowbit.ops.quant_params against reference.quant_params (scales and zeros bit-exact)."""
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
    for bits in (2, 3, 4, 5, 8):
        for symmetric in (True, False):
            clip = float(torch.empty(()).uniform_(0.5, 1.0)) if bits % 2 else 1.0
            s, z = ops.quant_params(w, bits, g, symmetric, clip)
            rs, rz = ref.quant_params(w, bits, g, symmetric, clip)
            assert s.dtype == torch.float32 and z.dtype == torch.int32
            assert s.shape == (n, ref.num_groups(k, g)) and z.shape == s.shape
            assert torch.equal(s, rs), (bits, symmetric, clip)
            assert torch.equal(z, rz), (bits, symmetric, clip)


def test_group_size_larger_than_k_is_per_channel(device):
    w = random_weight(4, 10, device=device)
    s1, z1 = ops.quant_params(w, 4, 10, False)
    s2, z2 = ops.quant_params(w, 4, 1000, False)
    assert torch.equal(s1, s2) and torch.equal(z1, z2) and s2.shape == (4, 1)


def test_zero_groups_get_unit_scale(device):
    w = torch.zeros(3, 40, device=device)
    w[1, 33:] = 1.0
    for symmetric in (True, False):
        s, z = ops.quant_params(w, 4, 32, symmetric)
        assert s[0].eq(1).all() and s[1, 0] == 1 and s[1, 1] != 1


def test_opcheck(device):
    w = random_weight(6, 70, torch.float16, device)
    opcheck(torch.ops.lowbit.quant_params.default, (w, 4, 32, True, 1.0))
    opcheck(torch.ops.lowbit.quant_params.default, (w, 3, 16, False, 0.8))


def test_bad_input(check_device):
    w = torch.randn(4, 64, device=check_device)
    f = ops.quant_params
    raises(TypeError, "'w' must be float32", f, w.to(torch.int32), 4, 32)
    raises(ValueError, "'w' must be 2-D", f, w[None], 4, 32)
    raises(ValueError, r"'bits' must be in \[2, 8\], got 1", f, w, 1, 32)
    raises(ValueError, r"'bits' must be in \[2, 8\], got 9", f, w, 9, 32)
    raises(ValueError, "'group_size' must be a positive", f, w, 4, 0)
    raises(ValueError, "'group_size' must be a positive", f, w, 4, -128)
    raises(ValueError, "'clip_ratio' must be in", f, w, 4, 32, True, 0.0)
    raises(ValueError, "'clip_ratio' must be in", f, w, 4, 32, True, 1.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weight_is_an_error(device, bad):
    w = torch.randn(5, 64, device=device, dtype=torch.float16)
    w[3, 17] = bad
    raises(ValueError, r"'w' holds NaN or Inf \(row 3\)", ops.quant_params, w, 4, 32)


@pytest.mark.parametrize("shape,group_size", [((3, 40000), 17000), ((2, 50000), 50000), ((1, 70001), 70001)])
def test_long_groups_split_across_threads(device, shape, group_size):
    # Groups longer than the CPU kernels' 16384-column tiles are reduced tile by tile, in
    # parallel, then merged: ragged last groups leave empty tiles; per-tensor is one such group.
    w = random_weight(*shape, torch.bfloat16, device)
    for symmetric in (True, False):
        s, z = ops.quant_params(w, 4, group_size, symmetric)
        rs, rz = ref.quant_params(w, 4, group_size, symmetric)
        assert torch.equal(s, rs) and torch.equal(z, rz)
    w[-1, -1] = float("nan")   # in the last tile of the last group
    raises(ValueError, rf"'w' holds NaN or Inf \(row {shape[0] - 1}\)", ops.quant_params, w, 4, group_size)


def test_misaligned_input(device):
    w = misaligned(random_weight(5, 72, torch.bfloat16, device))
    s, z = ops.quant_params(w, 3, 24, False)
    rs, rz = ref.quant_params(w, 3, 24, False)
    assert torch.equal(s, rs) and torch.equal(z, rz)
