"""lowbit.ops.int8_matmul against reference.int8_matmul: bit for bit.

The tolerance is zero, and that is derived, not hoped for: the int32 accumulator is exact
on every path (integer sums; K <= 131071 keeps them inside int32), and the epilogue is the
reference's three float32 operations in the reference's order, each correctly rounded
(the CPU build has -ffp-contract=off; the CUDA kernel uses __fmul_rn / __fadd_rn, which
nvcc never fuses into an FMA), then one round-to-nearest-even cast that is the same
function on both sides. Two correctly rounded results of the same operations on the same
operands are the same float. A kernel that fused ``* w_scale + bias`` into an FMA would
be off by up to one float32 ulp before the cast and fail here: that is intended, it
would no longer be the specified function.
"""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops
from lowbit.reference.matmul import INT8_MATMUL_MAX_K, int8_matmul as ref_int8_matmul
from _helpers import FLOAT_DTYPES, bits_equal, misaligned, raises

CPU_ISAS = ["amx", "avx512vnni", "avxvnni", "avx2", "scalar"]


def _codes(*shape, device="cpu"):
    return torch.randint(-128, 128, shape, dtype=torch.int8, device=device)


def _scales(n, device, per_tensor=False):
    if per_tensor:
        return torch.rand((), device=device) * 0.05 + 1e-4
    return torch.rand(n, device=device) * 0.05 + 1e-4


def _check(x, xs, w, ws, bias=None, out_dtype=torch.float16):
    y = ops.int8_matmul(x, xs, w, ws, bias, out_dtype)
    r = ref_int8_matmul(x, xs, w, ws, bias, out_dtype)
    assert y.dtype == out_dtype and y.shape == (*x.shape[:-1], w.shape[0]) and y.is_contiguous()
    assert bits_equal(y, r), f"max |diff| {float((y.float() - r.float()).abs().max()) if y.numel() else 0}"
    return y


# (M, N, K): K below, at and past one 64-byte block, K = 1 and an odd K; N below one
# panel of 64 channels, one and a ragged second; M from 1 through several row tiles.
SHAPES = [(1, 1, 1), (3, 5, 7), (17, 65, 130), (40, 129, 64), (33, 64, 200), (70, 200, 300),
          (2, 16, 63), (64, 33, 65), (129, 70, 256)]


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(device, out_dtype, shape):
    m, n, k = shape
    x, w = _codes(m, k, device=device), _codes(n, k, device=device)
    xs = torch.rand(m, 1, device=device) * 0.05 + 1e-4
    bias_dtype = FLOAT_DTYPES[(m + n) % 3]
    for bias in (None, torch.randn(n, device=device).to(bias_dtype) * 3):
        _check(x, xs, w, _scales(n, device), bias, out_dtype)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("m", [1, 5, 6, 7, 31, 32, 33, 100])
def test_cpu_kernels(monkeypatch, isa, m):
    """Every CPU kernel (the env var caps the dispatch; on a CPU without the ISA this runs
    the next one down). Row counts around each kernel's row tile (6, 4, 2, 32)."""
    monkeypatch.setenv("LOWBIT_INT8_MATMUL_ISA", isa)
    for n, k in [(64, 64), (100, 200), (7, 1), (130, 129)]:
        x, w = _codes(m, k), _codes(n, k)
        xs = torch.rand(m, 1) * 0.05
        _check(x, xs, w, _scales(n, "cpu"), torch.randn(n), torch.bfloat16)
        _check(x, xs, w, _scales(n, "cpu", per_tensor=True), None, torch.float32)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_kernels_shared_panels(monkeypatch, isa):
    """Enough rows x K for several row blocks: the weight is packed once and shared."""
    monkeypatch.setenv("LOWBIT_INT8_MATMUL_ISA", isa)
    m, n, k = 150, 70, 20000
    x, w = _codes(m, k), _codes(n, k)
    _check(x, torch.rand(m) * 1e-3, w, _scales(n, "cpu"), torch.randn(n).half(), torch.float16)


