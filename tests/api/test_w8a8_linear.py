"""lowbit.nn.W8A8Linear (int8 weights and activations, LLM.int8 outlier split) and
lowbit.nn.FP8Linear (float8 e4m3): the weight grid against plain torch, forward against
a plain-torch emulation of the quantized product (tight) and against the float layer
(SQNR), static saturation, dtypes and shapes, state_dict round trip, bad arguments.

Shapes: N=48 outputs, K=256 inputs, M=32 tokens. Every SQNR floor below was measured with
this file's inputs over 300 seeds (CPU, float32) and set a few dB under the minimum seen.
"""
import io

import pytest
import torch
from torch import nn

from lowbit import ops
from lowbit.nn.w8a8 import FP8Linear, W8A8Linear
from _helpers import FLOAT_DTYPES, bits_equal, random_weight, sqnr

N, K, M = 48, 256, 32
F8 = torch.float8_e4m3fn
U32 = 2.0 ** -24     # float32 unit roundoff
# Unit roundoff of the output dtype: the layer rounds its float32 result once to x.dtype.
U_OUT = {torch.float32: U32, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _layer_inputs(device, dtype=torch.float32):
    w = random_weight(N, K, device=device)
    b = torch.randn(N, device=device)
    x = torch.randn(M, K, device=device).to(dtype)
    return w, b, x


def _true_div(a, b: float):
    # An IEEE division, as the specification demands (CUDA turns `a / 127.0` into a
    # multiply by the reciprocal, which can differ by an ulp).
    return a / torch.full_like(a, b)


def _absmax_int8(w):
    """Per-output-channel absmax int8 in plain torch: scale max|w[n]| / 127 (1 for a zero
    row), codes round-half-even of w / scale."""
    amax = w.float().abs().amax(dim=1)
    s = _true_div(amax, 127.0)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return torch.clamp(torch.round(w.float() / s[:, None]), -127, 127).to(torch.int8), s


def _bias(layer, x):
    return torch.zeros(layer.out_features, dtype=torch.float64, device=x.device) if layer.bias is None \
        else layer.bias.double()


def _emulate_w8a8(layer: W8A8Linear, x):
    """The layer's documented computation in float64 (no outlier split): per-token absmax
    (or the static scale) int8 activations times the stored int8 weight. Returns the
    expected output and the magnitude that float32 rounding errors are relative to."""
    x2 = x.reshape(-1, layer.in_features).float()
    if layer.input_scale is None:
        amax = x2.abs().amax(dim=1, keepdim=True)
        xs = _true_div(amax, 127.0)
        xs = torch.where(xs == 0, torch.ones_like(xs), xs)
    else:
        xs = layer.input_scale.reshape(1, 1)
    xq = torch.clamp(torch.round(x2 / xs), -128, 127)
    acc = xq.double() @ layer.weight.double().t()   # exact (int32 in the kernel)
    scaled = acc * xs.double() * layer.weight_scale.double()
    b = _bias(layer, x)
    return scaled + b, scaled.abs() + b.abs()


def _emulate_fp8(layer: FP8Linear, x):
    """The FP8 layer in float64: per-token absmax e4m3 (or the static scale, saturating at
    448) activations times the stored e4m3 weight. Returns the expected output and the
    sum of |products| (scaled) + |bias| that accumulation errors are relative to."""
    x2 = x.reshape(-1, layer.in_features).float()
    if layer.input_scale is None:
        amax = x2.abs().amax(dim=1, keepdim=True)
        xs = _true_div(amax, 448.0)
        xs = torch.where(xs == 0, torch.ones_like(xs), xs)
    else:
        xs = layer.input_scale.reshape(1, 1)
    xq = torch.clamp(x2 / xs, -448, 448).to(F8).double()
    ws = layer.weight_scale.double()
    ws = ws if ws.dim() == 0 else ws[None, :]
    wq = layer.weight.double()
    b = _bias(layer, x)
    mag = (xq.abs() @ wq.abs().t()) * xs.double() * ws + b.abs()
    return (xq @ wq.t()) * xs.double() * ws + b, mag


def _assert_close_to_emulation(y, want, bound):
    err = (y.double().reshape(want.shape) - want).abs()
    worst = (err / bound).max().item()
    assert worst <= 1, f"error {worst:.3g} x the bound"


# -- W8A8Linear -----------------------------------------------------------------------------------------------

def test_from_weight_is_per_channel_absmax_int8(device):
    w, b, _ = _layer_inputs(device)
    w[3] = 0   # an all-zero row: scale 1, codes 0
    layer = W8A8Linear.from_weight(w, b)
    codes, scales = _absmax_int8(w)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (N, K)
    assert layer.weight.device.type == device
    assert torch.equal(layer.weight, codes) and torch.equal(layer.weight_scale, scales)
    assert layer.weight_scale[3] == 1 and not layer.weight[3].any()
    assert layer.weight.abs().max() == 127   # absmax maps to +-127 (never -128)
    assert torch.equal(layer.bias, b) and layer.input_scale is None and layer.outlier_threshold is None
    # dequantize(): codes x per-channel scales, within half a step of w.
    w_hat = layer.dequantize()
    assert torch.equal(w_hat, codes.float() * scales[:, None])
    # At a tie (w / scale = k + 0.5) the error is exactly half a step, plus the float32
    # rounding of w_hat and of w - w_hat: a few ulps of |w| (seed 217 has one: 1.4e-5 over).
    assert ((w_hat - w).abs() <= scales[:, None] / 2 + 4 * 2.0**-24 * w.abs()).all()
    assert layer.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("static", [False, True])
def test_forward_matches_int8_emulation_and_float(static, device):
    w, b, x = _layer_inputs(device)
    # Static: the calibrated max |x| of this very input, so nothing saturates.
    layer = W8A8Linear.from_weight(w, b, input_scale=x.abs().max() / 127 if static else None)
    assert (layer.input_scale is not None) == static
    y = layer(x)
    assert y.shape == (M, N) and y.dtype == torch.float32
    want, mag = _emulate_w8a8(layer, x)
    # The int8 product is exact (|acc| <= 128*127*256 < 2**24 also converts exactly to
    # float32); only the two scale products and the bias add round in float32: 4 units
    # of roundoff covers them in any order. A wrong scale or code is ~1e-2 relative.
    _assert_close_to_emulation(y, want, 4 * U32 * mag + 1e-30)
    # Against the float layer: measured min 30.2 dB dynamic, 29.9 dB static (mean ~35;
    # the spread is random_weight's outlier rows). 4-bit-like errors would be ~20 dB.
    assert sqnr(x @ w.t() + b, y) > 27


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("static", [False, True])
def test_dtype_in_is_dtype_out(dtype, static, device):
    w, b, x = _layer_inputs(device, dtype)
    layer = W8A8Linear.from_weight(w, b, input_scale=x.float().abs().max() / 127 if static else None)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (M, N)
    want, mag = _emulate_w8a8(layer, x)
    # As the float32 case, plus one rounding to the output dtype (and float16's
    # subnormal spacing 2**-24 near zero).
    _assert_close_to_emulation(y, want, 4 * U32 * mag + U_OUT[dtype] * want.abs() * (1 + 1e-6) + 2.0 ** -24)
    # Measured min 30.1 dB (bfloat16 inputs) over 300 seeds: the int8 noise dominates.
    assert sqnr(x.double() @ w.double().t() + b.double(), y) > 27


def test_static_saturates_beyond_calibrated_range(device):
    w, b, x = _layer_inputs(device)
    s = torch.tensor(x.abs().max().item() / 127, device=device)
    layer = W8A8Linear.from_weight(w, b, input_scale=s)
    big = x * 4    # three quarters of the values' range lies beyond the calibrated one
    y = layer(big)
    # Codes clamp to [-128, 127]: the same as clamping the input to [-128 s, 127 s]
    # first (128 s / s is exact; 127 s / s rounds to 127), so bit-identical outputs.
    assert torch.equal(y, layer(torch.maximum(torch.minimum(big, 127 * s), -128 * s)))
    # and far from the float layer (the dynamic layer follows it: > 27 dB as above).
    # Saturating 4x inputs at 1x measured under 12 dB.
    assert sqnr(big @ w.t() + b, y) < 20
    assert sqnr(big @ w.t() + b, W8A8Linear.from_weight(w, b)(big)) > 27


@pytest.mark.parametrize("static", [False, True])
def test_leading_dims_and_no_bias(static, device):
    w, _, _ = _layer_inputs(device)
    x = torch.randn(3, 5, K, device=device)
    layer = W8A8Linear.from_weight(w, None, input_scale=x.abs().max() / 127 if static else None)
    assert layer.bias is None and "bias" not in layer.state_dict()
    y = layer(x)
    assert y.shape == (3, 5, N)
    # Rows are independent (per-token scales; static: one shared scale), so [B, L, K] is
    # exactly [B*L, K] reshaped.
    assert torch.equal(y, layer(x.reshape(15, K)).reshape(3, 5, N))
    want, mag = _emulate_w8a8(layer, x)
    _assert_close_to_emulation(y, want, 4 * U32 * mag + 1e-30)
    # No bias: the same measured floor as with one.
    assert sqnr(x @ w.t(), y) > 27


@pytest.mark.parametrize("static", [False, True])
def test_empty_batch(static, device):
    w, b, _ = _layer_inputs(device)
    for layer in (W8A8Linear.from_weight(w, b, input_scale=0.1 if static else None),
                  FP8Linear.from_weight(w, b, input_scale=0.1 if static else None)):
        y = layer(torch.randn(2, 0, K, device=device, dtype=torch.bfloat16))
        assert y.shape == (2, 0, N) and y.dtype == torch.bfloat16


def test_from_codes(device):
    w, b, x = _layer_inputs(device)
    codes, scales = _absmax_int8(w)
    layer = W8A8Linear.from_codes(codes, scales.double(), b.half())
    assert torch.equal(layer.weight, codes) and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float16 and torch.equal(layer.bias, b.half())
    ref = W8A8Linear.from_weight(w, b.half())
    assert torch.equal(layer(x), ref(x))


def test_from_codes_validation():
    codes = torch.zeros(4, 8, dtype=torch.int8)
    scales = torch.ones(4)
    for bad in (codes.float(), codes.to(torch.uint8), codes[0]):
        with pytest.raises(TypeError, match=r"W8A8Linear.from_codes: weight must be int8 \[N, K\]"):
            W8A8Linear.from_codes(bad, scales)
    for s in (0.0, -0.1, float("nan"), float("inf"), torch.tensor(0.0)):
        with pytest.raises(ValueError, match="W8A8Linear: input_scale must be a positive finite number.*127"):
            W8A8Linear.from_codes(codes, scales, input_scale=s)
    with pytest.raises(ValueError, match="FP8Linear: input_scale must be a positive finite number.*448"):
        FP8Linear.from_weight(torch.randn(4, 8), input_scale=-1.0)
    # A scale given as a 1-element tensor of any shape is accepted (a calibrated max / 127).
    assert W8A8Linear.from_codes(codes, scales, input_scale=torch.tensor([0.5])).input_scale == 0.5


@pytest.mark.parametrize("static,threshold", [(False, None), (True, None), (False, 6.0)])
def test_state_dict_round_trip(static, threshold, device):
    w, b, x = _layer_inputs(device)
    x[:, 7] *= 20     # an outlier column for the LLM.int8 layer
    layer = W8A8Linear.from_weight(w, b, input_scale=x.abs().max() / 127 if static else None,
                                   outlier_threshold=threshold)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = W8A8Linear(K, N, static=static, outlier_threshold=threshold, device=device)
    fresh.load_state_dict(torch.load(buf, weights_only=True))   # strict: the same keys
    assert set(fresh.state_dict()) == {"weight", "weight_scale", "bias"} | ({"input_scale"} if static else set())
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.dequantize(), layer.dequantize())


