"""QuantLinear in the tensor-core (mma) layout: pack_mma_ keeps the layer's function,
its state_dict stays in the GPTQ layout both ways, act-order layers, layers the layout
cannot hold, and lowbit.nn.pack_mma on a model."""
import io

import pytest
import torch
from torch import nn

from lowbit import nn as lnn
from lowbit import reference as ref
from lowbit.nn import QuantLinear
from _helpers import random_weight


def _layer(n, k, bits, group, sym, device, bias=True, dtype=torch.float32):
    lin = nn.Linear(k, n, bias=bias, dtype=dtype, device=device)
    with torch.no_grad():
        lin.weight.copy_(random_weight(n, k, dtype, device))
        if bias:
            lin.bias.normal_()
    return QuantLinear.from_linear(lin, bits, group, sym)


def _assert_close(y, want, x, q, extra_rel=0.0):
    """|y - want| <= 2 K u32 (|x| @ |W|^T + |b|) + extra_rel |want|: float32 sums of K
    terms in any order (u32 = 2**-24), plus an output rounding where there is one."""
    k = x.shape[-1]
    mag = x.double().abs() @ q.dequantize().double().abs().t()
    if q.bias is not None:
        mag = mag + q.bias.double().abs()
    tol = 2 * (k + 8) * 2.0**-24 * mag + extra_rel * want.double().abs() + 1e-30
    err = (y.double() - want.double()).abs()
    assert (err <= tol).all(), f"max err {err.max().item():.3g}, worst err/tol {(err / tol).max().item():.3g}"


def _copy(q: QuantLinear) -> QuantLinear:
    c = QuantLinear(q.in_features, q.out_features, bias=q.bias is not None, bits=q.bits,
                    group_size=None if q.per_channel else q.group_size, symmetric=q.symmetric,
                    scale_dtype=q.scales.dtype, device=q.qweight.device)
    c.load_state_dict(q.state_dict())
    return c


@pytest.mark.parametrize("bits,group,sym", [(4, 128, True), (4, 32, False), (8, None, True), (8, 64, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_keeps_the_function(bits, group, sym, dtype, device):
    q = _layer(192, 256, bits, group, sym, device)
    plain = _copy(q)
    codes, w = q.codes(), q.dequantize()
    assert q.pack_mma_() and q.layout == "mma" and "layout=mma" in repr(q)
    assert q.qweight.shape == (256 // 16, 192 * bits // 2) and q.zeros.dtype == torch.uint8
    # codes() / dequantize() answer in the input order whatever the layout.
    assert torch.equal(q.codes(), codes) and torch.equal(q.dequantize(), w)
    for shape in [(1,), (3, 5), (0,), (70,)]:
        x = torch.randn(*shape, 256, device=device).to(dtype)
        y = q(x)
        assert y.shape == (*shape, 192) and y.dtype == dtype
        # The spec of mma_matmul on the same tensors, and the GPTQ-layout layer's result.
        want = ref.mma_matmul(x, q.qweight, q.scales, q.zeros, bits, q.group_size, q.bias,
                              accumulate=torch.float64, out_dtype=torch.float64)
        rounding = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
        _assert_close(y, want, x, q, rounding)
        if dtype == torch.float32:
            _assert_close(y, plain(x), x, q, 0.0)


def test_state_dict_stays_gptq(device):
    q = _layer(128, 64, 4, 32, False, device)
    sd_before = {k: v.clone() for k, v in q.state_dict().items()}
    q.pack_mma_()
    sd = q.state_dict()
    assert sd.keys() == sd_before.keys()
    for k, v in sd_before.items():
        assert torch.equal(sd[k], v), k
    # torch.save / load into a fresh layer, and into a packed one (it re-packs after loading).
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = _copy(_layer(128, 64, 4, 32, False, device))
    fresh.load_state_dict(loaded)
    x = torch.randn(4, 64, device=device)
    packed = _layer(128, 64, 4, 32, False, device)
    packed.pack_mma_()
    packed.load_state_dict(loaded)
    assert packed.layout == "mma"
    _assert_close(packed(x), fresh(x), x, fresh)
    assert torch.equal(packed.codes(), fresh.codes())


def test_scales_dtype_option(device):
    q = _layer(64, 64, 4, 16, True, device)
    assert q.pack_mma_(torch.bfloat16) and q.scales.dtype == torch.bfloat16
    assert q.pack_mma_(torch.float16) and q.scales.dtype == torch.float16   # already packed: only the dtype


def test_act_order(device):
    k, n = 128, 64
    lin = nn.Linear(k, n, device=device)
    perm = torch.randperm(k, device=device)
    permuted = nn.Linear(k, n, device=device)
    with torch.no_grad():
        permuted.weight.copy_(lin.weight[:, perm])
        permuted.bias.copy_(lin.bias)
    plain = QuantLinear.from_linear(permuted, 4, 32, False)
    q = QuantLinear.from_codes(plain.codes(), plain.scales.t(), plain.zeros.t(), 4, 32, bias=plain.bias, perm=perm)
    x = torch.randn(7, k, device=device)
    y0 = q(x)
    assert q.pack_mma_()
    _assert_close(q(x), y0, x[..., perm], plain)
    assert torch.equal(q.g_idx, plain.g_idx[torch.argsort(perm)])


@pytest.mark.parametrize("n,k,bits,group", [(64, 172, 4, 32), (72, 64, 4, 32), (64, 64, 3, 32), (64, 64, 4, 24)])
def test_layers_the_layout_cannot_hold_stay(n, k, bits, group, device):
    q = _layer(n, k, bits, group, False, device)
    assert not q.can_pack_mma() and not q.pack_mma_() and q.layout == "gptq"


def test_model_pack_counts_layers(device):
    model = nn.Sequential(_layer(128, 64, 4, 32, True, device), nn.ReLU(), _layer(72, 128, 4, 32, True, device),
                          _layer(64, 72, 8, None, True, device))
    x = torch.randn(3, 64, device=device)
    y0 = model(x)
    assert lnn.pack_mma(model) == 1        # N = 72 and K = 72 do not fit the layout
    assert [m.layout for m in model if isinstance(m, QuantLinear)] == ["mma", "gptq", "gptq"]
    y1 = model(x)
    assert ((y1 - y0).abs() <= 1e-4 * y0.abs().max()).all()
