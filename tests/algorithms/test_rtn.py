"""Round-to-nearest on the real stories260K weights, measured against full precision.

Thresholds are the minimum per-layer SQNR over the model's 35 Linear weights, measured
with this implementation (lowbit 0.1.0, 2026-11-23, CPU; a failure message gives the
new figure) and set 0.5 dB below: RTN is deterministic, so a drop means the grid changed. The figures sit where
uniform quantization theory puts them, about 6 dB per bit.
"""
import pytest
import torch

import lowbit
from _helpers import DEVICES, sqnr, stories260k_linear_weights

# (bits, group_size or None for per-channel, symmetric) -> measured min SQNR (dB)
MEASURED_MIN_SQNR = {
    (8, None, True): 42.92, (8, None, False): 43.70, (8, 32, True): 44.19, (8, 32, False): 45.64,
    (4, None, True): 17.86, (4, None, False): 19.15, (4, 32, True): 19.33, (4, 32, False): 20.92,
    (4, 16, False): 22.70,
    (3, None, False): 12.47, (3, 32, False): 14.50, (3, 16, False): 16.09,
    (2, None, False): 5.25, (2, 32, False): 7.30, (2, 16, False): 8.76,
}
MARGIN_DB = 0.5


@pytest.fixture(scope="module")
def weights():
    return stories260k_linear_weights()


def _min_sqnr(weights, bits, group_size, symmetric, device="cpu", **kw):
    vals = []
    for w in weights.values():
        qw = lowbit.rtn_quantize(w.to(device), bits, group_size, symmetric, **kw)
        vals.append(sqnr(w, qw.dequantize(torch.float32).cpu()))
    return min(vals)


@pytest.mark.parametrize("config", list(MEASURED_MIN_SQNR))
def test_sqnr_per_layer(weights, config, device):
    got = _min_sqnr(weights, *config, device=device)
    assert got >= MEASURED_MIN_SQNR[config] - MARGIN_DB, f"{config}: min SQNR {got:.2f} dB"


def test_more_bits_finer_groups_and_zero_points_help(weights):
    for g in (None, 32, 16):
        by_bits = [_min_sqnr(weights, b, g, False) for b in (2, 3, 4, 8)]
        assert by_bits == sorted(by_bits), (g, by_bits)
    assert _min_sqnr(weights, 4, 16, False) > _min_sqnr(weights, 4, 32, False) > _min_sqnr(weights, 4, None, False)
    assert _min_sqnr(weights, 4, 32, False) > _min_sqnr(weights, 4, 32, True)


def test_per_tensor_is_worst(weights):
    per_tensor = _min_sqnr(weights, 8, None, True, per_tensor=True)
    assert per_tensor < _min_sqnr(weights, 8, None, True)


def test_pack_roundtrip_on_real_weights(weights):
    for bits in (2, 3, 4, 8):
        w = weights["model.layers.0.mlp.down_proj.weight"]   # [64, 172]: K not a multiple of 32
        qw = lowbit.rtn_quantize(w, bits, 64, False)
        qweight = qw.pack()
        assert qweight.shape == ((172 * bits + 31) // 32, 64)
        assert torch.equal(lowbit.ops.unpack_int32(qweight, bits, 172).t(), qw.codes)


@pytest.mark.skipif(len(DEVICES) < 2, reason="needs a second device (CUDA) to compare with the CPU")
def test_devices_agree_bit_for_bit(weights):
    for w in list(weights.values())[:7]:
        a = lowbit.rtn_quantize(w, 4, 32, False)
        b = lowbit.rtn_quantize(w.cuda(), 4, 32, False)
        assert torch.equal(a.codes, b.codes.cpu()) and torch.equal(a.scales, b.scales.cpu())
        assert torch.equal(a.zeros, b.zeros.cpu())
