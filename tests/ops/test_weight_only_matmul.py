"""lowbit.ops.weight_only_matmul against reference.weight_only_matmul.

Not bit-exact: kernels sum in their own order and may factor a group as
scale * (sum x*q - zero * sum x). The bound (``_check``) is float32 rounding error,
derived, not tuned: every partial sum of the factored form is bounded by
mag = sum_k |x_k| * scale * (q + zero), and a float32 sum of n terms errs by at most
n * 2**-24 of the sum of their magnitudes, n <= K + G + a few roundings; then the output
rounds once to x.dtype (half an ulp). A wrong or missing term of a K <= 300 test errs by
about mag / K, two orders of magnitude above the bound.
"""
import math

import pytest
import torch
from torch.library import opcheck

from lowbit import ops, reference as ref
from _helpers import FLOAT_DTYPES, misaligned, raises

U32 = 2.0 ** -24
# Half an ulp of the output dtype, relative; and the smallest subnormal step (fp16).
OUT_REL = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
OUT_ABS = {torch.float32: 0.0, torch.float16: 2.0 ** -24, torch.bfloat16: 0.0}


def _make(n, k, bits, group_size, device, scale_dtype=torch.float32, zero_dtype=torch.int32,
          group_major=True):
    """Random codes packed as qweight, scales and zeros [N, G] (group_major: stored as the
    transpose of a contiguous [G, N], the fast layout; else contiguous [N, G])."""
    g = ref.num_groups(k, group_size)
    codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, device=device)
    qweight = ref.pack_int32(codes.t(), bits)
    s = (torch.rand(g, n, device=device) * 0.1 + 1e-3).to(scale_dtype)
    z = torch.randint(0, 2 ** bits, (g, n), device=device).to(zero_dtype)
    if group_major:
        return qweight, s.t(), z.t()
    return qweight, s.t().contiguous(), z.t().contiguous()


def _check(y, x, qweight, scales, zeros, bits, group_size, bias=None):
    """y matches the float64 reference within the float32 bound of the module docstring."""
    k = x.shape[-1]
    n = qweight.shape[1]
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], n) and y.is_contiguous()
    y64 = ref.weight_only_matmul(x, qweight, scales, zeros, bits, group_size, bias,
                                 accumulate=torch.float64, out_dtype=torch.float64)
    codes = ref.unpack_int32(qweight, bits, k).t().double()
    s = ref.expand_groups(scales.double(), k, group_size)
    z = ref.expand_groups(zeros.double(), k, group_size)
    mag = x.reshape(-1, k).double().abs() @ ((codes + z) * s).t()
    if bias is not None:
        mag = mag + bias.double().abs()
    mag = mag.reshape(y64.shape)
    terms = k + ref.num_groups(k, group_size) + 8
    tol = terms * U32 * mag
    tol = tol + OUT_REL[x.dtype] * (y64.abs() + tol) + OUT_ABS[x.dtype]
    err = (y.double() - y64).abs()
    finite = torch.isfinite(y64)
    assert torch.equal(torch.isfinite(y), finite)
    bad = err[finite] > tol[finite]
    assert not bad.any(), (
        f"max err {float(err[finite].max())}, worst err/tol "
        f"{float((err[finite] / tol[finite].clamp(min=1e-30)).max())}")


