"""lowbit.nn.QuantLinear: construction from a Linear, exact grid, forward against the
dequantized-weight matmul, state_dict round trip, bad configurations."""
import io

import pytest
import torch
from torch import nn

import lowbit
from lowbit import reference as ref
from lowbit.nn import QuantLinear
from _helpers import FLOAT_DTYPES, random_weight

# (bits, group_size, symmetric) over every preset family; K=172 makes g32/g64/g128 ragged.
SCHEMES = [(8, None, True), (4, 128, True), (4, 32, False), (4, None, False), (3, 64, False),
           (2, 16, False), (5, 7, True), (6, 32, True), (7, 1, False)]


def _linear(n, k, bias=True, dtype=torch.float32, device="cpu"):
    lin = nn.Linear(k, n, bias=bias, dtype=dtype, device=device)
    with torch.no_grad():
        lin.weight.copy_(random_weight(n, k, dtype, device))
        if bias:
            lin.bias.normal_()
    return lin


def _err_scale(q: QuantLinear) -> torch.Tensor:
    """s * (q + z) per weight, float64 [N, K]: what a kernel that sums s*q and s*z apart
    rounds against (the error bound documented in lowbit.reference.matmul). In the input
    order, so also for act-order layers (groups of input features through ``g_idx``)."""
    k = q.in_features
    if q.perm is None:
        s = ref.expand_groups(q.scales.t().double(), k, q.group_size)
        z = ref.expand_groups(q.zeros.t().double(), k, q.group_size)
    else:
        s = q.scales.t().double()[:, q.g_idx.long()]
        z = q.zeros.t().double()[:, q.g_idx.long()]
    return s * (q.codes().double() + z)


@pytest.mark.parametrize("bits,group,sym", SCHEMES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_from_linear_is_rtn_on_stored_scales(bits, group, sym, scale_dtype, device):
    lin = _linear(48, 172, device=device)
    q = QuantLinear.from_linear(lin, bits, group, sym, scale_dtype)
    g = 172 if group is None else group
    # The reference grid, with scales rounded to the stored dtype before the codes.
    s, z = ref.quant_params(lin.weight.detach(), bits, g, sym)
    s = s.clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    codes = ref.quantize(lin.weight.detach(), s.float(), z, bits, g)
    assert torch.equal(q.codes(), codes)
    assert torch.equal(q.scales, s.t()) and torch.equal(q.zeros, z.t().to(torch.uint8))
    assert torch.equal(q.dequantize(), ref.dequantize(codes, s.float(), z, g))
    assert q.qweight.shape == (ref.packed_rows(172, bits), 48) and q.qweight.dtype == torch.int32
    assert torch.equal(q.bias, lin.bias)
    if scale_dtype == torch.float32:   # float32 scales: exactly lowbit.rtn_quantize
        assert torch.equal(q.codes(), lowbit.rtn_quantize(lin.weight.detach(), bits, group, sym).codes)


@pytest.mark.parametrize("bits,group,sym", SCHEMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (5,), (2, 3), (0,), (70,)])
def test_forward_matches_dequantized_matmul(bits, group, sym, dtype, shape, device):
    lin = _linear(40, 172, dtype=dtype, device=device)
    q = QuantLinear.from_linear(lin, bits, group, sym)
    x = torch.randn(*shape, 172, dtype=dtype, device=device)
    y = q(x)
    assert y.shape == (*shape, 40) and y.dtype == dtype
    w = q.dequantize(torch.float32).double()   # exact: (q - z) * s is representable
    want = x.double() @ w.t() + q.bias.double()
    # fp32 accumulation over K=172 terms (kernels may sum s*q and s*z apart: the bound
    # documented in lowbit.reference.matmul), then one rounding to the output dtype.
    bound = (x.double().abs() @ _err_scale(q).t() + q.bias.double().abs()) * 172 * 2**-24
    if dtype != torch.float32:
        bound = bound + want.abs() * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    assert ((y.double() - want).abs() <= bound + 1e-30).all()


def test_no_bias_and_per_channel(device):
    lin = _linear(16, 64, bias=False, device=device)
    q = QuantLinear.from_linear(lin, 8, None, True)
    assert q.bias is None and q.per_channel and q.group_size == 64 and q.scales.shape == (1, 16)
    x = torch.randn(3, 64, device=device)
    w = q.dequantize().double()
    # fp32 accumulation over K=64 terms, bounded as in lowbit.reference.matmul (the weights'
    # rows vary in scale by e^N(0,1), so a fixed atol would be flaky).
    bound = (x.double().abs() @ _err_scale(q).t()) * 64 * 2**-24
    assert ((q(x).double() - x.double() @ w.t()).abs() <= bound).all()
    assert "per-channel" in repr(q)


