"""The CUDA kernel of weight_only_matmul against reference.weight_only_matmul and the CPU kernel.

CUDA only (skipped without a GPU). The kernel has two paths: a GEMV that reads the
packed words directly (M <= 8 rows of x) and dequantize + cuBLAS (M > 8); every test
that checks values covers both. Results are not bit-exact (summation order differs), so
each output is checked against the float64 value of the reference formula within

    (2 (K + 2) u32 + [2 u on the cuBLAS path]) * sum|x||w| + u |y|

where u32 = 2**-24 and u is the unit roundoff of x's dtype (the cuBLAS path holds W in
x's dtype). Bit-exact invariances (zero-point dtype, scale layout, streams, repeated
calls) are checked where the kernel reads the same values in the same order.
"""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from lowbit import reference as ref
from _helpers import FLOAT_DTYPES, raises

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GEMV_MAX_ROWS = 8                      # csrc/cuda/matmul.cu: kGemvMaxRows
ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# (N, K), group_size: N and K not multiples of the 32-column tile or of 8 codes, ragged
# last groups, group sizes below 32 and not dividing it (the code-by-code path),
# per-channel (None) and a group far beyond K, and K long enough for split-K blocks.
CASES = [
    ((1, 1), 1), ((7, 37), 7), ((33, 200), 32), ((64, 172), 64), ((5, 1000), None),
    ((40, 4100), 128), ((130, 96), 37), ((2, 33), 2**40), ((3, 16384), 128), ((31, 300), 16),
]


def _op(*args):
    return torch.ops.lowbit.weight_only_matmul.default(*args)


@pytest.fixture(autouse=True)
def _exact_cublas():
    """float32 GEMMs in float32 (no TF32) and float16/bfloat16 GEMMs reduced in float32,
    whatever an earlier test set: the error bounds assume them."""
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_tf32 = False
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    yield
    m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved


def _layout(t: torch.Tensor, fast: bool) -> torch.Tensor:
    """[N, G] values in the layers' layout (stride(0) == 1: the transpose of a contiguous
    [G, N]) or row-major."""
    return t.t().contiguous().t() if fast else t.contiguous()


def make(n, k, lead, bits, group_size, dtype, *, scale_dtype=torch.float32, fast_scales=True,
         zero_dtype=torch.int32, bias_dtype=None, device="cuda"):
    """Random inputs: codes [N, K], x [*lead, K], and the op's arguments."""
    gs = group_size or max(k, 1)
    g = ref.num_groups(k, gs)
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    qweight = ref.pack_int32(codes.t(), bits)
    sign = 1 - 2 * (torch.rand(n, g) < 0.2).float()
    scales = _layout(((torch.rand(n, g) * 0.05 + 1e-3) * sign).to(scale_dtype), fast_scales)
    zeros = _layout(torch.randint(0, 2**bits, (n, g), dtype=torch.int32).to(zero_dtype), fast_scales)
    x = torch.randn(*lead, k).to(dtype)
    bias = None if bias_dtype is None else torch.randn(n).to(bias_dtype)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731  (keeps strides)
    return codes, (mv(x), mv(qweight), mv(scales), mv(zeros), bits, gs, mv(bias))


def _ref_group(gs: int, k: int) -> int:
    """The same groups for the references, whose expand_groups materialises group_size
    columns per group (2**40 would not fit in memory)."""
    return min(gs, max(k, 1))


def _weight(codes, scales, zeros, gs):
    """The reference's float32 W [N, K]."""
    k = codes.shape[1]
    gs = _ref_group(gs, k)
    s = ref.expand_groups(scales.cpu().float(), k, gs)
    z = ref.expand_groups(zeros.cpu().float(), k, gs)
    return (codes.float() - z) * s, s, z