# (N, K): K not a multiple of any word (37), stories260K's 172, K = 1, N = 1 and a column
# count that leaves a ragged block in every layout (129).
SHAPES = [(3, 37), (129, 172), (1, 64), (8, 1)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group_size", [1, 7, 32, 64, 128, None, 1000])
def test_matches_reference(device, bits, group_size):
    combos = [(x, s, z) for x in FLOAT_DTYPES for s in FLOAT_DTYPES for z in (torch.int32, torch.uint8)]
    i = 0
    for n, k in SHAPES:
        gs = group_size or k
        for m in (1, 3, 17):
            xd, sd, zd = combos[(i + bits + (group_size or 0)) % len(combos)]
            i += 1
            qweight, s, z = _make(n, k, bits, gs, device, sd, zd, group_major=i % 2 == 0)
            x = torch.randn(m, k, device=device).to(xd)
            _check(ops.weight_only_matmul(x, qweight, s, z, bits, gs), x, qweight, s, z, bits, gs)


# M from the GEMV path (1, 2) through the small-M direct path to the BLAS path (from 20
# rows on CPUs with AVX-512, 32 without: both thresholds are covered).
@pytest.mark.parametrize("m", [0, 1, 2, 3, 4, 5, 19, 20, 31, 32, 65, 300])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, None), (2, 64), (4, 128), (3, 64)])
def test_code_paths(device, m, bits, group_size):
    n, k = 129, 300
    gs = group_size or k
    qweight, s, z = _make(n, k, bits, gs, device, torch.float16)
    bias = torch.randn(n, device=device)
    for xd in (torch.float32, torch.bfloat16):
        x = torch.randn(m, k, device=device).to(xd)
        _check(ops.weight_only_matmul(x, qweight, s, z, bits, gs, bias), x, qweight, s, z, bits, gs, bias)


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scale_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("zero_dtype", [torch.int32, torch.uint8])
def test_dtypes(device, x_dtype, scale_dtype, zero_dtype):
    qweight, s, z = _make(72, 256, 4, 64, device, scale_dtype, zero_dtype)
    for m in (1, 6, 40):
        x = torch.randn(m, 256, device=device).to(x_dtype)
        for bias in (None, torch.randn(72, device=device).to(scale_dtype)):
            y = ops.weight_only_matmul(x, qweight, s, z, 4, 64, bias)
            _check(y, x, qweight, s, z, 4, 64, bias)


@pytest.mark.parametrize("m", [1, 3, 40])
def test_layouts_agree(device, m):
    """Scales and zeros in any layout give the same bits as the fast (group-major) one."""
    qweight, s, z = _make(40, 160, 4, 32, device, torch.bfloat16, torch.uint8)
    x = torch.randn(m, 160, device=device)
    y = ops.weight_only_matmul(x, qweight, s, z, 4, 32)
    _check(y, x, qweight, s, z, 4, 32)
    wide_s = torch.zeros(40, 10, dtype=s.dtype, device=device)
    wide_s[:, ::2] = s                          # strided in both dims
    for s2, z2 in [(s.contiguous(), z.contiguous()), (wide_s[:, ::2], z.contiguous()),
                   (misaligned(s.t()).t(), misaligned(z.t()).t())]:
        assert torch.equal(ops.weight_only_matmul(x, qweight, s2, z2, 4, 32), y)


def test_leading_dims_and_strides(device):
    qweight, s, z = _make(48, 96, 4, 32, device)
    x = torch.randn(2, 3, 96, device=device)
    y = ops.weight_only_matmul(x, qweight, s, z, 4, 32)
    assert y.shape == (2, 3, 48)
    _check(y, x, qweight, s, z, 4, 32)
    for xv in [torch.randn(96, 5, device=device).t(),          # column-major rows
               torch.randn(4, 192, device=device)[:, ::2],    # strided last dim
               torch.randn(96, device=device),                # 1-D x: y is [N]
               torch.randn(96, 2, 3, device=device).permute(1, 2, 0),
               torch.randn(1, 96, device=device).expand(3, 96),
               misaligned(torch.randn(3, 96, device=device).to(torch.float16))]:
        _check(ops.weight_only_matmul(xv, qweight, s, z, 4, 32), xv, qweight, s, z, 4, 32)
    x = torch.randn(5, 96, device=device)
    for qw, s2, z2 in [(misaligned(qweight), misaligned(s.t()).t(), misaligned(z.t()).t())]:
        _check(ops.weight_only_matmul(x, qw, s2, z2, 4, 32), x, qw, s2, z2, 4, 32)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_long_k_few_columns(device, bits):
    """Few output columns and a long K: K is split across threads (CPU), partials summed."""
    for n, k, gs in [(8, 4096, 128), (3, 2000, 2000), (20, 3000, 64)]:
        qweight, s, z = _make(n, k, bits, gs, device)
        for m in (1, 2, 5):
            x = torch.randn(m, k, device=device)
            _check(ops.weight_only_matmul(x, qweight, s, z, bits, gs), x, qweight, s, z, bits, gs)


