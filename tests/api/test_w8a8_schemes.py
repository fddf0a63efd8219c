"""Weight-and-activation schemes: the W8A8 / LLM.int8 / FP8 presets and their suffixes,
QuantScheme's validation of the new fields, and lowbit.quantize (RTN) with them: the
layers swapped in, outputs kept close, and the method / calibration errors that leave the
model unmodified.

Model-level SQNR floors were measured with this file's models and inputs (CPU, float32;
fresh weights and inputs per seed) and set a few dB under the minimum seen.
"""

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig, QuantScheme
from lowbit.calibration import CalibrationError
from lowbit.nn.w8a8 import FP8Linear, W8A8Linear
from _helpers import assert_unmodified, snapshot, sqnr
from _tiny_models import tiny_model

F32 = torch.float32
# Every field of every weight-and-activation preset, and its name.
PRESETS = {
    "W8A8": (dict(activations="int8", weight_format="int", weight_per_tensor=False, outlier_threshold=None),
             "W8A8-int8-dynamic"),
    "w8a8-dynamic": (dict(activations="int8", weight_format="int", weight_per_tensor=False,
                          outlier_threshold=None), "W8A8-int8-dynamic"),
    "W8A8-static": (dict(activations="int8-static", weight_format="int", weight_per_tensor=False,
                         outlier_threshold=None), "W8A8-int8-static"),
    "LLM.int8": (dict(activations="int8", weight_format="int", weight_per_tensor=False, outlier_threshold=6.0),
                 "LLM.int8-t6"),
    "llm.int8-t4.5": (dict(activations="int8", weight_format="int", weight_per_tensor=False,
                           outlier_threshold=4.5), "LLM.int8-t4.5"),
    "LLM.int8-T10": (dict(activations="int8", weight_format="int", weight_per_tensor=False,
                          outlier_threshold=10.0), "LLM.int8-t10"),
    "FP8": (dict(activations="fp8", weight_format="fp8", weight_per_tensor=False, outlier_threshold=None),
            "FP8-pc-dynamic"),
    "FP8-pt": (dict(activations="fp8", weight_format="fp8", weight_per_tensor=True, outlier_threshold=None),
               "FP8-pt-dynamic"),
    # -static alone switches FP8 to per-tensor weights (the documented FP8-static preset)...
    "FP8-static": (dict(activations="fp8-static", weight_format="fp8", weight_per_tensor=True,
                        outlier_threshold=None), "FP8-pt-static"),
    "fp8_static": (dict(activations="fp8-static", weight_format="fp8", weight_per_tensor=True,
                        outlier_threshold=None), "FP8-pt-static"),
    # ... unless -pc says otherwise, before or after it.
    "FP8-static-pc": (dict(activations="fp8-static", weight_format="fp8", weight_per_tensor=False,
                           outlier_threshold=None), "FP8-pc-static"),
    "fp8-pc-static": (dict(activations="fp8-static", weight_format="fp8", weight_per_tensor=False,
                           outlier_threshold=None), "FP8-pc-static"),
    "FP8-pt-dynamic": (dict(activations="fp8", weight_format="fp8", weight_per_tensor=True,
                            outlier_threshold=None), "FP8-pt-dynamic"),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets(preset):
    want, name = PRESETS[preset]
    s = QuantConfig.preset(preset).scheme
    # All 8-bit symmetric per-channel, float32 scales (what the W8A8 / FP8 kernels read).
    assert (s.bits, s.group_size, s.symmetric, s.scale_dtype) == (8, None, True, F32)
    assert {k: getattr(s, k) for k in want} == want
    assert s.name == name
    assert not s.weight_only
    assert s.static_activations == ("static" in preset.lower())
    assert QuantConfig(scheme=preset).scheme == s


def test_names_of_fp8_and_llm_int8_parse_back():
    for preset in ("LLM.int8-t4.5", "FP8", "FP8-static", "FP8-static-pc", "FP8-pt"):
        s = QuantConfig.preset(preset).scheme
        assert QuantConfig.preset(s.name).scheme == s


def test_preset_changes_and_overrides():
    s = QuantConfig.preset("LLM.int8", outlier_threshold=3.0).scheme
    assert s.outlier_threshold == 3.0 and s.name == "LLM.int8-t3"
    cfg = QuantConfig.preset("W4A16", ignore=[], overrides={"down": "W8A8", "up": "FP8-static"})
    assert cfg.scheme.weight_only and cfg.ignore == []
    assert cfg.scheme_for("layers.0.down").name == "W8A8-int8-dynamic"
    assert cfg.scheme_for("layers.0.up").name == "FP8-pt-static"
    # A float16 scale_dtype is silently float32 for activation schemes.
    s = QuantScheme(bits=8, group_size=None, activations="int8", scale_dtype=torch.float16)
    assert s.scale_dtype == F32 and s == QuantConfig.preset("W8A8").scheme


@pytest.mark.parametrize("name,match", [
    ("W8A8-g128", r"preset 'W8A8-g128': unknown suffix 'g128' \(W8A8 takes -static/-dynamic, FP8 "
                  r"-static/-dynamic/-pt/-pc, LLM.int8 -t<threshold>\)"),
    ("W8A8-pt", "unknown suffix 'pt'"),
    ("W8A8-asym", "unknown suffix 'asym'"),
    ("FP8-g32", "unknown suffix 'g32'"),
    ("LLM.int8-static", "unknown suffix 'static'"),   # the outlier split is dynamic only
    ("LLM.int8-t", "unknown suffix 't'"),
    ("LLM.int8-tx", "unknown suffix 'tx'"),
    ("W4A16-static", r"unknown suffix 'static' \(use -g<N>, -pc, -sym or -asym\)"),
    ("W8A4", r"unknown preset 'W8A4': choose one of .*W8A8, LLM.INT8, FP8"),
    ("LLM.int8-t0", "outlier_threshold must be positive, got 0.0"),
])
def test_bad_presets(name, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.preset(name)


PC8 = dict(bits=8, group_size=None)


@pytest.mark.parametrize("kw,match", [
    (dict(bits=4, group_size=None, activations="int8"),
     r"activations='int8' needs 8-bit symmetric per-channel weights \(bits=8, symmetric=True, group_size=None\), "
     r"got bits=4, .*; use the W8A8 / FP8 presets"),
    (dict(bits=8, group_size=128, activations="int8"), "needs 8-bit symmetric per-channel.*group_size=128"),
    (dict(bits=8, group_size=None, symmetric=False, activations="fp8", weight_format="fp8"),
     "needs 8-bit symmetric per-channel.*symmetric=False"),
    (dict(PC8, activations="int8", weight_format="fp8"),
     r"weight_format='fp8' needs activations='fp8' or 'fp8-static' .*use the FP8 presets"),
    (dict(PC8, weight_format="fp8"), r"weight_format='fp8' needs activations='fp8' or 'fp8-static'"),
    (dict(PC8, activations="fp8-static"), r"activations='fp8-static' needs weight_format='fp8'"),
    (dict(PC8, activations="int8-static", outlier_threshold=6.0),
     r"outlier_threshold \(LLM.int8\) needs activations='int8' \(dynamic per-token\), got 'int8-static'"),
    (dict(outlier_threshold=6.0), r"outlier_threshold \(LLM.int8\) needs activations='int8'.*got None"),
    (dict(PC8, activations="int8", outlier_threshold=-1.0), "outlier_threshold must be positive, got -1.0"),
    (dict(PC8, activations="int8", weight_per_tensor=True),
     r"weight_per_tensor applies to FP8 weights only \(weight_format='fp8'\)"),
    (dict(weight_per_tensor=True), "weight_per_tensor applies to FP8 weights only"),
    (dict(PC8, activations="int4"), r"activations must be one of \(None, 'int8', 'int8-static', 'fp8', "
                                    r"'fp8-static'\), got 'int4'"),
    (dict(PC8, weight_format="nf4"), r"weight_format must be one of \('int', 'fp8'\), got 'nf4'"),
])
def test_bad_schemes(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantScheme(**kw)


@pytest.mark.parametrize("preset,changes,match", [
    ("W8A8", dict(bits=4), "needs 8-bit symmetric per-channel"),
    ("W8A8", dict(group_size=64), "needs 8-bit symmetric per-channel"),
    ("FP8", dict(activations="int8"), "weight_format='fp8' needs activations"),
    ("LLM.int8", dict(activations="int8-static"), r"outlier_threshold \(LLM.int8\) needs activations='int8'"),
])
def test_bad_preset_changes(preset, changes, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.preset(preset, **changes)


def test_dict_override_changes_the_default_scheme():
    # W4A16 with int8 activations is still 4-bit: refused, not silently made 8-bit.
    with pytest.raises(ValueError, match="needs 8-bit symmetric per-channel"):
        QuantConfig.preset("W4A16", overrides={"down": {"activations": "int8"}})
    cfg = QuantConfig.preset("W8A16", overrides={"down": {"activations": "int8"}})
    assert cfg.scheme_for("down").name == "W8A8-int8-dynamic"


# -- lowbit.quantize --------------------------------------------------------------------------------------------

CLASSES = {"W8A8": W8A8Linear, "LLM.int8": W8A8Linear, "FP8": FP8Linear}


def _mlp(device, k=64):
    return nn.Sequential(nn.Linear(k, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 32, bias=False)).to(device).eval()


def _check_swapped(model, report, preset, names):
    cls = CLASSES[preset]
    scheme = QuantConfig.preset(preset).scheme
    assert [r.name for r in report.layers] == names
    for r in report.layers:
        layer = model.get_submodule(r.name)
        assert type(layer) is cls and r.scheme == scheme.name and r.bytes_after == layer.nbytes
        assert layer.input_scale is None     # dynamic: no calibration needed
        if cls is W8A8Linear:
            assert layer.outlier_threshold == scheme.outlier_threshold
        else:
            assert layer.weight_scale.shape == (layer.out_features,)   # per-channel FP8
        # Per-layer weight SQNR, measured min over 20 seeds and both models: 31.7 dB
        # (FP8: 3 mantissa bits), 43.4 dB (int8).
        assert r.weight_sqnr_db > (28 if cls is FP8Linear else 40)
    assert report.model_bytes_after == lowbit.model_bytes(model) < report.model_bytes_before


@pytest.mark.parametrize("preset", list(CLASSES))
def test_quantize_mlp(preset, device):
    model = _mlp(device)
    x = torch.randn(4, 10, 64, device=device)
    with torch.no_grad():
        ref = model(x)
    report = lowbit.quantize(model, preset, progress=False)
    _check_swapped(model, report, preset, ["0", "2", "4"])
    with torch.no_grad():
        y = model(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype and y.device == ref.device
    # Measured over 20 seeds: min 35.7 dB (W8A8; LLM.int8 the same, as no |x| in this
    # MLP exceeds 6), 23.3 dB (FP8). A wrong scale or transposed weight gives ~0 dB.
    assert sqnr(ref, y) > (20 if preset == "FP8" else 32)


@pytest.mark.parametrize("preset", list(CLASSES))
def test_quantize_tiny_gpt2(preset, fresh_seed, device):
    # GPT-2's Conv1D layers (weight [in, out]) become W8A8 / FP8 layers too; lm_head is
    # ignored by default. Fresh weights every run.
    model, vocab = tiny_model("gpt2", fresh_seed)
    model.to(device)
    ids = torch.randint(0, vocab, (2, 16), device=device)
    with torch.no_grad():
        ref = model(ids).logits
    report = lowbit.quantize(model, preset, progress=False)
    names = [f"transformer.h.{i}.{sub}" for i in range(2) for sub in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")]
    _check_swapped(model, report, preset, names)
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():
        y = model(ids).logits
    # Measured over 20 seeds (weights and ids): min 43.6 dB (W8A8, LLM.int8), 31.7 dB
    # (FP8). A transposed Conv1D weight would give ~0 dB.
    assert sqnr(ref, y) > (27 if preset == "FP8" else 38)


def test_quantize_static_with_calibration(fresh_seed):
    model, vocab = tiny_model("llama", fresh_seed)
    ids = torch.randint(0, vocab, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    # The first block's q_proj sees the original model's input (the block-0 input,
    # normed), so its calibrated scale is that input's max |x| / 127.
    seen = {}

    def grab(mod, args):
        seen["x"] = args[0].detach().clone()

    h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(ids)
    h.remove()
    report = lowbit.quantize(model, "W8A8-static", calibration=ids, progress=False)
    assert len(report.layers) == 14 and all(r.scheme == "W8A8-int8-static" for r in report.layers)
    layers = [model.get_submodule(r.name) for r in report.layers]
    assert all(type(m) is W8A8Linear and m.input_scale is not None for m in layers)
    assert all(torch.isfinite(m.input_scale) and m.input_scale > 0 for m in layers)
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.input_scale, seen["x"].abs().max() / 127, rtol=1e-6, atol=0)
    with torch.no_grad():
        y = model(ids).logits
    # Calibrated on these very ids, so nothing saturates: as close as dynamic W8A8
    # (measured min 36.5 dB over 20 seeds).
    assert sqnr(ref, y) > 32




@pytest.mark.parametrize("preset", ["W8A8-static", "FP8-static"])
def test_static_without_calibration_is_an_error(preset):
    model = _mlp("cpu")
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match="needs calibration data: pass calibration=input_ids"):
        lowbit.quantize(model, preset, progress=False)
    assert_unmodified(model, snap)
    assert issubclass(CalibrationError, ValueError)


@pytest.mark.parametrize("method", ["gptq", "awq", lowbit.GPTQ(), lowbit.AWQ()], ids=["gptq", "awq", "GPTQ()",
                                                                                      "AWQ()"])
def test_weight_only_methods_refuse_w8a8(method):
    model = _mlp("cpu", k=128)
    snap = snapshot(model)
    name = method if isinstance(method, str) else method.name
    for preset, scheme in (("W8A8", "W8A8-int8-dynamic"), ("FP8", "FP8-pc-dynamic")):
        with pytest.raises(ValueError, match=rf"method '{name}' computes weight-only grids, but the config asks for "
                                             rf"\['{scheme}'\]; use method='smoothquant' \(or 'rtn'\)"):
            lowbit.quantize(model, preset, method=method, calibration=torch.zeros(1, 4, dtype=torch.long),
                            progress=False)
    # One W8A8 layer among weight-only ones is enough, and is named.
    cfg = QuantConfig.preset("W4A16", overrides={"^2$": "LLM.int8"})
    with pytest.raises(ValueError, match=r"asks for \['LLM.int8-t6'\]"):
        lowbit.quantize(model, cfg, method=method, progress=False)
    assert_unmodified(model, snap)


@pytest.mark.parametrize("method", ["smoothquant", lowbit.SmoothQuant()], ids=["smoothquant", "SmoothQuant()"])
def test_smoothquant_refuses_weight_only(method):
    model = _mlp("cpu", k=128)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"SmoothQuant migrates activation outliers for W8A8 / FP8 schemes, but the "
                                         r"config asks for weight-only \['W4A16-g128-sym'\]; use 'W8A8' / 'FP8' "
                                         r"presets, or method='awq'"):
        lowbit.quantize(model, "W4A16", method=method,
                        calibration=torch.zeros(1, 4, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match=r"weight-only \['W8A16-pc-sym'\]"):
        lowbit.quantize(model, QuantConfig.preset("W8A8", overrides={"^0$": "W8A16"}), method=method, progress=False)
    assert_unmodified(model, snap)
