"""lowbit.ops.fp8_matmul against reference.fp8_matmul and a float64 evaluation of it.

Tolerances, tightest to loosest. Every FP8 product is exact in float32, so errors come
from the summation and the four roundings of the epilogue only:

* CPU (a float32 BLAS over the exact float32 values of x and w), every element: a float32
  sum of K products in any order errs by at most (K - 1) * 2**-24 of the sum of their
  magnitudes; the two scale products and the bias add add one 2**-24 each, relative to
  mag = (|x| @ |w|^T) * |x_scale| * |w_scale| + |bias|; the output then rounds once (half
  an ulp of out_dtype). A wrong term, scale or bias errs by about mag / K or more.
* CUDA, every element: cuBLASLt's FP8 tensor cores keep partial sums at about 14 bits
  (DeepSeek-V3 report, sec. 3.3.2) and promote them to float32 at least every 128
  products, so a block of 128 errs by at most 128 * 2**-14 = 2**-7 of its magnitude:
  2**-7 * mag. Loose, but a wrong scale or bias errs by about |y|, some mag / sqrt(K).
* Everywhere, relative mean error against the reference rounded to the same out_dtype
  below 1e-3, the bar good quantized kernels reach (DESIGN.md): both round the same
  float32 value unless their sums straddle a rounding boundary, so the typical error is
  the accumulation error (~1e-5 here), far below the bar, and a systematic error (a scale
  applied twice, a bias dropped) is far above it.
"""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops
from lowbit.reference import fp8 as ref
from _helpers import misaligned, raises

F8 = torch.float8_e4m3fn
U32 = 2.0 ** -24
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Half an ulp of the output dtype, relative; and half the smallest subnormal step (fp16).
OUT_REL = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
OUT_ABS = {torch.float32: 0.0, torch.float16: 2.0 ** -25, torch.bfloat16: 0.0}

# (x shape, N): M = 1; K and N multiples of 16 (the cuBLASLt path on sm_89+); odd K and N
# (emulation); N not a multiple of 16 alone; 3-D x; a tensor-core-sized one; empty M, K, N.
SHAPES = [((1, 16), 16), ((3, 37), 5), ((17, 48), 20), ((2, 3, 64), 48), ((64, 256), 128),
          ((0, 32), 16), ((4, 0), 8), ((5, 32), 0)]


def _fp8(*shape, device):
    # Gaussian times 8 spans e4m3's normal range and some subnormals, never its 448 limit.
    return (torch.randn(*shape) * 8).to(F8).to(device)


def _x_scale(x, kind, device):
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    if kind == "tensor":
        return torch.rand((), device=device) * 0.1 + 1e-3
    if kind == "row":
        return torch.rand(*x.shape[:-1], 1, device=device) * 0.1 + 1e-3
    return torch.rand(rows, device=device) * 0.1 + 1e-3   # "row_flat": [M]


def _w_scale(n, kind, device):
    if kind == "tensor":
        return torch.rand(1, device=device) * 0.1 + 1e-3
    return torch.rand(n, device=device) * 0.1 + 1e-3


def _bias(n, kind, out_dtype, device):
    if kind is None:
        return None
    dtype = out_dtype if kind == "out" else torch.float32
    return torch.randn(n, device=device).to(dtype)