def test_llama_shape(device):
    qweight, s, z = _make(512, 4096, 4, 128, device, torch.float16)
    for m in (1, 4, 64):
        x = torch.randn(m, 4096, device=device).to(torch.bfloat16)
        _check(ops.weight_only_matmul(x, qweight, s, z, 4, 128), x, qweight, s, z, 4, 128)


def test_empty(device):
    # K = 0: the sum is empty, y = bias (or 0); M = 0 and N = 0: empty outputs.
    qweight = torch.zeros(0, 5, dtype=torch.int32, device=device)
    s, z = torch.rand(5, 0, device=device), torch.zeros(5, 0, dtype=torch.int32, device=device)
    bias = torch.randn(5, device=device)
    x = torch.randn(3, 0, device=device, dtype=torch.float16)
    assert torch.equal(ops.weight_only_matmul(x, qweight, s, z, 4, 32), torch.zeros(3, 5, device=device, dtype=torch.float16))
    assert torch.equal(ops.weight_only_matmul(x, qweight, s, z, 4, 32, bias), bias.half().expand(3, 5))
    qweight, s, z = _make(0, 64, 4, 32, device)
    assert ops.weight_only_matmul(torch.randn(2, 64, device=device), qweight, s, z, 4, 32).shape == (2, 0)
    qweight, s, z = _make(7, 64, 4, 32, device)
    assert ops.weight_only_matmul(torch.randn(0, 4, 64, device=device), qweight, s, z, 4, 32).shape == (0, 4, 7)


@pytest.mark.parametrize("m", [1, 3, 40])
def test_nan_inf_propagate(device, m):
    """NaN or Inf in x is not an error: it reaches that row's outputs, as in a matmul."""
    qweight, s, z = _make(24, 64, 4, 32, device)
    x = torch.randn(m, 64, device=device)
    x[0, 5] = float("nan")
    x[-1, 9] = float("inf") if m > 1 else float("nan")
    y = ops.weight_only_matmul(x, qweight, s, z, 4, 32)
    assert not torch.isfinite(y[0]).any() and not torch.isfinite(y[-1]).any()
    if m > 2:
        _check(y[1:-1], x[1:-1], qweight, s, z, 4, 32)


def test_opcheck(device):
    for bits, gs, m, xd, sd, zd, bias in [
        (4, 32, 1, torch.float32, torch.float16, torch.int32, False),
        (8, 100, 5, torch.bfloat16, torch.float32, torch.uint8, True),
        (3, 32, 40, torch.float16, torch.bfloat16, torch.int32, True),
        (2, 16, 2, torch.float32, torch.float32, torch.uint8, False),
    ]:
        qweight, s, z = _make(20, 100, bits, gs, device, sd, zd)
        x = torch.randn(m, 100, device=device).to(xd)
        b = torch.randn(20, device=device) if bias else None
        opcheck(torch.ops.lowbit.weight_only_matmul.default, (x, qweight, s, z, bits, gs, b))
    qweight, s, z = _make(20, 100, 4, 32, device)
    opcheck(torch.ops.lowbit.weight_only_matmul.default, (torch.randn(2, 3, 100, device=device), qweight, s, z, 4, 32))