def test_scale_layouts(device):
    """x_scale per row as [..., 1] or [M] or one value (0-d, [1], [1, 1]); w_scale [N] or one."""
    x, w = _codes(2, 3, 40, device=device), _codes(24, 40, device=device)
    ws = _scales(24, device)
    row = torch.rand(2, 3, 1, device=device) + 0.01
    for xs in (row, row.reshape(6), torch.rand((), device=device), torch.rand(1, device=device),
               torch.rand(1, 1, device=device)):
        _check(x, xs, w, ws)
    for ws2 in (torch.rand((), device=device), torch.rand(1, device=device)):
        _check(x, row, w, ws2, torch.randn(24, device=device))
    # A strided per-row scale (a column of a wider tensor) and a strided w_scale.
    wide = torch.rand(6, 3, device=device)
    _check(x.reshape(6, 40), wide[:, 1:2], w, torch.rand(48, device=device)[::2])


def test_leading_dims_and_strides(device):
    w = _codes(48, 96, device=device)
    ws = _scales(48, device)
    y = _check(_codes(96, device=device), torch.rand((), device=device), w, ws)   # 1-D x: y is [N]
    assert y.shape == (48,)
    for x in [_codes(96, 5, device=device).t(),             # column-major rows
              _codes(4, 192, device=device)[:, ::2],        # strided last dim
              _codes(96, 2, 3, device=device).permute(1, 2, 0),
              _codes(1, 96, device=device).expand(3, 96),
              misaligned(_codes(5, 96, device=device))]:
        rows = x.numel() // 96
        _check(x, torch.rand(*x.shape[:-1], 1, device=device), w, ws)
        _check(x.reshape(rows, 96), torch.rand(rows, device=device), w, ws, None, torch.bfloat16)
    x = _codes(7, 96, device=device)
    for w2 in [_codes(96, 48, device=device).t(), misaligned(w), _codes(48, 192, device=device)[:, 1::2]]:
        _check(x, torch.rand(7, 1, device=device), w2, ws, torch.randn(48, device=device), torch.float32)


@pytest.mark.parametrize("m", [1, 16, 33, 64, 65, 200, 300])
def test_row_counts(device, m):
    """Row counts around the CUDA kernel's tile sizes and its two configurations."""
    n, k = 136, 272
    x, w = _codes(m, k, device=device), _codes(n, k, device=device)
    _check(x, torch.rand(m, 1, device=device) * 0.01, w, _scales(n, device), torch.randn(n, device=device),
           torch.bfloat16)


@pytest.mark.parametrize("k", [1, 15, 16, 17, 31, 48, 100, 4096, 4097])
def test_k_tails(device, k):
    """K that is and is not a multiple of 16 (a tensor-core step) and of 64 (a CPU block)."""
    x, w = _codes(19, k, device=device), _codes(70, k, device=device)
    _check(x, torch.rand(19, 1, device=device) * 0.01, w, _scales(70, device), None, torch.float32)


@pytest.mark.parametrize("m", [5, 64])
@pytest.mark.parametrize("k", [1000, 1001, 2064])
def test_split_k(device, m, k):
    """Few rows and a long K: CUDA splits K across CTAs and adds int32 partial sums (exact
    in any order), then applies the epilogue; chunk edges land mid-tile for odd K."""
    n = 70
    x, w = _codes(m, k, device=device), _codes(n, k, device=device)
    for out_dtype in FLOAT_DTYPES:
        _check(x, torch.rand(m, 1, device=device) * 0.01, w, _scales(n, device), torch.randn(n, device=device),
               out_dtype)


def test_extreme_accumulator(device):
    """The largest K: every product 128 * 128 (and -128 * 127), the sums at the edge of int32."""
    k = INT8_MATMUL_MAX_K
    x = torch.full((3, k), -128, dtype=torch.int8, device=device)
    x[1] = 127
    w = torch.full((2, k), -128, dtype=torch.int8, device=device)
    xs, ws = torch.ones(3, 1, device=device), torch.ones(2, device=device)
    y = _check(x, xs, w, ws, None, torch.float32)
    assert y[0, 0] == float(128 * 128 * k) and y[1, 0] == float(-128 * 127 * k)


def test_k_too_large(device):
    k = INT8_MATMUL_MAX_K + 1
    x, w = torch.zeros(1, k, dtype=torch.int8, device=device), torch.zeros(2, k, dtype=torch.int8, device=device)
    one = torch.ones((), device=device)
    raises(ValueError, r"K = 131072 is too large: the int32 accumulator is exact only for K <= 131071",
           ops.int8_matmul, x, one, w, one)
    raises(ValueError, "K = 131072 is too large", ref_int8_matmul, x, one, w, one)