def _check(y, x, x_scale, w, w_scale, bias, out_dtype):
    n, k = w.shape
    assert y.dtype == out_dtype and y.shape == (*x.shape[:-1], n) and y.is_contiguous()
    m = 1
    for d in x.shape[:-1]:
        m *= d
    x64 = x.reshape(m, k).double()
    w64 = w.double()
    xs = x_scale.double().reshape(()) if x_scale.numel() == 1 else x_scale.double().reshape(m, 1)
    ws = w_scale.double().reshape(()) if w_scale.numel() == 1 else w_scale.double().reshape(1, n)
    y64 = (x64 @ w64.t()) * xs * ws
    mag = (x64.abs() @ w64.abs().t()) * xs.abs() * ws.abs()
    if bias is not None:
        y64 = y64 + bias.double()
        mag = mag + bias.double().abs()
    if y.device.type == "cpu":
        tol = (k + 3) * U32 * mag
    else:
        tol = 2.0 ** -7 * mag
    tol = tol + OUT_REL[out_dtype] * (y64.abs() + tol) + OUT_ABS[out_dtype]
    err = (y.reshape(m, n).double() - y64).abs()
    assert not (err > tol).any(), f"max err {float(err.max())}, worst err/tol {float((err / tol.clamp(min=1e-30)).max())}"
    r = ref.fp8_matmul(x, x_scale, w, w_scale, bias, out_dtype).double()
    denom = float(r.abs().mean()) if r.numel() else 0.0
    if denom == 0.0:
        assert torch.equal(y.double(), r)
    else:
        rel = float((y.double() - r).abs().mean()) / denom
        assert rel < 1e-3, f"relative mean error {rel}"


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("xs_kind", ["tensor", "row", "row_flat"])
@pytest.mark.parametrize("ws_kind", ["tensor", "channel"])
@pytest.mark.parametrize("bias_kind", [None, "out", "float32"])
def test_matches_reference(device, out_dtype, xs_kind, ws_kind, bias_kind):
    for x_shape, n in SHAPES:
        x = _fp8(*x_shape, device=device)
        w = _fp8(n, x_shape[-1], device=device)
        xs, ws = _x_scale(x, xs_kind, device), _w_scale(n, ws_kind, device)
        b = _bias(n, bias_kind, out_dtype, device)
        y = ops.fp8_matmul(x, xs, w, ws, b, out_dtype)
        _check(y, x, xs, w, ws, b, out_dtype)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_noncontiguous_and_misaligned(device, out_dtype):
    m, k, n = 9, 64, 32
    x = _fp8(k, m, device=device).t()          # a transposed view
    w = _fp8(k, n, device=device).t()
    xs, ws = _x_scale(x, "row", device), _w_scale(n, "channel", device)
    b = torch.randn(2 * n, device=device)[::2]   # a strided bias
    _check(ops.fp8_matmul(x, xs, w, ws, b, out_dtype), x, xs, w, ws, b, out_dtype)
    # One byte past an aligned address: cuBLASLt wants 16-byte aligned operands.
    xm, wm = misaligned(x.contiguous()), misaligned(w.contiguous())
    _check(ops.fp8_matmul(xm, xs, wm, ws, None, out_dtype), xm, xs, wm, ws, None, out_dtype)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("bias_dtype", OUT_DTYPES)
@pytest.mark.parametrize("per_row", [False, True])
def test_scales_then_bias(device, out_dtype, bias_dtype, per_row):
    # Exact small values: (16 * 0.5 * 1) * 2 * 3 + 1 = 49 in every dtype. The bias comes
    # after both scales (49, not (8 + 1) * 6 = 54), whichever path the shape takes.
    m, k, n = 3, 16, 16
    x = torch.full((m, k), 0.5, device=device).to(F8)
    w = torch.ones(n, k, device=device).to(F8)
    xs = torch.full((m, 1), 2.0, device=device) if per_row else torch.tensor(2.0, device=device)
    ws = torch.full((n,), 3.0, device=device) if per_row else torch.tensor([3.0], device=device)
    b = torch.ones(n, device=device, dtype=bias_dtype)
    y = ops.fp8_matmul(x, xs, w, ws, b, out_dtype)
    assert y.dtype == out_dtype and torch.equal(y.float(), torch.full((m, n), 49.0, device=device))


def test_nonfinite_propagates(device):
    x = _fp8(4, 32, device=device)
    x[1, 3] = float("nan")
    w = _fp8(16, 32, device=device)
    y = ops.fp8_matmul(x, torch.tensor(1.0, device=device), w, torch.tensor(1.0, device=device), None,
                       torch.float32)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()


