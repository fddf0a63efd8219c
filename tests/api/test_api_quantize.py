"""lowbit.quantize (RTN): layer swapping, the report, configuration errors raised before
anything is modified, and model-level accuracy on the real stories260K model.

Model-level thresholds, measured 2026-11-25 (lowbit 0.1.0, CPU, fp32, transformers 5.23)
by this test's code: TinyStories-sample perplexity, fp32 baseline 5.5583.

    scheme          ppl      ratio    min layer W SQNR  min layer out SQNR (4x128 calib tokens)
    W8A16           5.5612   1.0005   42.92             39.84
    W8A16-asym      5.5640   1.0010   43.70             40.84
    W4A16-pc        6.5606   1.1803   17.86             14.81
    W4A16-g64       6.5985   1.1872   18.36             16.01
    W4A16-g64-asym  6.2338   1.1215   19.90             17.31
    W4A16-g32       6.3885   1.1494   19.33             16.97
    W4A16-g32-asym  6.1318   1.1032   20.92             18.14
    W3A16-g32       10.2486  1.8439   14.50             11.79

RTN is deterministic: only float summation order (BLAS, kernel paths) moves these, by
< 1e-4 relative. The perplexity bounds sit 1% above the measured ratio (ratios from 1.0
to 1.84); the SQNR bounds 0.5 dB below the measured minimum, as in tests/algorithms/test_rtn.py.
stories260K is a 260K-parameter model: 4 bits cost it far more than a 7B model (whose
W4A16-g128 RTN loss is a few percent), which makes it a sensitive detector of grid bugs.
"""
import copy
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig, data, eval as lbeval
from lowbit.nn import QuantLinear
from _helpers import shared_data, stories260k

# scheme -> (measured perplexity ratio, measured min weight SQNR dB, measured min output SQNR dB)
MEASURED = {
    "W8A16": (1.0005, 42.92, 39.84),
    "W8A16-asym": (1.0010, 43.70, 40.84),
    "W4A16-pc": (1.1803, 17.86, 14.81),
    "W4A16-g64": (1.1872, 18.36, 16.01),
    "W4A16-g64-asym": (1.1215, 19.90, 17.31),
    "W4A16-g32": (1.1494, 19.33, 16.97),
    "W4A16-g32-asym": (1.1032, 20.92, 18.14),
    "W3A16-g32": (1.8439, 14.50, 11.79),
}
PPL_SLACK = 1.01
SQNR_MARGIN_DB = 0.5


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(64, 96), "down": nn.Linear(96, 64, bias=False)})
                                    for _ in range(2))
        self.lm_head = nn.Linear(64, 10)

    def forward(self, x):
        for blk in self.layers:
            x = x + blk["down"](torch.relu(blk["up"](x)))
        return self.lm_head(x)


def _linears(model):
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


def test_replaces_targets_and_reports():
    model = Tiny()
    x = torch.randn(5, 64)
    before = lowbit.model_bytes(model)
    report = lowbit.quantize(model, "W4A16-g32", calibration=x, progress=False)
    assert _linears(model) == {"layers.0.up": QuantLinear, "layers.0.down": QuantLinear,
                               "layers.1.up": QuantLinear, "layers.1.down": QuantLinear,
                               "lm_head": nn.Linear}
    assert [r.name for r in report.layers] == ["layers.0.up", "layers.0.down", "layers.1.up", "layers.1.down"]
    r = report.layers[0]
    assert (r.out_features, r.in_features, r.scheme) == (96, 64, "W4A16-g32-sym")
    assert r.bytes_before == (96 * 64 + 96) * 4 and r.bytes_after == model.layers[0]["up"].nbytes
    assert all(15 < r.weight_sqnr_db < 30 and r.output_sqnr_db is not None for r in report.layers)
    assert report.model_bytes_before == before and report.model_bytes_after == lowbit.model_bytes(model)
    assert report.compression > 2.5
    assert "layers.1.down" in str(report) and "smaller" in report.summary()
    assert report.to_dict()["layers"][0]["name"] == "layers.0.up"
    assert model(x).shape == (5, 10)


def test_no_calibration_no_output_sqnr():
    report = lowbit.quantize(Tiny(), "W8A16", progress=False)
    assert all(r.output_sqnr_db is None and r.weight_sqnr_db > 35 for r in report.layers)


def test_targets_overrides_and_ignore():
    model = Tiny()
    cfg = QuantConfig.preset("W4A16-g32", targets=[r"\.up$", "lm_head"], ignore=[],
                             overrides={r"layers\.1": {"bits": 8, "group_size": None}})
    report = lowbit.quantize(model, cfg, progress=False)
    assert [(r.name, r.scheme) for r in report.layers] == [
        ("layers.0.up", "W4A16-g32-sym"), ("layers.1.up", "W8A16-pc-sym"), ("lm_head", "W4A16-g32-sym")]
    assert isinstance(model.layers[0]["down"], nn.Linear)