def test_state_dict_round_trip(device):
    lin = _linear(33, 100, device=device)
    q = QuantLinear.from_linear(lin, 4, 32, False)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = QuantLinear(100, 33, bias=True, bits=4, group_size=32, symmetric=False, device=device)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for name, t in q.state_dict().items():
        assert torch.equal(t, fresh.state_dict()[name]), name
    x = torch.randn(4, 100, device=device)
    assert torch.equal(q(x), fresh(x))
    assert set(q.state_dict()) == {"qweight", "scales", "zeros", "bias"}
    # A layer built for another grid refuses the tensors.
    other = QuantLinear(100, 33, bits=4, group_size=64, device=device)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(q.state_dict())


def test_nbytes():
    q = QuantLinear.from_linear(_linear(64, 256), 4, 128, True)
    # codes 4 bits, fp16 scale + uint8 zero per group of 128, fp32 bias
    assert q.nbytes == 64 * 256 // 2 + 64 * 2 * (2 + 1) + 64 * 4


@pytest.mark.parametrize("kw,match", [
    (dict(bits=4, group_size=128), "group_size 128 is larger than in_features 64"),
    (dict(bits=9), "bits must be one of"), (dict(bits=1), "bits must be one of"),
    (dict(group_size=0), "group_size must be a positive"),
])
def test_bad_configuration(kw, match):
    lin = _linear(8, 64)
    with pytest.raises(ValueError, match=match):
        QuantLinear.from_linear(lin, **kw)
    with pytest.raises(ValueError, match=match):
        QuantLinear(64, 8, **kw)


def test_tiny_groups_do_not_underflow_float16_scales():
    lin = _linear(4, 64)
    with torch.no_grad():
        lin.weight[1] *= 1e-9
    q = QuantLinear.from_linear(lin, 4, 32, True, torch.float16)
    assert (q.scales > 0).all()
    err = (q.dequantize() - lin.weight).abs()
    assert err[1].max() <= lin.weight[1].abs().max() and err[0].max() <= q.scales[:, 0].max()


def test_scale_dtype_overflow_is_clear():
    lin = _linear(4, 32)
    with torch.no_grad():
        lin.weight[0, 0] = 1e30
    with pytest.raises(ValueError, match="use scale_dtype=torch.float32"):
        QuantLinear.from_linear(lin, 4, 32, True, torch.float16)
    QuantLinear.from_linear(lin, 4, 32, True, torch.float32)


def test_from_codes_checks_shapes():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"scales and zeros must be \[8, 2\]"):
        QuantLinear.from_codes(codes, torch.ones(8, 4), torch.zeros(8, 4, dtype=torch.int32), 4, 32)


def test_from_codes_checks_zero_range():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"zeros must be in \[0, 15\] for bits=4, got values in \[-1, 8\]"):
        QuantLinear.from_codes(codes, torch.ones(8, 2), torch.tensor([[8, -1]] * 8, dtype=torch.int32), 4, 32)
    with pytest.raises(ValueError, match=r"must be < 2\*\*bits|out of range|code"):
        QuantLinear.from_codes(codes | 16, torch.ones(8, 2), torch.full((8, 2), 8, dtype=torch.int32), 4, 32)


def test_float64_weight_names_the_layer():
    model = nn.Sequential(nn.Linear(64, 8).double())
    with pytest.raises(TypeError, match="layer '0' has a torch.float64 weight"):
        lowbit.quantize(model, "W4A16-g32", progress=False)


# -- act order (perm) ----------------------------------------------------------------------

def _act_order(n, k, bits, group, sym, dtype=torch.float32, device="cpu", bias=True):
    """(layer with perm, the same grid without perm, perm): RTN of the weight's permuted
    columns, stored in the permuted order as act-order GPTQ stores them."""
    lin = _linear(n, k, bias=bias, dtype=dtype, device=device)
    perm = torch.randperm(k, device=device)
    permuted = nn.Linear(k, n, bias=bias, dtype=dtype, device=device)
    with torch.no_grad():
        permuted.weight.copy_(lin.weight[:, perm])
        if bias:
            permuted.bias.copy_(lin.bias)
    plain = QuantLinear.from_linear(permuted, bits, group, sym)
    q = QuantLinear.from_codes(plain.codes(), plain.scales.t(), plain.zeros.t(), bits, group, symmetric=sym,
                               bias=plain.bias, perm=perm)
    return q, plain, perm