def _bits(t):
    return t.view(torch.uint8) if t.dtype == F8 else t


def test_opcheck(device):
    x = _fp8(2, 5, 32, device=device)
    w = _fp8(16, 32, device=device)
    xs = torch.rand(2, 5, 1, device=device) + 0.1
    ws = torch.rand(16, device=device) + 0.1
    b = torch.randn(16, device=device, dtype=torch.bfloat16)
    # opcheck's test_schema compares inputs before/after with torch.allclose, which has
    # no FP8 kernel (torch 2.13): run the other checks, and test_schema's two claims (no
    # input mutated, the output aliases no input) by hand.
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    op = torch.ops.lowbit.fp8_matmul.default
    for args in ((x, xs, w, ws, b, torch.bfloat16), (x, xs[0, 0], w, ws[:1], None, torch.float32)):
        opcheck(op, args, test_utils=utils)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        before = [_bits(a).clone() for a in tensors]
        out = op(*args)
        assert all(torch.equal(_bits(a), b) for a, b in zip(tensors, before))
        assert out.untyped_storage().data_ptr() not in [a.untyped_storage().data_ptr() for a in tensors]


def test_bad_input(check_device):
    d = check_device
    x = torch.zeros(4, 32, device=d).to(F8)
    w = torch.zeros(16, 32, device=d).to(F8)
    xs = torch.ones(4, 1, device=d)
    ws = torch.ones(16, device=d)
    f = ops.fp8_matmul
    raises(TypeError, "'x' must be torch.float8_e4m3fn, got torch.float8_e5m2", f, x.to(torch.float8_e5m2), xs, w, ws)
    raises(TypeError, "'x' must be torch.float8_e4m3fn, got torch.int8", f, x.view(torch.int8), xs, w, ws)
    raises(ValueError, "'x' must have at least 1 dimension", f, x[0, 0], xs, w, ws)
    raises(TypeError, "'w' must be torch.float8_e4m3fn, got torch.bfloat16", f, x, xs, w.bfloat16(), ws)
    raises(ValueError, r"'w' must be 2-D, got shape \[1, 16, 32\]", f, x, xs, w[None], ws)
    raises(TypeError, "'x_scale' must be torch.float32, got torch.float16", f, x, xs.half(), w, ws)
    raises(TypeError, "'w_scale' must be torch.float32, got torch.float64", f, x, xs, w, ws.double())
    raises(TypeError, "'out_dtype' must be torch.float32, torch.float16 or torch.bfloat16, got torch.float64",
           f, x, xs, w, ws, None, torch.float64)
    raises(ValueError, r"'x' must have last dimension K = 32 \(the columns of 'w' \[16, 32\]\), got shape \[4, 16\]",
           f, x[:, :16], xs, w, ws)
    raises(ValueError, r"'x_scale' must hold one value \(per-tensor\) or one per row of 'x', shape \[4, 1\]; got \[4, 2\]",
           f, x, torch.ones(4, 2, device=d), w, ws)
    raises(ValueError, r"'x_scale' must hold one value .* got \[3\]", f, x, torch.ones(3, device=d), w, ws)
    raises(ValueError, r"'w_scale' must hold one value \(per-tensor\) or one per output channel, shape \[16\]; got \[16, 1\]",
           f, x, xs, w, ws[:, None])
    raises(TypeError, "'bias' must be float32, float16 or bfloat16, got torch.float64",
           f, x, xs, w, ws, torch.zeros(16, device=d, dtype=torch.float64))
    raises(ValueError, r"'bias' must have shape \[16\], got \[1, 16\]", f, x, xs, w, ws, torch.zeros(1, 16, device=d))
    if d != "meta":
        raises(ValueError, "'w' is on meta but 'x' is on", f, x, xs, w.to("meta"), ws)
        raises(ValueError, "'bias' is on meta but 'x' is on", f, x, xs, w, ws, torch.zeros(16, device="meta"))