def test_nonfinite_scales(device):
    x, w = _codes(4, 32, device=device), _codes(8, 32, device=device)
    xs, ws = torch.rand(4, 1, device=device), torch.rand(8, device=device)
    for bad in (float("nan"), float("inf"), -float("inf")):
        xs2 = xs.clone()
        xs2[2, 0] = bad
        raises(ValueError, r"'x_scale' holds NaN or Inf \(element 2\)", ops.int8_matmul, x, xs2, w, ws)
        ws2 = ws.clone()
        ws2[5] = bad
        raises(ValueError, r"'w_scale' holds NaN or Inf \(element 5\)", ops.int8_matmul, x, xs, w, ws2)
        raises(ValueError, "'w_scale' holds NaN or Inf", ref_int8_matmul, x, xs, w, ws2)
        raises(ValueError, r"'x_scale' holds NaN or Inf \(element 0\)", ops.int8_matmul, x,
               torch.tensor(bad, device=device), w, ws)


def test_empty(device):
    # K = 0: the sum is empty, y = 0 * scales (+ bias); M = 0 and N = 0: empty outputs.
    x, w = torch.zeros(3, 0, dtype=torch.int8, device=device), torch.zeros(5, 0, dtype=torch.int8, device=device)
    xs, ws, bias = torch.rand(3, 1, device=device), torch.rand(5, device=device), torch.randn(5, device=device)
    assert torch.equal(_check(x, xs, w, ws), torch.zeros(3, 5, device=device, dtype=torch.float16))
    assert torch.equal(_check(x, xs, w, ws, bias, torch.float32), bias.expand(3, 5))
    assert _check(_codes(2, 64, device=device), torch.rand(2, 1, device=device),
                  torch.zeros(0, 64, dtype=torch.int8, device=device), torch.rand(0, device=device)).shape == (2, 0)
    assert _check(_codes(0, 4, 64, device=device), torch.rand(0, 4, 1, device=device),
                  _codes(7, 64, device=device), _scales(7, device)).shape == (0, 4, 7)
    assert _check(_codes(0, 64, device=device), torch.rand((), device=device),
                  _codes(7, 64, device=device), _scales(7, device)).shape == (0, 7)


def test_llama_shape(device):
    n, k = 256, 4096
    w, ws = _codes(n, k, device=device), _scales(n, device)
    for m in (1, 16, 64):
        x = _codes(m, k, device=device)
        _check(x, torch.rand(m, 1, device=device) * 0.01, w, ws, torch.randn(n, device=device).bfloat16(),
               torch.bfloat16)


def test_approximates_float_linear(device):
    """End to end with per-token activations: close to the float layer (a sanity check of
    the meaning, not of the kernel: the reference comparisons above are exact)."""
    x = torch.randn(32, 512, device=device)
    wf = torch.randn(64, 512, device=device) * 0.05
    ws = wf.abs().amax(dim=1) / 127
    w = torch.round(wf / ws[:, None]).clamp(-128, 127).to(torch.int8)
    xq, xs = ops.quantize_per_token_int8(x)
    y = ops.int8_matmul(xq, xs, w, ws, None, torch.float32)
    exact = x @ wf.t()
    # Two 8-bit roundings of Gaussian data: about 40 dB; 30 dB leaves room for the draw.
    sqnr = 20 * torch.log10(exact.norm() / (y - exact).norm())
    assert sqnr > 30, float(sqnr)


def test_opcheck(device):
    for m, bias, out_dtype, per_tensor in [(1, False, torch.float16, False), (5, True, torch.bfloat16, True),
                                           (40, True, torch.float32, False)]:
        x, w = _codes(m, 100, device=device), _codes(20, 100, device=device)
        xs = torch.rand((), device=device) if per_tensor else torch.rand(m, 1, device=device)
        b = torch.randn(20, device=device) if bias else None
        opcheck(torch.ops.lowbit.int8_matmul.default, (x, xs, w, _scales(20, device, per_tensor), b, out_dtype))
    opcheck(torch.ops.lowbit.int8_matmul.default,
            (_codes(2, 3, 100, device=device), torch.rand(2, 3, 1, device=device), _codes(20, 100, device=device),
             _scales(20, device), None, torch.float16))