def test_nbytes_and_repr():
    w = torch.randn(N, K)
    assert W8A8Linear.from_weight(w, torch.randn(N)).nbytes == N * K + 4 * N + 4 * N
    assert W8A8Linear.from_weight(w).nbytes == N * K + 4 * N
    static = W8A8Linear.from_weight(w, torch.randn(N).half(), input_scale=0.1)
    assert static.nbytes == N * K + 4 * N + 4 + 2 * N
    assert "activations=int8 static" in repr(static)
    assert "outlier_threshold=6" in repr(W8A8Linear.from_weight(w, outlier_threshold=6.0))
    assert "dynamic per-token" in repr(W8A8Linear.from_weight(w))


# -- LLM.int8 -------------------------------------------------------------------------------------------------

def _outlier_input(device):
    # Inliers within +-5.5 (under the threshold 6), four columns x20 (|x| up to ~70).
    x = torch.randn(M, K, device=device).clamp(-5.5, 5.5)
    cols = torch.randperm(K, device=device)[:4]
    x[:, cols] *= 20
    return x, cols


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_llm_int8_beats_plain_w8a8_on_outliers(dtype, device):
    w, b, _ = _layer_inputs(device)
    x, _ = _outlier_input(device)
    x = x.to(dtype)
    plain = W8A8Linear.from_weight(w, b)
    llm = W8A8Linear.from_weight(w, b, outlier_threshold=6.0)
    assert torch.equal(plain.weight, llm.weight)
    # Against the product with the weight both layers multiply by: the weight's rounding
    # is common to both, and amplified x20 by the outlier columns it would hide the
    # activation error that the split is about.
    ref = x.double() @ plain.dequantize().double().t() + b.double()
    ratio = (plain(x).double() - ref).norm() / (llm(x).double() - ref).norm()
    # Plain: the outliers set every token's int8 step (~70/127); split: ~5.5/127.
    # Measured over 3000 seeds: min 6.4 (float32 and float16; 1st percentile 7.8).
    # bfloat16: min 1.7 (1st percentile 3.9, mean 7.4): the layer rounds the outlier
    # columns' dequantized weights to bfloat16 (2**-9 relative, times |x| ~70), which
    # then dominates the split's error.
    assert ratio > (1.3 if dtype == torch.bfloat16 else 4.0), ratio
    assert llm(x).dtype == dtype


