"""lowbit.ops.mma_matmul against reference.mma_matmul, on every path.

The CPU dequantizes and calls at::mm; CUDA has a tensor-core kernel (float16/bfloat16 x,
rows up to max_mma_rows) and dequantize + cuBLAS: the CUDA tests run both, forced with
max_mma_rows = 1 << 30 and 0, and the default (-1). Results are not bit-exact (sums in
another order, split-K, tensor-core accumulation), so each output is checked against
the float64 value of the reference formula (W rounded to x.dtype, as specified) within

    2 (K + G + 8) u32 sum_k |x| |W|  +  half an ulp of x.dtype (one rounding of y)
                                     +  half an ulp of |bias| in x.dtype

(the last term: the cuBLAS path adds the bias in its epilogue, rounded to x.dtype first).

u32 = 2**-24: a float32 sum of n terms errs by at most n u32 of the sum of their
magnitudes; the factor 2 covers tensor cores, whose float32 accumulation truncates. A
wrong or missing term errs by about sum|x||W| / K, far above it (test_bound_is_tight).
float16 results must also be within a relative mean error of 1e-3 (bfloat16: 4e-3) of
the reference accumulated in float64 and rounded once to x.dtype.
"""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops, reference as ref
from _helpers import FLOAT_DTYPES, misaligned, raises

U32 = 2.0**-24
OUT_REL = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
OUT_ABS = {torch.float32: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 0.0}
MS = [0, 1, 3, 16, 17, 33, 64, 65, 200]

# (N, K, group_size): one k16 row (K = 16), K not a multiple of 64 (80, 144), ragged last
# groups (80 at 32, 144 at 128), per-channel (group_size = K and far beyond it), groups
# of 16, and several 64-column units.
CASES = [(64, 16, 16), (64, 80, 32), (128, 144, 128), (192, 96, 16), (64, 48, 48), (128, 64, 2**40),
         (256, 256, 128)]


def _paths(device):
    """max_mma_rows values that pick each path: CUDA has two (and the default); the CPU
    one, whatever the value."""
    return [0, 1 << 30, -1] if device.startswith("cuda") else [-1]


@pytest.fixture(autouse=True)
def _exact_cublas():
    """float32 GEMMs in float32 (no TF32) and float16/bfloat16 GEMMs reduced in float32:
    the error bounds assume them."""
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_tf32 = False
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    yield
    m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved


def _make(n, k, bits, group_size, device, scale_dtype=torch.float32, zero_kind="asym"):
    """Random GPTQ tensors (qweight, scales [G, N], zeros int32 [G, N]) and their mma
    layout (packed, scales, zeros). zero_kind: "asym" (0..2**bits - 1), "sym" (2**(bits-1))
    or "wide" (0..255, what the layout holds)."""
    g = ref.num_groups(k, group_size)
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device=device)
    qweight = ref.pack_int32(codes.t(), bits)
    sign = 1 - 2 * (torch.rand(g, n, device=device) < 0.2).float()
    scales = ((torch.rand(g, n, device=device) * 0.05 + 1e-3) * sign).to(scale_dtype)
    if zero_kind == "sym":
        zeros = torch.full((g, n), 2 ** (bits - 1), dtype=torch.int32, device=device)
    else:
        hi = 2**bits if zero_kind == "asym" else 256
        zeros = torch.randint(0, hi, (g, n), dtype=torch.int32, device=device)
    if zero_kind == "wide":
        scales = scales / 16          # keeps |W| as with 4-bit zero points
    return (qweight, scales, zeros), ops.pack_mma(qweight, scales, zeros, bits, group_size)