def _bound(codes, args, cublas: bool, factored: bool = False):
    """(exact float64 y, allowed |error|) for the op's arguments."""
    x, qweight, scales, zeros, bits, gs, bias = args
    k = x.shape[-1]
    w, s, z = _weight(codes, scales, zeros, gs)
    xd = x.cpu().double().reshape(-1, k)
    bd = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.cpu().double()
    exact = ref.weight_only_matmul(x.cpu(), qweight.cpu(), scales.cpu(), zeros.cpu(), bits, _ref_group(gs, k),
                                   None if bias is None else bias.cpu(),
                                   accumulate=torch.float64, out_dtype=torch.float64).reshape(-1, w.shape[0])
    # A kernel that factors a group as s * (sum x q - z sum x) loses precision relative to
    # sum |x| |s| (q + |z|) instead (reference/matmul.py); the CUDA kernel does not.
    mag = (s.abs() * (codes.float() + z.abs())) if factored else w.abs()
    sa = xd.abs() @ mag.double().t() + bd.abs()
    u = ROUNDOFF[x.dtype]
    tol = 2 * (k + 2) * 2.0**-24 * sa + u * exact.abs() + 1e-30
    if cublas and x.dtype != torch.float32:
        tol = tol + 2 * u * sa
    if x.dtype == torch.float16:
        tol = tol + 2.0**-24          # float16's subnormal spacing
    return exact, tol


def _assert_within(out, exact, tol, what):
    got = out.cpu().double().reshape(exact.shape)
    err = (got - exact).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} outputs off; worst error/tolerance "
        f"{float((err / tol).max()):.3g} at {divmod(int((err / tol).argmax()), exact.shape[1])}")