def test_llm_int8_equals_plain_without_outliers(device):
    w, b, _ = _layer_inputs(device)
    # Values reach 6 exactly but never exceed it: the split is for |x| > threshold.
    x = (torch.randn(M, K, device=device) * 3).clamp(-6, 6)
    assert (x.abs() == 6).any()
    plain = W8A8Linear.from_weight(w, b)
    llm = W8A8Linear.from_weight(w, b, outlier_threshold=6.0)
    assert torch.equal(llm(x), plain(x))
    # ... while one value just beyond it moves its column to the 16-bit side.
    x[5, 9] = 6.5
    assert not torch.equal(llm(x), plain(x))


def test_llm_int8_every_column_outlier_is_float_matmul(device):
    w, b, x = _layer_inputs(device)
    x[x == 0] = 1e-3
    llm = W8A8Linear.from_weight(w, b, outlier_threshold=1e-6)
    # The int8 part multiplies zeros (its output is the bias); the rest is the float32
    # product with the dequantized weight: (K + 2) roundings of float32 summation bound it.
    want = x.double() @ llm.dequantize().double().t() + b.double()
    mag = x.double().abs() @ llm.dequantize().double().abs().t() + b.double().abs()
    _assert_close_to_emulation(llm(x), want, (K + 2) * U32 * mag)