def test_unmatched_pattern_warns():
    with pytest.warns(UserWarning, match="'attn' matches no nn.Linear"):
        lowbit.quantize(Tiny(), QuantConfig.preset("W4A16-g32", targets=[nn.Linear, "attn"]), progress=False)
    with pytest.warns(UserWarning, match="no layer selected"):
        lowbit.quantize(Tiny(), QuantConfig.preset("W4A16-g32", targets=["nothing_here"]), progress=False)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, _linears(model)


def _assert_unmodified(model, snap):
    sd, types = snap
    assert _linears(model) == types
    assert all(torch.allclose(v, sd[k], rtol=0, atol=0, equal_nan=True) for k, v in model.state_dict().items())


def test_group_larger_than_in_features_errors_before_modifying():
    model = Tiny()
    snap = _snapshot(model)
    # 'layers.*.up' have in_features 64, 'down' 96: g96 suits down but not up.
    with pytest.raises(ValueError, match=r"layer 'layers.0.up' .*: group_size 96 is larger than in_features 64"):
        lowbit.quantize(model, "W4A16-g96", progress=False)
    _assert_unmodified(model, snap)


def test_bad_bits_and_method_error_before_modifying():
    model = Tiny()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="bits must be one of"):
        lowbit.quantize(model, QuantConfig.preset("W4A16-g32", overrides={"down": {"bits": 1}}), progress=False)
    with pytest.raises(ValueError, match="unknown method 'awq2'; available: rtn"):
        lowbit.quantize(model, "W4A16-g32", method="awq2", progress=False)
    _assert_unmodified(model, snap)


def test_nan_weight_errors_before_modifying():
    model = Tiny()
    with torch.no_grad():
        model.layers[1]["down"].weight[3, 5] = float("nan")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="layer 'layers.1.down' has NaN or Inf"):
        lowbit.quantize(model, "W4A16-g32", progress=False)
    _assert_unmodified(model, snap)


def test_quantized_model_state_dict_round_trip():
    model = Tiny()
    lowbit.quantize(model, "W4A16-g32-asym", progress=False)
    fresh = Tiny()
    lowbit.quantize(fresh, "W4A16-g32-asym", progress=False)   # same structure, other values
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(model(x), fresh(x))


# -- the real model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories():
    model, tok = stories260k()
    text = data.read_text(shared_data("text", "other", "tinystories_sample_30k.txt"))
    base = lbeval.perplexity(model, tok, text, progress=False)
    calib = data.calibration_samples(tok, [text], 4, 128, seed=0)
    return model, tok, text, base, calib


@pytest.mark.parametrize("scheme", list(MEASURED))
def test_stories260k_accuracy(stories, scheme):
    model, tok, text, base, calib = stories
    ratio_m, w_m, out_m = MEASURED[scheme]
    q = copy.deepcopy(model)
    report = lowbit.quantize(q, scheme, calibration=calib, progress=False)
    assert len(report.layers) == 35    # every Linear but the (tied) lm_head
    ppl = lbeval.perplexity(q, tok, text, progress=False)
    assert base == pytest.approx(5.5583, rel=1e-3)
    assert ppl / base <= ratio_m * PPL_SLACK, f"{scheme}: perplexity {ppl:.4f} (ratio {ppl / base:.4f})"
    # 8 bits must stay essentially lossless; lower bits must actually quantize something.
    assert ppl / base > (0.99 if "W8" in scheme else 1.02)
    assert report.min_weight_sqnr_db >= w_m - SQNR_MARGIN_DB
    assert min(r.output_sqnr_db for r in report.layers) >= out_m - SQNR_MARGIN_DB
    assert report.compression > (2.7 if "W8" in scheme else 3.8)


def test_stories260k_quantlinear_matches_dequantized(stories):
    model, tok, text, base, calib = stories
    q = copy.deepcopy(model)
    lowbit.quantize(q, "W4A16-g32-asym", progress=False)
    # The same model with plain Linear layers holding the dequantized weights.
    deq = copy.deepcopy(q)
    for name, mod in list(deq.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.dequantize(torch.float32)
            parent, _, child = name.rpartition(".")
            setattr(deq.get_submodule(parent), child, lin)
    ids = calib[:2]
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, deq(ids).logits, rtol=1e-4, atol=1e-4)
    assert math.isfinite(lbeval.perplexity(q, tok, text, max_windows=2, progress=False))