# -- values ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_matches_reference(bits, m, dtype):
    """Both paths, every bit width, the awkward shapes; scale dtype and layout, zero-point
    dtype and bias vary across the cases."""
    for i, ((n, k), gs) in enumerate(CASES):
        if k > 4100 and (m > GEMV_MAX_ROWS or bits not in (4, 8)):
            continue   # keep the CPU-side references quick
        codes, args = make(n, k, (m,), bits, gs, dtype,
                           scale_dtype=FLOAT_DTYPES[(i + bits) % 3], fast_scales=(i + m) % 2 == 0,
                           zero_dtype=(torch.int32, torch.uint8)[(i // 2 + bits) % 2],
                           bias_dtype=(None, dtype, torch.float32)[(i + m) % 3])
        out = _op(*args)
        assert out.dtype == dtype and out.shape == (m, n) and out.is_cuda
        what = f"case {i}: N={n} K={k} group_size={gs}"
        exact, tol = _bound(codes, args, cublas=m > GEMV_MAX_ROWS)
        _assert_within(out, exact, tol, what + " vs exact")
        # The float32 reference and the CPU kernel are within their own bounds of the
        # exact value; the CUDA result within the sum of the two of them.
        cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
        ref_out = ref.weight_only_matmul(*cpu_args[:5], _ref_group(args[5], k), cpu_args[6])
        _assert_within(out, ref_out.double().reshape(exact.shape), 2 * tol, what + " vs reference")
        cpu_out = _op(*cpu_args)
        _, tol_cpu = _bound(codes, args, cublas=False, factored=True)
        _assert_within(out, cpu_out.double().reshape(exact.shape), tol + tol_cpu, what + " vs CPU kernel")


@pytest.mark.parametrize("m", [1, 5, 12])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_leading_dims_and_strides(m, dtype):
    n, k = 24, 136
    codes, (x, qweight, scales, zeros, bits, gs, bias) = make(n, k, (m,), 4, 64, dtype, bias_dtype=dtype)
    want = _op(x, qweight, scales, zeros, bits, gs, bias)
    variants = {
        "3-D": x.reshape(1, m, k),
        "column stride 2": torch.stack([x, torch.zeros_like(x)], dim=-1).reshape(m, 2 * k)[:, ::2],
        "transposed": x.t().contiguous().t(),
        "offset": torch.cat([torch.zeros(1, k, dtype=dtype, device="cuda"), x])[1:],
    }
    for name, xv in variants.items():
        assert torch.equal(xv, x.reshape(xv.shape)), name
        out = _op(xv, qweight, scales, zeros, bits, gs, bias)
        assert out.shape == (*xv.shape[:-1], n), name
        exact, tol = _bound(codes, (xv, qweight, scales, zeros, bits, gs, bias), cublas=m > GEMV_MAX_ROWS)
        _assert_within(out, exact, tol, name)
        if m <= GEMV_MAX_ROWS:   # the GEMV reads the same values in the same order
            assert torch.equal(out.reshape(want.shape), want), name
    # x of one dimension: y of one.
    out = _op(x[0], qweight, scales, zeros, bits, gs, bias)
    assert out.shape == (n,)
    _assert_within(out.reshape(1, n), *_bound(codes, (x[:1], qweight, scales, zeros, bits, gs, bias), False), "1-D")


@pytest.mark.parametrize("m", [1, 9])
def test_layouts_are_bit_identical(m):
    """Zero points as int32 or uint8, scales in either layout, qweight a column slice of a
    wider one: the same values give the same bits."""
    n, k = 40, 300
    codes, (x, qweight, scales, zeros, bits, gs, bias) = make(n, k, (m,), 4, 32, torch.float16,
                                                              scale_dtype=torch.float16, bias_dtype=torch.float16)
    want = _op(x, qweight, scales, zeros, bits, gs, bias)
    wide = torch.randint(-2**31, 2**31 - 1, (qweight.shape[0], n + 7), dtype=torch.int32, device="cuda")
    wide[:, 3:3 + n] = qweight
    for name, args in {
        "uint8 zeros": (x, qweight, scales, zeros.to(torch.uint8), bits, gs, bias),
        "row-major scales": (x, qweight, scales.contiguous(), zeros.contiguous(), bits, gs, bias),
        "N-contiguous scales": (x, qweight, _layout(scales, True), _layout(zeros, True), bits, gs, bias),
        "qweight column slice": (x, wide[:, 3:3 + n], scales, zeros, bits, gs, bias),
        "transposed qweight copy": (x, qweight.t().contiguous().t(), scales, zeros, bits, gs, bias),
    }.items():
        assert torch.equal(_op(*args), want), name


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m", [1, 9])
def test_huge_zero_points(dtype, m):
    """int32 zero points far beyond any code (the GEMV's folded q - zero needs
    |zero| <= 2**23, and falls back beyond): still (q - zero) * scale in float32."""
    n, k = 33, 100
    codes, (x, qweight, scales, zeros, bits, gs, bias) = make(n, k, (m,), 8, 32, dtype)
    big = torch.tensor([2**23, -2**23, 2**23 + 1, -2**23 - 1, 2**24 + 1, 16777215, 2**30 + 3, -2**31, 2**31 - 1],
                       dtype=torch.int32)
    z = zeros.cpu().contiguous()
    z.view(-1)[: big.numel() * 3] = big.repeat(3)
    zeros = z.to("cuda")
    scales = scales.abs() * 1e-7   # keeps |W| in float16's range
    args = (x, qweight, scales, zeros, bits, gs, bias)
    out = _op(*args)
    exact, tol = _bound(codes, args, cublas=m > GEMV_MAX_ROWS)
    _assert_within(out, exact, tol, "huge zero points")


@pytest.mark.parametrize("bits", [3, 4])
def test_empty(bits):
    # M = 0 (no rows, also inside a 3-D x), N = 0, K = 0 (the bias alone, or zeros).
    for lead in [(0,), (2, 0)]:
        _, args = make(5, 64, lead, bits, 32, torch.float16, bias_dtype=torch.float16)
        out = _op(*args)
        assert out.shape == (*lead, 5) and out.dtype == torch.float16
    _, args = make(0, 64, (3,), bits, 32, torch.bfloat16)
    assert _op(*args).shape == (3, 0)
    for m in (2, 11):
        _, (x, qweight, scales, zeros, _, gs, bias) = make(6, 0, (m,), bits, 32, torch.float32, bias_dtype=torch.float16)
        assert qweight.shape == (0, 6) and scales.shape == (6, 0)
        out = _op(x, qweight, scales, zeros, bits, gs, bias)
        assert torch.equal(out, bias.float().expand(m, 6))
        assert torch.equal(_op(x, qweight, scales, zeros, bits, gs, None), torch.zeros(m, 6, device="cuda"))


def test_deterministic():
    # Split-K partial sums are reduced in a fixed order: no atomics, the same bits every call.
    _, args = make(64, 8192, (1,), 4, 128, torch.float16, scale_dtype=torch.float16, bias_dtype=torch.float16)
    first = _op(*args)
    for _ in range(3):
        assert torch.equal(_op(*args), first)


def test_side_stream():
    _, args = make(96, 1024, (4,), 4, 128, torch.bfloat16, bias_dtype=torch.bfloat16)
    want = _op(*args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = _op(*args)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(got, want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_non_current_device():
    codes, args = make(40, 256, (3,), 4, 64, torch.float16, bias_dtype=torch.float16, device="cuda:1")
    with torch.cuda.device(0):
        out = _op(*args)
    assert out.device == torch.device("cuda:1")
    _assert_within(out, *_bound(codes, args, cublas=False), "cuda:1")


# -- opcheck and bad input --------------------------------------------------------------

@pytest.mark.parametrize("m", [2, 12])
@pytest.mark.parametrize("bits", [3, 4])
def test_opcheck(m, bits):
    _, args = make(20, 100, (m,), bits, 32, torch.float16, scale_dtype=torch.float16,
                   zero_dtype=torch.uint8, bias_dtype=torch.float16)
    opcheck(torch.ops.lowbit.weight_only_matmul.default, args)
    opcheck(torch.ops.lowbit.weight_only_matmul.default, args[:-1] + (None,))


def test_bad_input():
    _, (x, qweight, scales, zeros, bits, gs, bias) = make(4, 64, (2,), 4, 32, torch.float16, bias_dtype=torch.float16)
    f = _op
    # A CPU tensor among CUDA ones: the CUDA kernel names it.
    raises(ValueError, "argument 'qweight' is on cuda.* but 'x' is on cpu", f, x.cpu(), qweight, scales, zeros, bits, gs, bias)
    raises(ValueError, "argument 'scales' is on cpu", f, x, qweight, scales.cpu(), zeros, bits, gs, bias)
    raises(ValueError, "argument 'zeros' is on cpu", f, x, qweight, scales, zeros.cpu(), bits, gs, bias)
    raises(ValueError, "argument 'bias' is on cpu", f, x, qweight, scales, zeros, bits, gs, bias.cpu())
    # Wrong dtypes.
    raises(TypeError, "'x' must be float32, float16 or bfloat16, got torch.int32", f, x.int(), qweight, scales, zeros, bits, gs, bias)
    raises(TypeError, "'qweight' must be torch.int32, got torch.int64", f, x, qweight.long(), scales, zeros, bits, gs, bias)
    raises(TypeError, "'scales' must be float32", f, x, qweight, scales.int(), zeros, bits, gs, bias)
    raises(TypeError, "'zeros' must be torch.int32 or torch.uint8, got torch.float32", f, x, qweight, scales, zeros.float(), bits, gs, bias)
    raises(TypeError, "'bias' must be float32", f, x, qweight, scales, zeros, bits, gs, bias.long())
    # Wrong values and shapes.
    raises(ValueError, "'bits' must be in", f, x, qweight, scales, zeros, 9, gs, bias)
    raises(ValueError, "'group_size' must be a positive", f, x, qweight, scales, zeros, bits, 0, bias)
    raises(ValueError, "'x' must have at least 1 dimension", f, x[0, 0], qweight, scales, zeros, bits, gs, bias)
    raises(ValueError, "'qweight' must be 2-D", f, x, qweight[0], scales, zeros, bits, gs, bias)
    raises(ValueError, "'qweight' must have 8 rows of words for K=64", f, x, qweight[:7], scales, zeros, bits, gs, bias)
    raises(ValueError, r"'scales' must have shape \[4, 2\]", f, x, qweight, scales[:, :1], zeros, bits, gs, bias)
    raises(ValueError, r"'scales' must have shape \[4, 3\]", f, x, qweight, scales, zeros, bits, 30, bias)
    raises(ValueError, "'zeros' must have the shape of 'scales'", f, x, qweight, scales, zeros[:3], bits, gs, bias)
    raises(ValueError, r"'bias' must have shape \[4\]", f, x, qweight, scales, zeros, bits, gs, bias[:3])