def test_llm_int8_outlier_split_emulation(device):
    w, b, _ = _layer_inputs(device)
    x, cols = _outlier_input(device)
    llm = W8A8Linear.from_weight(w, b, outlier_threshold=6.0)
    plain = W8A8Linear.from_weight(w, b)
    inl = x.index_fill(1, cols, 0)
    # The int8 part is plain W8A8 on the inlier columns; the outlier columns multiply the
    # dequantized weight in float32 (tight: K roundings of float32 summation).
    want_in, mag_in = _emulate_w8a8(plain, inl)
    w_out = llm.dequantize().double()[:, cols]
    want = want_in + x.double()[:, cols] @ w_out.t()
    mag = mag_in + x.double()[:, cols].abs() @ w_out.abs().t()
    _assert_close_to_emulation(llm(x), want, (K + 6) * U32 * mag)


def test_static_with_outliers_is_an_error():
    with pytest.raises(ValueError, match="LLM.int8 outlier split uses dynamic per-token scales"):
        W8A8Linear(K, N, static=True, outlier_threshold=6.0)
    with pytest.raises(ValueError, match="pass static=False with outlier_threshold"):
        W8A8Linear.from_weight(torch.randn(N, K), input_scale=0.1, outlier_threshold=6.0)


# -- FP8Linear ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_tensor", [False, True])
def test_fp8_weight_codes(per_tensor, device):
    w, b, _ = _layer_inputs(device)
    layer = FP8Linear.from_weight(w, b, per_tensor_weight=per_tensor)
    q, s = ops.quantize_fp8_dynamic(w.float().contiguous(), F8, not per_tensor)
    assert layer.weight.dtype == F8 and layer.weight.device.type == device
    assert bits_equal(layer.weight, q)
    assert layer.weight_scale.shape == (() if per_tensor else (N,))
    assert torch.equal(layer.weight_scale, s.reshape(layer.weight_scale.shape))
    # The scale is absmax / 448, per channel or for the whole tensor.
    amax = w.abs().amax() if per_tensor else w.abs().amax(dim=1)
    assert torch.equal(layer.weight_scale, _true_div(amax, 448.0))
    ws = layer.weight_scale if per_tensor else layer.weight_scale[:, None]
    assert torch.equal(layer.dequantize(), layer.weight.float() * ws)
    # e4m3: 3 mantissa bits, so each weight within 2**-4 relative (normals) of w.
    assert ((layer.dequantize() - w).abs() <= w.abs() * 2.0 ** -4 + ws * 2.0 ** -9 * 1.01).all()


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fp8_forward(per_tensor, static, dtype, device):
    w, b, x = _layer_inputs(device, dtype)
    layer = FP8Linear.from_weight(w, b, per_tensor_weight=per_tensor,
                                  input_scale=x.float().abs().max() / 448 if static else None)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (M, N)
    want, mag = _emulate_fp8(layer, x)
    # FP8 products are exact in float32; the accumulation is not. CPU: float32 sums, at
    # most (K-1) roundings, plus three for the scales and bias. CUDA (cuBLASLt FP8 tensor
    # cores): measured |err| / sum|products| <= 6.5e-4 (2**-10.6) with torch._scaled_mm on
    # an H200, fast accumulation included, K 128..4096; 2**-8 leaves 6x. Either is far
    # below what a wrong scale or code gives (~2**-4 relative, e4m3's step).
    acc = (K + 3) * U32 if device == "cpu" else 2.0 ** -8
    _assert_close_to_emulation(y, want, acc * mag + U_OUT[dtype] * want.abs() * (1 + 1e-6) + 2.0 ** -24)
    # e4m3 (3 mantissa bits) on both operands: measured min 25.9 dB over 300 seeds (mean
    # ~29, any of the four weight/activation scalings); int8 would give ~35 dB.
    assert sqnr(x.double() @ w.double().t() + b.double(), y) > 23