def test_bad_input(check_device):
    d = check_device
    other = "cpu" if d == "meta" else "meta"
    x, w = torch.zeros(3, 64, dtype=torch.int8, device=d), torch.zeros(16, 64, dtype=torch.int8, device=d)
    xs, ws = torch.ones(3, 1, device=d), torch.ones(16, device=d)
    f = ops.int8_matmul
    raises(TypeError, "'x' must be torch.int8, got torch.float32", f, x.float(), xs, w, ws)
    raises(TypeError, "'x' must be torch.int8, got torch.uint8", f, x.to(torch.uint8), xs, w, ws)
    raises(ValueError, "'x' must have at least 1 dimension", f, x[0, 0], xs, w, ws)
    raises(TypeError, "'w' must be torch.int8, got torch.int32", f, x, xs, w.int(), ws)
    raises(ValueError, r"'w' must be 2-D, got shape \[16, 64, 1\]", f, x, xs, w[..., None], ws)
    raises(TypeError, "'x_scale' must be torch.float32, got torch.float16", f, x, xs.half(), w, ws)
    raises(TypeError, "'w_scale' must be torch.float32, got torch.bfloat16", f, x, xs, w, ws.bfloat16())
    raises(TypeError, "'out_dtype' must be torch.float32, torch.float16 or torch.bfloat16, got torch.float64",
           f, x, xs, w, ws, None, torch.float64)
    raises(ValueError, r"'x' must have last dimension K = 64 \(the columns of 'w' \[16, 64\]\), got shape \[3, 32\]",
           f, x[:, :32], xs, w, ws)
    raises(ValueError, r"'x_scale' must hold one value \(per-tensor\) or one per row of 'x', shape \[3, 1\]; got \[2, 1\]",
           f, x, xs[:2], w, ws)
    raises(ValueError, r"'x_scale' must hold one value .* shape \[3, 1\]; got \[1, 3\]", f, x, xs.t(), w, ws)
    raises(ValueError, r"'x_scale' must hold one value .* shape \[1, 3, 1\]; got \[3, 1\]", f, x[None], xs, w, ws)
    raises(ValueError, r"'w_scale' must hold one value \(per-tensor\) or one per output channel, shape \[16\]; "
           r"got \[15\]", f, x, xs, w, ws[:15])
    raises(ValueError, r"'w_scale' must hold one value .* got \[16, 1\]", f, x, xs, w, ws[:, None])
    raises(TypeError, "'bias' must be float32, float16 or bfloat16, got torch.int32", f, x, xs, w, ws,
           torch.zeros(16, dtype=torch.int32, device=d))
    raises(ValueError, r"'bias' must have shape \[16\], got \[15\]", f, x, xs, w, ws, torch.zeros(15, device=d))
    raises(ValueError, r"'bias' must have shape \[16\], got \[1, 16\]", f, x, xs, w, ws, torch.zeros(1, 16, device=d))

    def on_other(t):
        return torch.zeros_like(t, device=other)

    raises(ValueError, f"'w' is on {other}", f, x, xs, on_other(w), ws)
    raises(ValueError, f"'x_scale' is on {other}", f, x, on_other(xs), w, ws)
    raises(ValueError, f"'w_scale' is on {other}", f, x, xs, w, on_other(ws))
    raises(ValueError, f"'bias' is on {other}", f, x, xs, w, ws, torch.zeros(16, device=other))


def test_meta_shapes():
    w = torch.empty(48, 100, dtype=torch.int8, device="meta")
    ws = torch.empty(48, device="meta")
    for shape in [(100,), (7, 100), (2, 3, 100), (0, 100)]:
        x = torch.empty(shape, dtype=torch.int8, device="meta")
        xs = torch.empty(*shape[:-1], 1, device="meta")
        for out_dtype in FLOAT_DTYPES:
            y = ops.int8_matmul(x, xs, w, ws, None, out_dtype)
            assert y.shape == (*shape[:-1], 48) and y.dtype == out_dtype and y.device.type == "meta"