@pytest.mark.parametrize("bits,group,sym", SCHEMES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (2, 3), (0,), (70,)])
def test_act_order_forward_matches_dequantized_matmul(bits, group, sym, dtype, shape, device):
    q, plain, perm = _act_order(40, 172, bits, group, sym, dtype, device)
    assert q.perm.dtype == torch.int64 and torch.equal(q.perm, perm)
    # codes() and dequantize() are in the input order: stored column j is input feature perm[j].
    assert torch.equal(q.codes()[:, perm], plain.codes())
    assert torch.equal(q.dequantize()[:, perm], plain.dequantize())
    x = torch.randn(*shape, 172, dtype=dtype, device=device)
    y = q(x)
    assert y.shape == (*shape, 40) and y.dtype == dtype
    want = x.double() @ q.dequantize(torch.float32).double().t() + q.bias.double()
    bound = (x.double().abs() @ _err_scale(q).t() + q.bias.double().abs()) * 172 * 2**-24
    if dtype != torch.float32:
        bound = bound + want.abs() * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    assert ((y.double() - want).abs() <= bound + 1e-30).all()
    # The same layer as the unpermuted grid fed the permuted input, bit for bit.
    assert torch.equal(y, plain(x[..., perm]))


def test_identity_perm_is_no_perm(device):
    lin = _linear(24, 64, device=device)
    plain = QuantLinear.from_linear(lin, 4, 32, False)
    q = QuantLinear.from_codes(plain.codes(), plain.scales.t(), plain.zeros.t(), 4, 32, bias=plain.bias,
                               perm=torch.arange(64, dtype=torch.int32))
    x = torch.randn(5, 64, device=device)
    assert torch.equal(q(x), plain(x)) and torch.equal(q.dequantize(), plain.dequantize())
    assert torch.equal(q.g_idx, plain.g_idx) and q.perm.device == plain.qweight.device


@pytest.mark.parametrize("k,group", [(10, 4), (172, 64), (64, None), (7, 1)])
def test_g_idx(k, group, device):
    q, plain, perm = _act_order(6, k, 4, group, False, device=device)
    g = k if group is None else group
    assert plain.perm is None and plain.g_idx.dtype == torch.int32 and plain.g_idx.shape == (k,)
    assert torch.equal(plain.g_idx.long(), torch.arange(k, device=device) // g)
    assert q.g_idx.dtype == torch.int32 and q.g_idx.device == q.qweight.device
    for j in range(k):    # stored column j is input feature perm[j], in group j // group_size
        assert q.g_idx[perm[j]] == j // g
    # g_idx names the scale and zero point that dequantize() uses for each input feature.
    gi = q.g_idx.long()
    want = (q.codes().float() - q.zeros.t()[:, gi].float()) * q.scales.t()[:, gi].float()
    assert torch.equal(q.dequantize(), want)


def test_act_order_state_dict_round_trip(device):
    q, _, perm = _act_order(33, 100, 4, 32, False, device=device)
    sd = q.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "bias", "perm"} and torch.equal(sd["perm"], perm)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    # A layer built without perm takes it from the state dict.
    fresh = QuantLinear(100, 33, bias=True, bits=4, group_size=32, symmetric=False, device=device)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.perm is not None and fresh.perm.dtype == torch.int64 and torch.equal(fresh.perm, perm)
    x = torch.randn(4, 100, device=device)
    assert torch.equal(q(x), fresh(x))
    assert torch.equal(q.g_idx, fresh.g_idx) and torch.equal(q.dequantize(), fresh.dequantize())
    assert q.nbytes == QuantLinear.from_linear(_linear(33, 100), 4, 32, False).nbytes + 100 * 8
    assert "act_order=True" in repr(q)
    # A layer that has a perm refuses a state dict without one.
    with pytest.raises(RuntimeError, match="Missing key.*perm"):
        fresh.load_state_dict({k: v for k, v in sd.items() if k != "perm"})


def test_from_codes_checks_perm():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    s, z = torch.ones(8, 2), torch.full((8, 2), 8, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"perm must be \[64\] for codes \[8, 64\], got \[63\]"):
        QuantLinear.from_codes(codes, s, z, 4, 32, perm=torch.arange(63))
    bad = torch.arange(64)
    bad[3] = 5
    with pytest.raises(ValueError, match="perm must be a permutation of 0..63"):
        QuantLinear.from_codes(codes, s, z, 4, 32, perm=bad)
    with pytest.raises(ValueError, match="perm must be a permutation of 0..63"):
        QuantLinear.from_codes(codes, s, z, 4, 32, perm=torch.arange(1, 65))
    with pytest.raises(TypeError, match="perm must be an integer tensor"):
        QuantLinear.from_codes(codes, s, z, 4, 32, perm=torch.arange(64.0))


@pytest.mark.parametrize("m", [1, 64])
def test_forward_outside_no_grad(device, m):
    """A quantized model called without torch.no_grad (a notebook's plain model(x)): the
    input requires grad; the op has no autograd formula, but the call must work (it used
    to fail inside the CPU kernel's out= GEMM)."""
    q = QuantLinear.from_linear(_linear(48, 64), 4, 32).to(device)
    x = torch.randn(m, 64, device=device, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y.detach(), x.detach() @ q.dequantize().t() + q.bias, rtol=1e-4, atol=1e-4)