def test_fp8_static_saturates(device):
    w, b, x = _layer_inputs(device)
    s = torch.tensor(x.abs().max().item() / 448, device=device)
    layer = FP8Linear.from_weight(w, b, input_scale=s)
    big = x * 4
    # e4m3 saturates at +-448 (no infinities): the same codes as clamping the input at
    # +-448 s first (448 s / s rounds to 448: its e4m3 neighbours are 416 and 480).
    assert torch.equal(layer(big), layer(torch.maximum(torch.minimum(big, 448 * s), -448 * s)))
    # Measured under 12 dB for 4x inputs (the dynamic layer: > 23 dB, as above).
    assert sqnr(big @ w.t() + b, layer(big)) < 20


@pytest.mark.parametrize("per_tensor,static", [(False, False), (True, True), (True, False)])
def test_fp8_state_dict_round_trip_and_nbytes(per_tensor, static, device):
    w, b, x = _layer_inputs(device)
    layer = FP8Linear.from_weight(w, b, per_tensor_weight=per_tensor,
                                  input_scale=x.abs().max() / 448 if static else None)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = FP8Linear(K, N, static=static, per_tensor_weight=per_tensor, device=device)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x.reshape(4, 8, K)), layer(x).reshape(4, 8, N))
    assert bits_equal(fresh.weight, layer.weight)
    assert layer.nbytes == N * K + (4 if per_tensor else 4 * N) + (4 if static else 0) + 4 * N
    assert FP8Linear.from_weight(w).bias is None and FP8Linear.from_weight(w).nbytes == N * K + 4 * N
    assert ("per-tensor" if per_tensor else "per-channel") in repr(layer)


def test_layers_are_modules_without_trainable_parameters():
    for layer in (W8A8Linear.from_weight(torch.randn(8, 16), torch.randn(8)),
                  FP8Linear.from_weight(torch.randn(8, 16), torch.randn(8))):
        assert isinstance(layer, nn.Module)
        assert not any(p.requires_grad for p in layer.parameters())
