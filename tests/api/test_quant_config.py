"""QuantConfig / QuantScheme: presets, suffixes, layer selection, overrides, bad input."""
import pytest
import torch
from torch import nn

from lowbit import PRESETS, QuantConfig, QuantScheme


def test_presets():
    assert PRESETS["W8A16"] == QuantScheme(8, None, True)
    assert PRESETS["W4A16"] == QuantScheme(4, 128, True)
    assert PRESETS["W3A16"].bits == 3 and not PRESETS["W3A16"].symmetric
    assert PRESETS["W2A16"].bits == 2
    assert QuantConfig().scheme == PRESETS["W4A16"]


@pytest.mark.parametrize("name,bits,group,sym", [
    ("W4A16", 4, 128, True), ("w4a16-g32", 4, 32, True), ("W4A16-g64-asym", 4, 64, False),
    ("W4A16-pc", 4, None, True), ("w8a16", 8, None, True), ("W8A16-g128-asym", 8, 128, False),
    ("W3A16-sym", 3, 128, True), ("w2a16_g32", 2, 32, False),
])
def test_preset_names(name, bits, group, sym):
    s = QuantConfig.preset(name).scheme
    assert (s.bits, s.group_size, s.symmetric) == (bits, group, sym)


def test_preset_changes():
    c = QuantConfig.preset("W4A16", group_size=32, symmetric=False, ignore=[], scale_dtype=torch.float32)
    assert c.scheme == QuantScheme(4, 32, False, torch.float32) and c.ignore == []
    assert c.scheme.name == "W4A16-g32-asym"
    with pytest.raises(TypeError, match="unknown arguments"):
        QuantConfig.preset("W4A16", groupsize=32)


@pytest.mark.parametrize("name,match", [("W5A8", "unknown preset"), ("W4A16-g", "unknown suffix"),
                                        ("W4A16-fast", "unknown suffix")])
def test_bad_preset(name, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.preset(name)


@pytest.mark.parametrize("kw,match", [
    (dict(bits=1), "bits must be one of"), (dict(bits=16), "bits must be one of"),
    (dict(bits=4.0), "bits must be one of"), (dict(group_size=0), "group_size must be a positive"),
    (dict(group_size=-128), "group_size must be a positive"), (dict(scale_dtype=torch.int8), "scale_dtype"),
    (dict(clip_ratio=0.0), "clip_ratio"), (dict(clip_ratio=1.5), "clip_ratio"),
])
def test_bad_scheme(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantScheme(**kw)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.down_proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


def _names(config, model):
    return [n for n, m in model.named_modules() if config.is_target(n, m)]


def test_selection_and_ignore():
    model = nn.ModuleDict({"layers": nn.ModuleList([Block(), Block()]), "lm_head": nn.Linear(8, 4)})
    assert _names(QuantConfig(), model) == [
        "layers.0.q_proj", "layers.0.down_proj", "layers.1.q_proj", "layers.1.down_proj"]
    assert "lm_head" in _names(QuantConfig(ignore=[]), model)
    assert _names(QuantConfig(targets=[r"\.q_proj$"]), model) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert _names(QuantConfig(targets=r"layers\.1\."), model) == ["layers.1.q_proj", "layers.1.down_proj"]
    assert _names(QuantConfig(ignore=["down_proj", "lm_head"]), model) == ["layers.0.q_proj", "layers.1.q_proj"]
    # Non-Linear modules are never targets, whatever the pattern says.
    assert _names(QuantConfig(targets=["norm"]), model) == []
    assert QuantConfig(targets=["norm", "q_proj"]).unmatched_patterns(
        n for n, m in model.named_modules() if isinstance(m, nn.Linear)) == ["norm"]


def test_overrides_last_wins():
    c = QuantConfig(overrides={"down_proj": {"bits": 8, "group_size": None}, r"layers\.1\.down": "W3A16-g32"})
    assert c.scheme_for("layers.0.q_proj") == PRESETS["W4A16"]
    assert c.scheme_for("layers.0.down_proj") == QuantScheme(8, None, True)
    assert c.scheme_for("layers.1.down_proj") == QuantScheme(3, 32, False)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(targets=["(unclosed"]), ValueError, "not a valid regex"),
    (dict(ignore=["[bad"]), ValueError, "not a valid regex"),
    (dict(targets=[3]), TypeError, "a target must be"),
    (dict(targets=[int]), TypeError, "not an nn.Module"),
    (dict(overrides={"x": {"bitz": 4}}), ValueError, "not QuantScheme fields"),
    (dict(overrides={"x": {"bits": 9}}), ValueError, "bits must be one of"),
    (dict(scheme=3), TypeError, "scheme must be"),
])
def test_bad_config(kw, exc, match):
    with pytest.raises(exc, match=match):
        QuantConfig(**kw)
