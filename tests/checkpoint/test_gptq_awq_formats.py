"""GPTQ and AWQ (GEMM) checkpoint formats: export -> import round trips (logits equal the
in-memory quantized model's), act-order through g_idx, per-layer "dynamic" rules, and the
layouts checked against plain-PyTorch packers/unpackers written from the formats'
published descriptions (AutoGPTQ's ``pack`` loop and vLLM's fallback dequantization for
GPTQ, AutoAWQ's ``WQLinear_GEMM.from_linear`` / ``unpack_awq`` + ``reverse_awq_order`` for
AWQ), independent of lowbit's packing code. Neither GPTQModel nor AutoAWQ installs on this
CPU machine (CUDA builds), so these stand in for the peers.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import _io
from lowbit.nn import QuantLinear

from _helpers import raises, random_weight, stories260k
from _tiny_models import tiny_model

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


# -- independent reference packers / unpackers -------------------------------------------

def _u32_to_i32(words: torch.Tensor) -> torch.Tensor:
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def autogptq_pack_rows(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's ``QuantLinear.pack`` loop: int [R, C] -> int32 [R * bits / 32, C], packed
    along dim 0 (3 bits: 32 values in 3 words, values 10 and 21 straddling)."""
    r, c = intweight.shape
    w = intweight.to(torch.int64)
    out = torch.zeros(r * bits // 32, c, dtype=torch.int64)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= w[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                out[row] |= w[j] << (3 * (j - i))
            i += 10
            out[row] |= w[i] << 30
            row += 1
            out[row] |= (w[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                out[row] |= w[j] << (3 * (j - i) + 1)
            i += 10
            out[row] |= w[i] << 31
            row += 1
            out[row] |= (w[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                out[row] |= w[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return _u32_to_i32(out)


_WF3 = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
                     [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                     [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]])


def vllm_unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """vLLM's fallback GPTQ unpacking (shift table ``wf``; the 3-bit recipe that stitches
    values 10 and 21): int32 [R * bits / 32, C] -> int64 [R, C]."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    c = words.shape[1]
    if bits in (2, 4, 8):
        wf = torch.arange(0, 32, bits)
        v = (words[:, None, :] >> wf[None, :, None]) & (2**bits - 1)
        return v.reshape(-1, c)
    w = words.reshape(-1, 3, 1, c).expand(-1, -1, 12, -1)
    w = (w >> _WF3[None, :, :, None]) & 0x7
    w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
    w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
    w = torch.cat([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], dim=1)
    return w.reshape(-1, c)


def gptq_dense(qweight, qzeros, scales, g_idx, bits, v1=True) -> torch.Tensor:
    """The float weight [N, K] of a GPTQ layer: ``scales[g_idx] * (q - zeros[g_idx])`` with
    the v1 zero offset added back (ExLlama / vLLM)."""
    q = vllm_unpack_rows(qweight, bits)                          # [K, N]
    z = vllm_unpack_rows(qzeros.t().contiguous(), bits).t()      # [G, N]
    if v1:
        z = z + 1
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g]).float()).t()


def autoawq_pack_cols(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ ``WQLinear_GEMM.from_linear``'s loop: int [R, C] -> int32 [R, C / 8], field i
    of word ``col`` holding column ``col * 8 + order_map[i]``."""
    r, c = intweight.shape
    w = intweight.to(torch.int64)
    out = torch.zeros(r, c // 8, dtype=torch.int64)
    for col in range(c // 8):
        for i in range(8):
            out[:, col] |= w[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    return _u32_to_i32(out)


def awq_dense(qweight, qzeros, scales, group_size) -> torch.Tensor:
    """AutoAWQ ``dequantize_gemm``: unpack_awq, reverse_awq_order, ``(q - z) * s``; [N, K]."""
    shifts = torch.arange(0, 32, 4)
    iw = ((qweight.to(torch.int64) & 0xFFFFFFFF)[:, :, None] >> shifts).reshape(qweight.shape[0], -1)
    iz = ((qzeros.to(torch.int64) & 0xFFFFFFFF)[:, :, None] >> shifts).reshape(qzeros.shape[0], -1)
    rev = torch.arange(iz.shape[-1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    iw, iz = iw[:, rev] & 15, iz[:, rev] & 15
    k = iw.shape[0]
    s = scales.float().repeat_interleave(group_size, dim=0)[:k]
    z = iz.repeat_interleave(group_size, dim=0)[:k]
    return ((iw - z).float() * s).t()


# -- helpers ----------------------------------------------------------------------------

def _quantized(cfg, family="llama", method="rtn", **kwargs):
    model, vocab = tiny_model(family)
    lowbit.quantize(model, cfg, method=method, progress=False, **kwargs)
    return model, vocab


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _check_layers_equal(a, b):
    la, lb = _quant_layers(a), _quant_layers(b)
    assert la.keys() == lb.keys()
    for name, x in la.items():
        y = lb[name]
        assert (x.bits, x.group_size, x.per_channel) == (y.bits, y.group_size, y.per_channel), name
        assert torch.equal(x.codes(), y.codes()), name
        assert torch.equal(x.dequantize(), y.dequantize()), name
        assert torch.equal(x.g_idx, y.g_idx), name
        assert (x.bias is None) == (y.bias is None), name
        if x.bias is not None:
            assert torch.equal(x.bias, y.bias), name


def _rewrite(directory, change):
    """Re-save a checkpoint folder after ``change(config, tensors)`` (manifest rebuilt)."""
    config, tensors = _io.load_folder(directory)
    change(config, tensors)
    _io.save_folder(directory, tensors, config)


def _check_file_layouts(directory, model, fmt):
    """Decode every quantized layer from the files with the independent unpackers and
    compare with the in-memory layer's weight."""
    config, tensors = _io.load_folder(directory)
    qc = config["quantization_config"]
    for name, layer in _quant_layers(model).items():
        if fmt == "awq":
            gs = layer.in_features if qc["group_size"] == -1 else qc["group_size"]
            w = awq_dense(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], gs)
        else:
            w = gptq_dense(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"],
                           tensors[f"{name}.g_idx"], layer.bits, v1=qc["checkpoint_format"] == "gptq")
        assert torch.equal(w, layer.dequantize()), name


# -- GPTQ round trips ---------------------------------------------------------------------

@pytest.mark.parametrize("scheme, checkpoint_format", [
    ("W4A16-g32", "gptq"), ("W4A16-g32-asym", "gptq"), ("W8A16-g32", "gptq"), ("W8A16-pc", "gptq"),
    ("W4A16-pc-asym", "gptq_v2"), ("W3A16-g32-asym", "gptq_v2"), ("W3A16-g64", "gptq"), ("W2A16-g32-asym", "gptq_v2"),
])
def test_gptq_round_trip(tmp_path, scheme, checkpoint_format):
    model, vocab = _quantized(scheme)
    ids = torch.randint(0, vocab, (2, 12))
    ref = _logits(model, ids)
    lowbit.save_quantized(model, tmp_path, format="gptq", checkpoint_format=checkpoint_format)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    s = lowbit.QuantConfig.preset(scheme).scheme
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == checkpoint_format
    assert qc["bits"] == s.bits and qc["group_size"] == (-1 if s.group_size is None else s.group_size)
    assert qc["sym"] == s.symmetric and qc["desc_act"] is False and qc["lm_head"] is False
    assert "dynamic" not in qc
    _check_file_layouts(tmp_path, model, "gptq")
    loaded = lowbit.load_quantized(tmp_path)
    assert type(loaded) is type(model)
    assert torch.equal(_logits(loaded, ids), ref)
    _check_layers_equal(model, loaded)
    assert all(m.symmetric == s.symmetric for m in _quant_layers(loaded).values())


def test_gptq_v1_stores_zero_minus_one(tmp_path):
    model, _ = _quantized("W4A16-g32")
    lowbit.save_quantized(model, tmp_path, format="gptq")
    _, tensors = _io.load_folder(tmp_path)
    # Symmetric 4-bit: z = 8 everywhere, stored as 7 in every nibble (0x77777777).
    qzeros = tensors["model.layers.0.self_attn.q_proj.qzeros"]
    assert qzeros.dtype == torch.int32 and bool((qzeros == 0x77777777).all())
    assert tensors["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].shape == (64 * 4 // 32, 64)
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.g_idx"], torch.arange(64, dtype=torch.int32) // 32)
    lowbit.save_quantized(model, tmp_path, format="gptq", checkpoint_format="gptq_v2")
    _, tensors = _io.load_folder(tmp_path)
    assert bool((tensors["model.layers.0.self_attn.q_proj.qzeros"] == -2004318072).all())   # 0x88888888


def test_gptq_act_order_round_trip(tmp_path):
    model, vocab = tiny_model("llama")
    calib = torch.randint(0, vocab, (4, 32))
    lowbit.quantize(model, "W4A16-g16", method=lowbit.GPTQ(act_order=True), calibration=calib, progress=False)
    layers = _quant_layers(model)
    assert all(m.perm is not None for m in layers.values())
    ids = torch.randint(0, vocab, (2, 12))
    ref = _logits(model, ids)
    lowbit.save_quantized(model, tmp_path, format="gptq")
    config, tensors = _io.load_folder(tmp_path)
    assert config["quantization_config"]["desc_act"] is True
    for name, m in layers.items():
        assert torch.equal(tensors[f"{name}.g_idx"], m.g_idx)
        assert not torch.equal(m.g_idx, torch.arange(m.in_features, dtype=torch.int32) // 16)
    _check_file_layouts(tmp_path, model, "gptq")
    loaded = lowbit.load_quantized(tmp_path)
    _check_layers_equal(model, loaded)
    for name, m in _quant_layers(loaded).items():
        assert m.perm is not None
        # lowbit's perm is the stable sort of g_idx (within a group, input order)
        assert torch.equal(m.perm, torch.sort(m.g_idx.long(), stable=True).indices)
    # Same weights; the activations are gathered in another order inside each group, so
    # the float32 sums may round differently.
    out = _logits(loaded, ids)
    assert torch.allclose(out, ref, rtol=0, atol=1e-4), (out - ref).abs().max()
    # Exported again, the files are the same.
    lowbit.save_quantized(loaded, tmp_path / "again", format="gptq")
    _, again = _io.load_folder(tmp_path / "again")
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


def _act_order_layer(k, n, bits, group_size, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    g = -(-k // group_size)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, g, generator=gen) + 0.5).to(torch.float16)
    zeros = torch.randint(1, 2**bits, (n, g), generator=gen, dtype=torch.uint8)
    perm = torch.randperm(k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    return QuantLinear.from_codes(codes, scales, zeros, bits, group_size, symmetric=False, bias=b, perm=perm)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_synthetic_act_order_with_skeleton(tmp_path, bits):
    """A plain nn.Sequential (no transformers config): act-order QuantLinears with random
    perms, loaded back into an nn.Linear skeleton."""
    model = nn.Sequential(_act_order_layer(64, 32, bits, 16, 1), nn.ReLU(), _act_order_layer(32, 64, bits, 8, 2))
    lowbit.save_quantized(model, tmp_path, format="gptq", checkpoint_format="gptq_v2")
    _check_file_layouts(tmp_path, model, "gptq")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["desc_act"] is True
    assert config["quantization_config"]["dynamic"] == {"+:^2$": {"group_size": 8}}
    skeleton = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    loaded = lowbit.load_quantized(tmp_path, model=skeleton)
    _check_layers_equal(model, loaded)
    x = torch.randn(3, 64)
    out, ref = loaded(x), model(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_gptq_import_autogptq_packed(tmp_path):
    """A v1 act-order checkpoint packed by AutoGPTQ's own loop (not lowbit's packer)
    imports to the weight its formula gives."""
    k, n, bits, gs = 96, 64, 3, 32
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 8, (k, n), generator=gen)
    z = torch.randint(1, 8, (k // gs, n), generator=gen)
    scales = (torch.rand(k // gs, n, generator=gen) + 0.1).to(torch.float16)
    g_idx = (torch.randperm(k, generator=gen) // gs).to(torch.int32)
    tensors = {"0.qweight": autogptq_pack_rows(q, bits), "0.qzeros": autogptq_pack_rows((z - 1).t(), bits).t(),
               "0.scales": scales, "0.g_idx": g_idx, "0.bias": torch.randn(n)}
    qc = {"quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": True, "sym": False,
          "checkpoint_format": "gptq"}
    _io.save_folder(tmp_path, tensors, {"quantization_config": qc})
    loaded = lowbit.load_quantized(tmp_path, model=nn.Sequential(nn.Linear(k, n)))
    layer = loaded[0]
    g = g_idx.long()
    expected = (scales.float()[g] * (q - z[g]).float()).t()
    assert torch.equal(layer.dequantize(), expected)
    assert torch.equal(layer.dequantize(), gptq_dense(*[tensors[f"0.{t}"] for t in ("qweight", "qzeros", "scales",
                                                                                     "g_idx")], bits))
    assert torch.equal(layer.bias, tensors["0.bias"])


def test_gptq_mixed_layers_dynamic_and_mma_layout(tmp_path):
    """Per-layer bits / group size / symmetry and a float layer become GPTQModel dynamic
    rules; a model re-laid for the tensor-core kernel exports the same files."""
    cfg = lowbit.QuantConfig.preset("W4A16-g32", ignore=["lm_head", r"layers\.1\.self_attn\.k_proj"],
                                    overrides={"mlp": {"bits": 8, "group_size": None},
                                               r"layers\.0\.self_attn\.v_proj": {"symmetric": False}})
    model, vocab = _quantized(cfg)
    ids = torch.randint(0, vocab, (2, 12))
    ref = _logits(model, ids)
    lowbit.save_quantized(model, tmp_path / "a", format="gptq")
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    dyn = qc["dynamic"]
    assert dyn[r"-:^model\.layers\.1\.self_attn\.k_proj$"] == {}
    assert dyn[r"+:^model\.layers\.0\.mlp\.down_proj$"] == {"bits": 8, "group_size": -1}
    assert dyn[r"+:^model\.layers\.0\.self_attn\.v_proj$"] == {"sym": False}
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (4, 32, True)
    for name in _quant_layers(model):    # vLLM's get_dynamic_override gives each layer its own spec
        rule = next((v for p, v in dyn.items() if re.match(p.removeprefix("+:"), name)), {})
        assert rule.get("bits", qc["bits"]) == model.get_submodule(name).bits
    loaded = lowbit.load_quantized(tmp_path / "a")
    assert isinstance(loaded.model.layers[1].self_attn.k_proj, nn.Linear)
    assert torch.equal(_logits(loaded, ids), ref)
    _check_layers_equal(model, loaded)

    assert lowbit.nn.pack_mma(model) > 0
    lowbit.save_quantized(model, tmp_path / "b", format="gptq")
    _, a = _io.load_folder(tmp_path / "a")
    _, b = _io.load_folder(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gptq_stories260k(tmp_path):
    """stories260K: attention W4 g32, the MLP (172 wide: not 4-bit packable) W8 per-channel
    through a dynamic rule; logits equal after reload."""
    model, tok = stories260k()
    cfg = lowbit.QuantConfig.preset("W4A16-g32", overrides={"mlp": {"bits": 8, "group_size": None}})
    lowbit.quantize(model, cfg, progress=False)
    ids = torch.tensor([tok("Once upon a time there was a little girl").input_ids])
    ref = _logits(model, ids)
    lowbit.save_quantized(model, tmp_path, format="gptq")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    _check_file_layouts(tmp_path, model, "gptq")
    _, tensors = _io.load_folder(tmp_path)
    assert "lm_head.weight" not in tensors   # tied to the embedding: stored once
    loaded = lowbit.load_quantized(tmp_path)
    assert torch.equal(_logits(loaded, ids), ref)
    _check_layers_equal(model, loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


# -- AWQ round trips ----------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["W4A16-g32-asym", "W4A16-g64", "W4A16-pc-asym"])
def test_awq_round_trip(tmp_path, scheme):
    model, vocab = _quantized(scheme)
    ids = torch.randint(0, vocab, (2, 12))
    ref = _logits(model, ids)
    lowbit.save_quantized(model, tmp_path, format="awq")
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    s = lowbit.QuantConfig.preset(scheme).scheme
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": -1 if s.group_size is None else s.group_size,
                  "zero_point": True, "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    _check_file_layouts(tmp_path, model, "awq")
    _, tensors = _io.load_folder(tmp_path)
    name = "model.layers.0.mlp.gate_proj"
    layer = model.get_submodule(name)
    assert tensors[f"{name}.qweight"].shape == (64, 128 // 8)
    assert torch.equal(tensors[f"{name}.qweight"], autoawq_pack_cols(layer.codes().t()))
    assert torch.equal(tensors[f"{name}.qzeros"], autoawq_pack_cols(layer.zeros))
    assert f"{name}.g_idx" not in tensors
    loaded = lowbit.load_quantized(tmp_path)
    assert torch.equal(_logits(loaded, ids), ref)
    _check_layers_equal(model, loaded)
    assert all(m.symmetric == s.symmetric for m in _quant_layers(loaded).values())


def test_awq_import_autoawq_packed(tmp_path):
    k, n, gs = 64, 48, 16
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (k // gs, n), generator=gen)
    scales = (torch.rand(k // gs, n, generator=gen) + 0.1).to(torch.float16)
    tensors = {"0.qweight": autoawq_pack_cols(q), "0.qzeros": autoawq_pack_cols(z), "0.scales": scales}
    qc = {"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": True, "version": "GEMM"}
    _io.save_folder(tmp_path, tensors, {"quantization_config": qc})
    loaded = lowbit.load_quantized(tmp_path, model=nn.Sequential(nn.Linear(k, n, bias=False)))
    expected = awq_dense(tensors["0.qweight"], tensors["0.qzeros"], scales, gs)
    assert torch.equal(loaded[0].dequantize(), expected)
    assert torch.equal(expected, ((q - z.repeat_interleave(gs, 0)).float()
                                  * scales.float().repeat_interleave(gs, 0)).t())


def test_awq_stories260k(tmp_path):
    """stories260K with its MLP left in float (172 outputs do not pack 8 per word):
    modules_to_not_convert lists them; logits equal after reload."""
    model, tok = stories260k()
    lowbit.quantize(model, lowbit.QuantConfig.preset("W4A16-g32-asym", ignore=["lm_head", "mlp"]), progress=False)
    ids = torch.tensor([tok("Once upon a time there was a little girl").input_ids])
    ref = _logits(model, ids)
    lowbit.save_quantized(model, tmp_path, format="awq")
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in qc["modules_to_not_convert"]
    _check_file_layouts(tmp_path, model, "awq")
    loaded = lowbit.load_quantized(tmp_path)
    assert torch.equal(_logits(loaded, ids), ref)
    _check_layers_equal(model, loaded)


def test_configs_parse_in_transformers(tmp_path):
    """transformers' own config classes read the exported quantization_config."""
    from transformers.utils.quantization_config import AwqConfig, GPTQConfig

    model, _ = _quantized("W4A16-g32-asym")
    lowbit.save_quantized(model, tmp_path / "g", format="gptq", checkpoint_format="gptq_v2")
    lowbit.save_quantized(model, tmp_path / "a", format="awq")
    g = GPTQConfig.from_dict(json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"])
    assert (g.bits, g.group_size, g.sym, g.desc_act, g.format) == (4, 32, False, False, "gptq_v2")
    a = AwqConfig.from_dict(json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"])
    assert (a.bits, a.group_size, a.zero_point, a.format, a.modules_to_not_convert) == (4, 32, True, "gemm",
                                                                                       ["lm_head"])


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_w8a8_layers_rejected(tmp_path, fmt):
    model, _ = _quantized("W8A8")
    raises(ValueError, r"'model\.layers\.0\.self_attn\.q_proj' is a W8A8Linear.*compressed-tensors",
           lowbit.save_quantized, model, tmp_path, format=fmt)
    assert not (tmp_path / "config.json").exists()


def test_gptq_export_errors(tmp_path):
    model, _ = _quantized("W4A16-g32-asym")
    layer = model.model.layers[0].self_attn.q_proj
    layer.zeros[0, 0] = 0
    raises(ValueError, r"q_proj' has zero points equal to 0.*checkpoint_format='gptq_v2'",
           lowbit.save_quantized, model, tmp_path, format="gptq")
    lowbit.save_quantized(model, tmp_path, format="gptq", checkpoint_format="gptq_v2")   # v2 holds it
    assert lowbit.load_quantized(tmp_path).model.layers[0].self_attn.q_proj.zeros[0, 0] == 0

    model, _ = _quantized(lowbit.QuantConfig.preset("W4A16-g32", scale_dtype=torch.float32))
    raises(ValueError, r"float32 scales do not fit float16.*scale_dtype=torch.float16",
           lowbit.save_quantized, model, tmp_path / "x", format="gptq")
    model, _ = stories260k()
    lowbit.quantize(model, "W4A16-g4", progress=False)
    raises(ValueError, r"gate_proj' \(64 inputs, 172 outputs\) cannot be packed.*multiples of 32",
           lowbit.save_quantized, model, tmp_path / "x", format="gptq")
    raises(ValueError, r"unknown options \['desc_act'\]", lowbit.save_quantized, model, tmp_path / "x",
           format="gptq", desc_act=True)
    raises(ValueError, r"checkpoint_format must be one of", lowbit.save_quantized, model, tmp_path / "x",
           format="gptq", checkpoint_format="marlin")
    raises(ValueError, r"no QuantLinear layer", lowbit.save_quantized, tiny_model("llama")[0], tmp_path / "x",
           format="gptq")


def test_awq_export_errors(tmp_path):
    model, _ = _quantized("W8A16-g32")
    raises(ValueError, r"has 8-bit codes; the AWQ GEMM format holds 4-bit", lowbit.save_quantized, model, tmp_path,
           format="awq")
    model = nn.Sequential(_act_order_layer(64, 32, 4, 16))
    raises(ValueError, r"'0' is act-order.*format='gptq'", lowbit.save_quantized, model, tmp_path, format="awq")
    model, _ = _quantized(lowbit.QuantConfig.preset("W4A16-g32", overrides={"mlp": {"group_size": 64}}))
    raises(ValueError, r"gate_proj' has group size 64 but .*q_proj' has 32.*dynamic", lowbit.save_quantized, model,
           tmp_path, format="awq")
    model = nn.Sequential(QuantLinear(64, 20, bits=4, group_size=32))
    raises(ValueError, r"'0' has 20 outputs.*multiple of 8", lowbit.save_quantized, model, tmp_path, format="awq")


def test_gptq_import_errors(tmp_path):
    model, _ = _quantized("W4A16-g32")
    lowbit.save_quantized(model, tmp_path, format="gptq")
    name = "model.layers.0.mlp.up_proj"

    def wrong_qzeros(config, tensors):
        tensors[f"{name}.qzeros"] = tensors[f"{name}.qzeros"][:, :-1].contiguous()
    _rewrite(tmp_path, wrong_qzeros)
    raises(lowbit.checkpoint.CheckpointError, rf"tensor '{re.escape(name)}\.qzeros' has shape \[2, 15\], "
           r"expected \[2, 16\]", lowbit.load_quantized, tmp_path)

    lowbit.save_quantized(model, tmp_path, format="gptq")

    def bad_g_idx(config, tensors):
        g = tensors[f"{name}.g_idx"].clone()
        g[0] = 1   # group 1 gets 33 features, group 0 31
        tensors[f"{name}.g_idx"] = g
    _rewrite(tmp_path, bad_g_idx)
    raises(lowbit.checkpoint.CheckpointError, rf"'{re.escape(name)}\.g_idx' does not give every group 32 input "
           r"features \(counts \[31, 33\]\)", lowbit.load_quantized, tmp_path)

    lowbit.save_quantized(model, tmp_path, format="gptq")
    _rewrite(tmp_path, lambda c, t: t.pop(f"{name}.scales"))
    raises(lowbit.checkpoint.CheckpointError, rf"tensor '{re.escape(name)}\.scales' is missing",
           lowbit.load_quantized, tmp_path)

    lowbit.save_quantized(model, tmp_path, format="gptq")
    _rewrite(tmp_path, lambda c, t: t.__setitem__(f"{name}.qweight", t[f"{name}.qweight"].float()))
    raises(lowbit.checkpoint.CheckpointError, rf"'{re.escape(name)}\.qweight' has dtype torch.float32, expected int32",
           lowbit.load_quantized, tmp_path)

    lowbit.save_quantized(model, tmp_path, format="gptq")
    _rewrite(tmp_path, lambda c, t: t.pop("model.norm.weight"))
    raises(lowbit.checkpoint.CheckpointError, r"no tensor for the model's \['model\.norm\.weight'\]",
           lowbit.load_quantized, tmp_path)

    lowbit.save_quantized(model, tmp_path, format="gptq")
    _rewrite(tmp_path, lambda c, t: c["quantization_config"].update(checkpoint_format="marlin"))
    raises(lowbit.checkpoint.CheckpointError, r"checkpoint_format 'marlin'", lowbit.load_quantized, tmp_path)

    lowbit.save_quantized(model, tmp_path, format="gptq")
    _rewrite(tmp_path, lambda c, t: c["quantization_config"].update(dynamic={f"-:{re.escape(name)}": {}}))
    raises(lowbit.checkpoint.CheckpointError, r"dynamic rules leave that layer unquantized", lowbit.load_quantized,
           tmp_path)


def test_awq_import_errors(tmp_path):
    model, _ = _quantized("W4A16-g32-asym")
    lowbit.save_quantized(model, tmp_path, format="awq")
    name = "model.layers.1.self_attn.o_proj"
    _rewrite(tmp_path, lambda c, t: t.__setitem__(f"{name}.qzeros", t[f"{name}.qzeros"][:1].contiguous()))
    raises(lowbit.checkpoint.CheckpointError, rf"tensor '{re.escape(name)}\.qzeros' has shape \[1, 8\], "
           r"expected \[2, 8\]", lowbit.load_quantized, tmp_path)
    lowbit.save_quantized(model, tmp_path, format="awq")
    _rewrite(tmp_path, lambda c, t: c["quantization_config"].update(version="gemv"))
    raises(lowbit.checkpoint.CheckpointError, r"AWQ version 'gemv'", lowbit.load_quantized, tmp_path)
    lowbit.save_quantized(model, tmp_path, format="awq")
    _rewrite(tmp_path, lambda c, t: c["quantization_config"].update(bits=8))
    raises(lowbit.checkpoint.CheckpointError, r"AWQ bits=8", lowbit.load_quantized, tmp_path)
    lowbit.save_quantized(model, tmp_path, format="awq")
    _rewrite(tmp_path, lambda c, t: t.__setitem__("extra.qweight", torch.zeros(8, 1, dtype=torch.int32)))
    raises(lowbit.checkpoint.CheckpointError, r"quantizes 'extra', but the model has no module",
           lowbit.load_quantized, tmp_path)