def _check(y, x, packed, scales, zeros, bits, group_size, bias=None, what=""):
    """y matches the float64 value of the reference formula within the bound of the
    module docstring; float16/bfloat16 also within the mean criterion."""
    k = x.shape[-1]
    n = packed.shape[1] * 2 // bits
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], n) and y.is_contiguous() and y.device == x.device
    y64 = ref.mma_matmul(x, packed, scales, zeros, bits, group_size, bias,
                         accumulate=torch.float64, out_dtype=torch.float64)
    # |W| (W in x.dtype, as the reference rounds it): the reference on |x| and |W|.
    _, s, z = ref.unpack_mma(packed, scales, zeros, bits)
    codes = ref.mma_codes(packed, bits).double()
    sx = ref.expand_groups(s.to(x.dtype).double().t(), k, group_size)
    zx = ref.expand_groups(z.double().t(), k, group_size)
    w = ((codes - zx) * sx).float().to(x.dtype).double()
    mag = x.reshape(-1, k).double().abs() @ w.abs().t()
    if bias is not None:
        mag = mag + bias.double().abs()
    mag = mag.reshape(y64.shape)
    tol = 2 * (k + ref.num_groups(k, group_size) + 8) * U32 * mag
    tol = tol + OUT_REL[x.dtype] * (y64.abs() + tol) + OUT_ABS[x.dtype]
    if bias is not None:
        tol = tol + OUT_REL[x.dtype] * bias.double().abs() + OUT_ABS[x.dtype]
    err = (y.double() - y64).abs()
    finite = torch.isfinite(y64)
    assert torch.equal(torch.isfinite(y), finite), what
    bad = err[finite] > tol[finite]
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} outputs off; max err {float(err[finite].max())}, "
        f"worst err/tol {float((err[finite] / tol[finite].clamp(min=1e-30)).max()):.3g}")
    if x.dtype != torch.float32 and finite.any():
        # The reference accumulated in float64, rounded once to x.dtype.
        y_ref = ref.mma_matmul(x, packed, scales, zeros, bits, group_size, bias, accumulate=torch.float64)
        den = y_ref.double()[finite].abs().mean()
        if den > 0:
            rel = float((y.double() - y_ref.double())[finite].abs().mean() / den)
            # 1e-3 for float16 (the criterion); bfloat16's ulp is 8x float16's, and a
            # flipped rounding of y alone costs 2**-8 of that element: 4e-3.
            limit = 1e-3 if x.dtype == torch.float16 else 4e-3
            assert rel < limit, f"{what}: relative mean error {rel:.3g}"
    if x.dtype == torch.float32:
        # The float32 reference is within the same bound of the exact value.
        y32 = ref.mma_matmul(x, packed, scales, zeros, bits, group_size, bias)
        assert torch.equal(torch.isfinite(y32), finite)
        assert not ((y.double() - y32.double()).abs()[finite] > 2 * tol[finite]).any(), what


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,k,group_size", CASES)
@pytest.mark.parametrize("bits", [4, 8])
def test_matches_reference(device, bits, n, k, group_size, x_dtype):
    """Every M on every path; scale dtype, zero points (asymmetric, symmetric, 0..255) and
    bias vary with M."""
    for i, m in enumerate(MS):
        scale_dtype = FLOAT_DTYPES[(i + 1 + FLOAT_DTYPES.index(x_dtype)) % 3]   # never x's dtype when i % 3 != 2
        zero_kind = ("asym", "sym", "wide")[i % 3]
        _, (packed, s, z) = _make(n, k, bits, group_size, device, scale_dtype, zero_kind)
        x = torch.randn(m, k, device=device).to(x_dtype)
        bias = (None, torch.randn(n, device=device).to(x_dtype), torch.randn(n, device=device))[i % 3]
        for rows in _paths(device):
            y = ops.mma_matmul(x, packed, s, z, bits, group_size, bias, rows)
            _check(y, x, packed, s, z, bits, group_size, bias,
                   f"M={m} N={n} K={k} gs={group_size} bits={bits} {x_dtype} scales {scale_dtype} "
                   f"{zero_kind} bias={bias is not None} max_mma_rows={rows}")


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES)
def test_leading_dims_and_strides(device, x_dtype):
    n, k, bits, gs = 128, 144, 4, 32
    _, (packed, s, z) = _make(n, k, bits, gs, device, torch.float16)
    bias = torch.randn(n, device=device).to(x_dtype)
    base = torch.randn(17, k, device=device).to(x_dtype)
    variants = {
        "3-D": torch.randn(2, 9, k, device=device).to(x_dtype),
        "1-D": torch.randn(k, device=device).to(x_dtype),
        "transposed": torch.randn(k, 5, device=device).to(x_dtype).t(),
        "strided last dim": torch.randn(33, 2 * k, device=device).to(x_dtype)[:, ::2],
        "permuted 3-D": torch.randn(k, 2, 3, device=device).to(x_dtype).permute(1, 2, 0),
        "expanded": torch.randn(1, k, device=device).to(x_dtype).expand(65, k),
        "misaligned": misaligned(base),
    }
    for name, x in variants.items():
        for rows in _paths(device):
            y = ops.mma_matmul(x, packed, s, z, bits, gs, bias, rows)
            _check(y, x, packed, s, z, bits, gs, bias, f"{name}, max_mma_rows={rows}")
            if device == "cpu":   # the same values in a contiguous x give the same bits
                assert torch.equal(y, ops.mma_matmul(x.contiguous(), packed, s, z, bits, gs, bias, rows)), name


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 17, 65])
def test_same_as_weight_only_matmul(device, bits, m):
    """The mma layout computes the GPTQ layer it was packed from (float32 x: no rounding
    of W or scales)."""
    for n, k, gs in [(64, 80, 32), (128, 144, 144), (192, 256, 128)]:
        (qweight, scales, zeros), packed = _make(n, k, bits, gs, device)
        x = torch.randn(m, k, device=device)
        bias = torch.randn(n, device=device)
        want = ops.weight_only_matmul(x, qweight, scales.t(), zeros.t(), bits, gs, bias)
        # Both within their bounds of the exact value; weight_only_matmul may factor a
        # group as s (sum x q - z sum x): its bound is relative to sum |x| |s| (q + z).
        codes = ref.unpack_int32(qweight, bits, k).t().double()
        sx = ref.expand_groups(scales.double().t(), k, gs)
        zx = ref.expand_groups(zeros.double().t(), k, gs)
        mag = x.double().abs() @ (sx.abs() * (codes + zx)).t() + bias.double().abs()
        tol = 4 * (k + ref.num_groups(k, gs) + 8) * U32 * mag
        for rows in _paths(device):
            y = ops.mma_matmul(x, *packed, bits, gs, bias, rows)
            _check(y, x, *packed, bits, gs, bias)
            err = (y.double() - want.double()).abs()
            assert not (err > tol).any(), f"N={n} K={k} gs={gs}: max err {float(err.max())}"