def test_bad_input(check_device):
    d = check_device
    other = "cpu" if d == "meta" else "meta"
    x = torch.randn(3, 64, device=d)
    qweight = torch.zeros(8, 16, dtype=torch.int32, device=d)    # K = 64 at 4 bits
    s = torch.rand(16, 2, device=d)
    z = torch.full((16, 2), 8, dtype=torch.int32, device=d)
    f = ops.weight_only_matmul
    raises(TypeError, "'x' must be float32", f, x.to(torch.int32), qweight, s, z, 4, 32)
    raises(ValueError, "'x' must have at least 1 dimension", f, x[0, 0], qweight, s, z, 4, 32)
    raises(TypeError, "'qweight' must be torch.int32", f, x, qweight.to(torch.int64), s, z, 4, 32)
    raises(TypeError, "'qweight' must be torch.int32", f, x, qweight.to(torch.uint8), s, z, 4, 32)
    raises(ValueError, "'qweight' must be 2-D", f, x, qweight[0], s, z, 4, 32)
    raises(TypeError, "'scales' must be float32", f, x, qweight, s.to(torch.int32), z, 4, 32)
    raises(TypeError, "'zeros' must be torch.int32 or torch.uint8, got torch.float32", f, x, qweight, s, z.float(), 4, 32)
    raises(TypeError, "'zeros' must be torch.int32 or torch.uint8", f, x, qweight, s, z.to(torch.int8), 4, 32)
    raises(ValueError, r"'bits' must be in \[2, 8\], got 9", f, x, qweight, s, z, 9, 32)
    raises(ValueError, "'bits' must be in", f, x, qweight, s, z, 1, 32)
    raises(ValueError, "'group_size' must be a positive", f, x, qweight, s, z, 4, 0)
    raises(ValueError, "'group_size' must be a positive", f, x, qweight, s, z, 4, -32)
    raises(ValueError, r"'qweight' must have 8 rows of words for K=64 \(the last dim of 'x'\) and bits=4",
           f, x, qweight[:7], s, z, 4, 32)
    raises(ValueError, "'qweight' must have 16 rows of words for K=64", f, x, qweight, s, z, 8, 32)
    raises(ValueError, "'qweight' must have 7 rows of words for K=56", f, x[:, :56], qweight, s, z, 4, 32)
    raises(ValueError, r"'scales' must have shape \[16, 4\] for 'qweight' of shape \[8, 16\], K=64 and group_size 16",
           f, x, qweight, s, z, 4, 16)
    raises(ValueError, r"'scales' must have shape \[16, 2\]", f, x, qweight, s[:15], z, 4, 32)
    raises(ValueError, r"'scales' must have shape \[16, 2\]", f, x, qweight, s.t(), z, 4, 32)
    raises(ValueError, r"'zeros' must have the shape of 'scales' \[16, 2\], got \[16, 1\]", f, x, qweight, s, z[:, :1], 4, 32)
    raises(TypeError, "'bias' must be float32", f, x, qweight, s, z, 4, 32, torch.zeros(16, dtype=torch.int32, device=d))
    raises(ValueError, r"'bias' must have shape \[16\], got \[15\]", f, x, qweight, s, z, 4, 32, torch.zeros(15, device=d))
    raises(ValueError, r"'bias' must have shape \[16\], got \[1, 16\]", f, x, qweight, s, z, 4, 32, torch.zeros(1, 16, device=d))
    # Device mismatch (the meta/fake kernel runs when any argument is on meta).
    def on_other(t):
        return torch.zeros_like(t, device=other)

    raises(ValueError, f"'qweight' is on {other}", f, x, on_other(qweight), s, z, 4, 32)
    raises(ValueError, f"'scales' is on {other}", f, x, qweight, on_other(s), z, 4, 32)
    raises(ValueError, f"'zeros' is on {other}", f, x, qweight, s, on_other(z), 4, 32)
    raises(ValueError, f"'bias' is on {other}", f, x, qweight, s, z, 4, 32, torch.zeros(16, device=other))


def test_meta_shapes():
    qweight, s, z = _make(48, 100, 4, 32, "meta")
    for shape in [(100,), (7, 100), (2, 3, 100), (0, 100)]:
        x = torch.empty(shape, device="meta", dtype=torch.bfloat16)
        y = ops.weight_only_matmul(x, qweight, s, z, 4, 32)
        assert y.shape == (*shape[:-1], 48) and y.dtype == torch.bfloat16 and y.device.type == "meta"


def test_bound_is_tight_enough():
    """The tolerance catches a wrong term: one code off by one in a K = 300 row."""
    qweight, s, z = _make(16, 300, 4, 32, "cpu")
    s[3, 150 // 32] = 0.1
    x = torch.randn(1, 300)
    x[0, 150] = 1.0
    y = ops.weight_only_matmul(x, qweight, s, z, 4, 32)
    codes = ref.unpack_int32(qweight, 4, 300)
    codes[150, 3] = (int(codes[150, 3]) + 1) % 16
    with pytest.raises(AssertionError):
        _check(y, x, ref.pack_int32(codes, 4), s, z, 4, 32)
    assert math.isfinite(float(y.abs().max()))