@pytest.mark.parametrize("bits", [4, 8])
def test_empty(device, bits):
    # M = 0 (2-D and inside a 3-D x); K = 0 (the empty sum: bias alone, or zeros); N = 0.
    _, (packed, s, z) = _make(64, 32, bits, 16, device)
    for rows in _paths(device):
        for shape in [(0, 32), (2, 0, 32)]:
            for xd in FLOAT_DTYPES:
                y = ops.mma_matmul(torch.randn(shape, device=device).to(xd), packed, s, z, bits, 16, None, rows)
                assert y.shape == (*shape[:-1], 64) and y.dtype == xd
    _, (packed, s, z) = _make(64, 0, bits, 16, device)
    assert packed.shape == (0, 64 * bits // 2) and s.shape == (0, 64)
    bias = torch.randn(64, device=device)
    for rows in _paths(device):
        for m in (1, 3, 40):
            for xd in FLOAT_DTYPES:
                x = torch.randn(m, 0, device=device).to(xd)
                assert torch.equal(ops.mma_matmul(x, packed, s, z, bits, 16, bias, rows), bias.to(xd).expand(m, 64))
                assert torch.equal(ops.mma_matmul(x, packed, s, z, bits, 16, None, rows),
                                   torch.zeros(m, 64, dtype=xd, device=device))
    _, (packed, s, z) = _make(0, 32, bits, 16, device)
    for rows in _paths(device):
        assert ops.mma_matmul(torch.randn(3, 32, device=device), packed, s, z, bits, 16, None, rows).shape == (3, 0)


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m", [1, 3, 40])
def test_nan_inf_propagate(device, x_dtype, m):
    """NaN or Inf in x is not an error: a NaN reaches every output of its row, an Inf
    makes its row's outputs non-finite; other rows are unaffected."""
    _, (packed, s, z) = _make(128, 64, 4, 32, device)
    x = torch.randn(m, 64, device=device).to(x_dtype)
    x[0, 5] = float("nan")
    if m > 1:
        x[-1, 9] = float("inf")
    for rows in _paths(device):
        y = ops.mma_matmul(x, packed, s, z, 4, 32, None, rows)
        assert torch.isnan(y[0]).all()
        if m > 1:
            assert not torch.isfinite(y[-1]).any()
        if m > 2:
            _check(y[1:-1], x[1:-1], packed, s, z, 4, 32)


def test_max_mma_rows_ignored_on_cpu():
    _, (packed, s, z) = _make(64, 80, 4, 32, "cpu", torch.bfloat16)
    for xd in FLOAT_DTYPES:
        x = torch.randn(5, 80).to(xd)
        want = ops.mma_matmul(x, packed, s, z, 4, 32)
        for rows in (0, 1, 4, 1 << 30, -1, -7):
            assert torch.equal(ops.mma_matmul(x, packed, s, z, 4, 32, None, rows), want)


def test_bound_is_tight():
    """The tolerance catches a wrong term (one code off by one in a K = 256 row) and
    scales passed without their permutation."""
    _, (packed, s, z) = _make(64, 256, 4, 32, "cpu")
    x = torch.randn(2, 256)
    y = ops.mma_matmul(x, packed, s, z, 4, 32)
    _check(y, x, packed, s, z, 4, 32)
    wrong = packed.clone()
    wrong[5, 17] ^= 1 << 8          # code 2 of word 17 of k16 row 5: its low bit flips
    n, k = (ref.mma_codes(wrong, 4) != ref.mma_codes(packed, 4)).nonzero()[0].tolist()
    x[:, k] = 1.0
    s[:, ref.param_order(64)[n]] = 0.05     # the scale of (n, k)'s group (the order is an involution)
    y = ops.mma_matmul(x, packed, s, z, 4, 32)
    _check(y, x, packed, s, z, 4, 32)
    with pytest.raises(AssertionError):
        _check(y, x, wrong, s, z, 4, 32)
    _, s_plain, _ = ref.unpack_mma(packed, s, z, 4)
    with pytest.raises(AssertionError):
        _check(ops.mma_matmul(x, packed, s_plain, z, 4, 32), x, packed, s, z, 4, 32)


def test_opcheck(device):
    for n, k, bits, gs, xd, sd, bias, m, rows in [
        (64, 80, 4, 32, torch.float16, torch.float16, True, 3, -1),
        (128, 32, 8, 16, torch.bfloat16, torch.float32, False, 17, 1 << 30),
        (64, 48, 4, 48, torch.float32, torch.bfloat16, True, 65, 0),
        (64, 16, 8, 1000, torch.float16, torch.float16, True, 1, 1 << 30),
    ]:
        _, (packed, s, z) = _make(n, k, bits, gs, device, sd)
        x = torch.randn(m, k, device=device).to(xd)
        b = torch.randn(n, device=device).to(xd) if bias else None
        opcheck(torch.ops.lowbit.mma_matmul.default, (x, packed, s, z, bits, gs, b, rows))
    opcheck(torch.ops.lowbit.mma_matmul.default, (torch.randn(2, 3, k, device=device).half(), packed, s, z, bits, gs))


def test_bad_input(check_device):
    d = check_device
    other = "cpu" if d == "meta" else "meta"
    x = torch.randn(3, 64, device=d, dtype=torch.float16)
    packed = torch.zeros(4, 256, dtype=torch.int32, device=d)      # K = 64; N = 128 at 4 bits, 64 at 8
    s = torch.rand(2, 128, device=d, dtype=torch.float16)
    z = torch.full((2, 128), 8, dtype=torch.uint8, device=d)
    f = ops.mma_matmul
    raises(TypeError, "'x' must be float32, float16 or bfloat16, got torch.int32", f, x.int(), packed, s, z, 4, 32)
    raises(ValueError, "'x' must have at least 1 dimension", f, x[0, 0], packed, s, z, 4, 32)
    raises(TypeError, "'packed' must be torch.int32, got torch.int64", f, x, packed.long(), s, z, 4, 32)
    raises(ValueError, "'packed' must be 2-D", f, x, packed[0], s, z, 4, 32)
    raises(TypeError, "'scales' must be float32, float16 or bfloat16, got torch.int32", f, x, packed, s.int(), z, 4, 32)
    raises(ValueError, "'scales' must be 2-D", f, x, packed, s[0], z, 4, 32)
    raises(TypeError, "'zeros' must be torch.uint8, got torch.int32", f, x, packed, s, z.int(), 4, 32)
    raises(ValueError, "'group_size' must be a positive", f, x, packed, s, z, 4, 0)
    raises(ValueError, "4- or 8-bit codes, got bits=3", f, x, packed, s, z, 3, 32)
    raises(ValueError, "4- or 8-bit codes, got bits=2", f, x, packed, s, z, 2, 32)
    raises(ValueError, r"'packed' must have K/16 = 1 rows for K=24 \(the last dim of 'x'\), got shape \[4, 256\]",
           f, x[:, :24], packed, s, z, 4, 32)
    raises(ValueError, r"'packed' must have K/16 = 3 rows for K=48", f, x[:, :48], packed, s, z, 4, 32)
    raises(ValueError, "'packed' has 255 words per row, not a whole number of columns at bits=8",
           f, x, packed[:, :255], s, z, 8, 32)
    raises(ValueError, r"N \(out_features\) divisible by 64, got N=96",
           f, x, packed[:, :192], s[:, :96], z[:, :96], 4, 32)
    raises(ValueError, r"group_size divisible by 16 \(or >= K for per-channel\), got 24", f, x, packed, s, z, 4, 24)
    raises(ValueError, r"'scales' must have shape \[4, 128\] for K=64, N=128 and group_size 16, got \[2, 128\]",
           f, x, packed, s, z, 4, 16)
    raises(ValueError, r"'scales' must have shape \[2, 64\]", f, x, packed, s, z, 8, 32)
    raises(ValueError, r"'zeros' must have the shape of 'scales' \[2, 128\], got \[1, 128\]",
           f, x, packed, s, z[:1], 4, 32)
    raises(TypeError, "'bias' must be float32", f, x, packed, s, z, 4, 32,
           torch.zeros(128, dtype=torch.int32, device=d))
    raises(ValueError, r"'bias' must have shape \[128\], got \[64\]", f, x, packed, s, z, 4, 32,
           torch.zeros(64, device=d))
    raises(ValueError, r"'bias' must have shape \[128\], got \[1, 128\]", f, x, packed, s, z, 4, 32,
           torch.zeros(1, 128, device=d))

    def on_other(t):
        return torch.zeros_like(t, device=other)

    raises(ValueError, f"'packed' is on {other}", f, x, on_other(packed), s, z, 4, 32)
    raises(ValueError, f"'scales' is on {other}", f, x, packed, on_other(s), z, 4, 32)
    raises(ValueError, f"'zeros' is on {other}", f, x, packed, s, on_other(z), 4, 32)
    raises(ValueError, f"'bias' is on {other}", f, x, packed, s, z, 4, 32, torch.zeros(128, device=other))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_mismatch():
    _, (packed, s, z) = _make(64, 32, 4, 16, "cuda")
    x = torch.randn(2, 32, device="cuda", dtype=torch.float16)
    bias = torch.randn(64, device="cuda", dtype=torch.float16)
    f = ops.mma_matmul
    raises(ValueError, "argument 'packed' is on cuda.* but 'x' is on cpu",
           f, x.cpu(), packed, s, z, 4, 16, bias)
    raises(ValueError, "argument 'packed' is on cpu but 'x' is on cuda", f, x, packed.cpu(), s, z, 4, 16, bias)
    raises(ValueError, "argument 'scales' is on cpu", f, x, packed, s.cpu(), z, 4, 16, bias)
    raises(ValueError, "argument 'zeros' is on cpu", f, x, packed, s, z.cpu(), 4, 16, bias)
    raises(ValueError, "argument 'bias' is on cpu", f, x, packed, s, z, 4, 16, bias.cpu())


def test_meta_shapes():
    packed = torch.empty(10, 192 * 2, dtype=torch.int32, device="meta")   # K = 160, N = 192 at 4 bits
    s = torch.empty(5, 192, dtype=torch.float16, device="meta")
    z = torch.empty(5, 192, dtype=torch.uint8, device="meta")
    for shape in [(160,), (7, 160), (2, 3, 160), (0, 160)]:
        x = torch.empty(shape, device="meta", dtype=torch.bfloat16)
        y = ops.mma_matmul(x, packed, s, z, 4, 32)
        assert y.shape == (*shape[:-1], 192) and y.dtype == torch.bfloat16 and y.device.type == "meta"
