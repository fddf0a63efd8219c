"""The compressed-tensors format (lowbit.formats.compressed_tensors): export -> import round
trips of every lowbit layer kind, the exported files read back by compressed-tensors' own
compressors and by transformers' loader, the llm-compressor checkpoints of tests/data
(made by benchmarks/peers/make_ct_checkpoint.py) imported and compared with the peer's own
decompression, and the errors for what lowbit cannot hold.

References ("the peer's loader", all on the CPU):

* ``_library_dense``: a float model whose quantized layers' weights are what
  compressed-tensors' compressor for the layer's format decompresses
  (``BaseCompressor.decompress``, as transformers' dequantizing load and the library's
  own converter call it), matched to layers with the library's ``is_match``. Its dtype is
  the scales' (float16 scales: the weight rounded to float16), hence the rtol of 2e-3
  where scales are float16, exact where they are float32.
* transformers' ``from_pretrained`` of the folder (compressed-tensors' path: compress on
  load, decompress and fake-quantize activations in forward). It fails on asymmetric
  pack-quantized checkpoints in this transformers / compressed-tensors pair (its zero-point
  parameter has the unpacked shape), including llm-compressor's own, so it is used for the
  symmetric ones; and its dynamic int8 activations use ``absmax / 127.5`` where vLLM and
  lowbit use ``absmax / 127``, so dynamic W8A8 is compared against the decompressed weights
  with per-token ``absmax / 127`` activations instead. Where activations are quantized,
  layers are compared on the inputs they see in the model (a float rounding difference
  upstream can flip an activation code, so whole-model logits agree only to that noise).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.formats import format_of_config, get_format
from lowbit.formats._io import CheckpointError
from lowbit.nn import FP8Linear, QuantLinear, W8A8Linear

pytest.importorskip("compressed_tensors")

DATA = Path(__file__).resolve().parents[1] / "data"
PEER = {"w4a16": DATA / "ct_stories260k_w4a16", "w8a8": DATA / "ct_stories260k_w8a8",
        "fp8": DATA / "ct_stories260k_fp8"}
LOWBIT_LAYERS = (QuantLinear, W8A8Linear, FP8Linear)


def _llama(hidden=128, inter=256, seed=0):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def base():
    """Llama, hidden 128, intermediate 256 (every K a multiple of 128), 2 layers, vocab 256."""
    return _llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _quantized(base, preset, ids, **kw):
    m = copy.deepcopy(base)
    static = "static" in preset if isinstance(preset, str) else False
    lowbit.quantize(m, preset, calibration=ids if static else None, progress=False, **kw)
    return m


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def _qlayers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LOWBIT_LAYERS)}


def _library_dense(folder: Path):
    """The checkpoint decompressed by compressed-tensors' own compressors into a float32
    transformers model (see the module docstring)."""
    import transformers
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    qc = QuantizationConfig.model_validate(cfg.pop("quantization_config"))
    hf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.float32).eval()
    sd = load_file(str(folder / "model.safetensors"))
    n = 0
    for name, mod in model.named_modules():
        for scheme in qc.config_groups.values():
            if isinstance(mod, torch.nn.Linear) and is_match(name, mod, scheme.targets, qc.ignore):
                comp = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
                local = {p: sd.pop(f"{name}.{p}") for p in comp.compression_param_names(scheme)}
                sd[f"{name}.weight"] = comp.decompress(local, scheme)["weight"].float()
                n += 1
                break
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert all(k.endswith(".input_scale") for k in unexpected), unexpected   # static activation scales
    assert set(missing) <= {"lm_head.weight"} and (not missing or hf.tie_word_embeddings), missing
    assert n > 0
    return model


def _layer_inputs(model, ids) -> dict:
    """The input of every lowbit layer in a forward of ``model`` on ``ids``."""
    seen, hooks = {}, []
    for name, layer in _qlayers(model).items():
        hooks.append(layer.register_forward_pre_hook(lambda _, args, name=name: seen.__setitem__(name, args[0])))
    _logits(model, ids)
    for h in hooks:
        h.remove()
    return seen


def _int8_fake(x):
    """Per-token symmetric int8 fake quantization, absmax / 127 (vLLM's and lowbit's)."""
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return (x / s).round().clamp(-128, 127) * s


def _transformers_load(folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def _copy_peer(tmp_path, which="w4a16") -> Path:
    d = tmp_path / PEER[which].name
    shutil.copytree(PEER[which], d)
    return d


def _edit_config(folder: Path, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))


# -- export -> import ----------------------------------------------------------------------

ROUND_TRIPS = ["W4A16-g32", "W4A16-g32-asym", "W4A16-g128", "W4A16-g128-asym", "W4A16-pc-asym", "W8A16",
               "W3A16-g32", "W8A8", "W8A8-static", "FP8", "FP8-static"]
FORMAT = {"W8A8": "int-quantized", "FP8": "float-quantized"}


@pytest.mark.parametrize("preset", ROUND_TRIPS)
def test_round_trip(base, ids, tmp_path, preset):
    m = _quantized(base, preset, ids)
    ref = _logits(m, ids)
    lowbit.save_quantized(m, tmp_path, format="compressed-tensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == FORMAT.get(preset.split("-")[0], "pack-quantized")
    assert qc["ignore"] == ["lm_head"] and list(qc["config_groups"]) == ["group_0"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert format_of_config(cfg) is get_format("compressed-tensors")

    back = lowbit.load_quantized(tmp_path)
    assert torch.equal(_logits(back, ids), ref)
    before, after = _qlayers(m), _qlayers(back)
    assert before.keys() == after.keys() and len(before) == 14
    for name, layer in before.items():
        assert type(after[name]) is type(layer)
        assert torch.equal(after[name].dequantize(), layer.dequantize()), name
        if isinstance(layer, QuantLinear):
            assert (after[name].bits, after[name].group_size, after[name].per_channel, after[name].symmetric) == \
                (layer.bits, layer.group_size, layer.per_channel, layer.symmetric)
            assert after[name].scales.dtype == layer.scales.dtype
        else:
            assert (after[name].input_scale is None) == (layer.input_scale is None)
            if layer.input_scale is not None:
                assert torch.equal(after[name].input_scale, layer.input_scale)


@pytest.mark.parametrize("preset", ["W4A16-g32", "W4A16-g128-asym", "W8A16", "W3A16-g32", "W8A8", "W8A8-static",
                                    "FP8", "FP8-static"])
def test_library_decompresses_export(base, ids, tmp_path, preset):
    """compressed-tensors' compressors read the exported layers back to lowbit's weights;
    weight-only: the dense model's logits equal lowbit's (float16 scales: to their rounding)."""
    m = _quantized(base, preset, ids)
    lowbit.save_quantized(m, tmp_path, format="compressed-tensors")
    dense = _library_dense(tmp_path)
    modules = dict(dense.named_modules())
    fp32_scales = preset.startswith(("W8A8", "FP8"))
    for name, layer in _qlayers(m).items():
        w = modules[name].weight
        if fp32_scales:
            assert torch.equal(w, layer.dequantize()), name
        else:
            torch.testing.assert_close(w, layer.dequantize(), rtol=1e-3, atol=0, msg=name)
    if preset.startswith(("W8A8", "FP8")):
        return
    a, b = _logits(m, ids), _logits(dense, ids)
    torch.testing.assert_close(b, a, rtol=0, atol=2e-3 * float(a.abs().max()))


@pytest.mark.parametrize("preset", ["W4A16-g32", "W8A16", "W8A8-static", "FP8", "FP8-static"])
def test_transformers_loads_export(base, ids, tmp_path, preset):
    """transformers' compressed-tensors load of the export (its forward decompresses the
    weights and fake-quantizes activations) computes lowbit's logits: exactly for weight-only
    layers; with quantized activations, each layer to float32 rounding on the input it sees
    in lowbit's model (and the logits to activation-quantization noise)."""
    m = _quantized(base, preset, ids)
    lowbit.save_quantized(m, tmp_path, format="compressed-tensors")
    peer = _transformers_load(tmp_path)
    a, b = _logits(m, ids), _logits(peer, ids)
    if preset.startswith("W") and "A16" in preset:
        assert torch.equal(a, b)
        return
    torch.testing.assert_close(b, a, rtol=0, atol=1e-2 * float(a.abs().max()))
    modules = dict(peer.named_modules())
    with torch.no_grad():
        for name, x in _layer_inputs(m, ids).items():
            ref = modules[name](x)
            torch.testing.assert_close(_qlayers(m)[name](x), ref, rtol=0, atol=1e-5 * float(ref.abs().max()),
                                       msg=name)


def test_mixed_schemes_and_formats(base, ids, tmp_path):
    """Per-layer schemes become config groups told apart by name regexes; int8 W8A8 layers
    beside pack-quantized ones make the model's format mixed-precision."""
    cfg = lowbit.QuantConfig.preset("W4A16", group_size=32, overrides={"down_proj": "W8A16",
                                                                        r"\.o_proj": {"symmetric": False}})
    m = _quantized(base, cfg, ids)
    w8a8 = W8A8Linear.from_weight(base.model.layers[1].mlp.up_proj.weight.detach())
    m.model.layers[1].mlp.up_proj = w8a8
    ref = _logits(m, ids)
    lowbit.save_quantized(m, tmp_path, format="compressed-tensors")
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    groups = qc["config_groups"]
    assert len(groups) == 4
    fmts = sorted(g["format"] for g in groups.values())
    assert fmts == ["int-quantized", "pack-quantized", "pack-quantized", "pack-quantized"]
    by_format = {g["format"]: g for g in groups.values()}
    # up_proj is both W4 g32 (layer 0) and W8A8 (layer 1): those groups name their layers
    assert by_format["int-quantized"]["targets"] == ["model.layers.1.mlp.up_proj"]
    assert any(g["targets"] == [r"re:(.*\.)?(down_proj)$"] for g in groups.values())
    back = lowbit.load_quantized(tmp_path)
    assert torch.equal(_logits(back, ids), ref)
    assert isinstance(back.model.layers[1].mlp.up_proj, W8A8Linear)
    assert back.model.layers[0].mlp.down_proj.bits == 8 and not back.model.layers[0].self_attn.o_proj.symmetric
    dense = _library_dense(tmp_path)
    for name, layer in _qlayers(m).items():
        torch.testing.assert_close(dict(dense.named_modules())[name].weight, layer.dequantize(), rtol=1e-3, atol=0)


def test_export_bytes_are_lowbit_codes(base, ids, tmp_path):
    """weight_packed is QuantLinear.qweight transposed (same bit stream); int8 / float8
    weights are stored as is; symmetric layers have no zero point."""
    from safetensors.torch import load_file

    m = _quantized(base, "W4A16-g32", ids)
    m.model.layers[0].mlp.up_proj = W8A8Linear.from_weight(base.model.layers[0].mlp.up_proj.weight.detach())
    m.model.layers[0].mlp.gate_proj = FP8Linear.from_weight(base.model.layers[0].mlp.gate_proj.weight.detach())
    lowbit.save_quantized(m, tmp_path, format="compressed-tensors")
    sd = load_file(str(tmp_path / "model.safetensors"))
    q = m.model.layers[1].self_attn.q_proj
    p = "model.layers.1.self_attn.q_proj."
    assert torch.equal(sd[p + "weight_packed"], q.qweight.t())
    assert torch.equal(sd[p + "weight_scale"], q.scales.t()) and sd[p + "weight_scale"].dtype == torch.float16
    assert sd[p + "weight_shape"].tolist() == [128, 128] and p + "weight_zero_point" not in sd
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], m.model.layers[0].mlp.up_proj.weight)
    assert sd["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert sd["model.layers.0.mlp.gate_proj.weight_scale"].shape == (256, 1)
    assert "lm_head.weight" in sd and "model.embed_tokens.weight" in sd


def test_tied_embeddings_and_sharding(ids, tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    lowbit.quantize(m, "W4A16-g32", progress=False)
    ref = _logits(m, ids)
    lowbit.save_quantized(m, tmp_path, format="compressed-tensors", max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index and "model.embed_tokens.weight" in index
    back = lowbit.load_quantized(tmp_path)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    assert torch.equal(_logits(back, ids), ref)


def test_load_into_given_model_dtype_device(base, ids, tmp_path):
    m = _quantized(base, "W4A16-g32", ids)
    lowbit.save_quantized(m, tmp_path, format="compressed-tensors")
    skeleton = _llama(seed=5)
    back = lowbit.load_quantized(tmp_path, model=skeleton)
    assert back is skeleton and torch.equal(_logits(back, ids), _logits(m, ids))
    half = lowbit.load_quantized(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert half.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16   # scales stay as stored


# -- llm-compressor's checkpoints ----------------------------------------------------------------


def test_peer_w4a16(ids):
    """llm-compressor's W4A16 stories260K (group 32 symmetric + per-channel asymmetric
    down_proj, packed zero points) on lowbit's kernels equals compressed-tensors'
    decompression of it, to float32 rounding."""
    m = lowbit.load_quantized(PEER["w4a16"])
    layers = _qlayers(m)
    assert len(layers) == 35 and all(isinstance(x, QuantLinear) for x in layers.values())
    q, down = m.model.layers[2].self_attn.q_proj, m.model.layers[2].mlp.down_proj
    assert (q.bits, q.group_size, q.symmetric, q.scales.dtype) == (4, 32, True, torch.float32)
    assert (down.bits, down.per_channel, down.symmetric, down.in_features) == (4, True, False, 172)
    assert not bool((down.zeros == 8).all())
    dense = _library_dense(PEER["w4a16"])
    modules = dict(dense.named_modules())
    for name, layer in layers.items():
        assert torch.equal(modules[name].weight, layer.dequantize()), name
    a, b = _logits(m, ids), _logits(dense, ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_peer_w8a8(ids):
    """llm-compressor's W8A8 (int8 per-channel weights, dynamic per-token activations):
    lowbit's weights equal the library's decompression; each layer's output on the input it
    sees in the model equals the decompressed weight applied to per-token absmax / 127 int8
    activations (vLLM's dynamic int8), to float32 rounding. Whole-model logits only agree
    to activation-quantization noise: a float rounding difference upstream may flip a code."""
    m = lowbit.load_quantized(PEER["w8a8"])
    layers = _qlayers(m)
    assert len(layers) == 35 and all(isinstance(x, W8A8Linear) and x.input_scale is None for x in layers.values())
    dense = dict(_library_dense(PEER["w8a8"]).named_modules())
    for name, layer in layers.items():
        assert torch.equal(dense[name].weight, layer.dequantize()), name
    inputs = _layer_inputs(m, ids)
    with torch.no_grad():
        for name, layer in layers.items():
            x = inputs[name]
            ref = torch.nn.functional.linear(_int8_fake(x), dense[name].weight)
            torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5 * float(ref.abs().max()), msg=name)


def test_peer_fp8(ids):
    """llm-compressor's FP8_DYNAMIC: each FP8Linear's output on the input it sees in the
    model equals that of transformers' compressed-tensors layer (fp8 weight decompressed,
    activations fake-quantized per token by compressed-tensors), to float32 rounding; so do
    the whole model's logits on these ids."""
    m = lowbit.load_quantized(PEER["fp8"])
    layers = _qlayers(m)
    assert len(layers) == 35 and all(isinstance(x, FP8Linear) and x.weight_scale.dim() == 1
                                     for x in layers.values())
    dense = dict(_library_dense(PEER["fp8"]).named_modules())
    for name, layer in layers.items():
        assert torch.equal(dense[name].weight, layer.dequantize()), name
    peer = _transformers_load(PEER["fp8"])
    a, b = _logits(m, ids), _logits(peer, ids)   # the peer decompresses on its first forward
    torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * float(b.abs().max()))
    modules = dict(peer.named_modules())
    with torch.no_grad():
        for name, x in _layer_inputs(m, ids).items():
            ref = modules[name](x)
            torch.testing.assert_close(layers[name](x), ref, rtol=0, atol=1e-5 * float(ref.abs().max()), msg=name)


def test_int8_weight_only_import(tmp_path, ids):
    """8-bit int weights stored unpacked without activation quantization (naive-quantized,
    e.g. a W8A16 checkpoint): imported as 8-bit per-channel QuantLinear layers."""
    d = _copy_peer(tmp_path, "w8a8")

    def edit(qc):
        qc["format"] = "naive-quantized"
        qc["config_groups"]["group_0"].update(format="naive-quantized", input_activations=None)

    _edit_config(d, edit)
    m = lowbit.load_quantized(d)
    layers = _qlayers(m)
    assert len(layers) == 35 and all(isinstance(x, QuantLinear) and x.bits == 8 and x.per_channel
                                     for x in layers.values())
    dense = _library_dense(d)
    for name, layer in layers.items():
        assert torch.equal(dict(dense.named_modules())[name].weight, layer.dequantize()), name
    a, b = _logits(m, ids), _logits(dense, ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_peer_reexport(tmp_path, ids):
    """A peer checkpoint imported and exported again loads back to the same logits (the
    two config groups of the peer become lowbit's own two)."""
    m = lowbit.load_quantized(PEER["w4a16"])
    lowbit.save_quantized(m, tmp_path, format="compressed-tensors")
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 2
    assert torch.equal(_logits(lowbit.load_quantized(tmp_path), ids), _logits(m, ids))


def test_peer_on_device(device, ids):
    m = lowbit.load_quantized(PEER["w4a16"], device=device)
    assert m.model.layers[0].self_attn.q_proj.qweight.device.type == device
    ref = _logits(lowbit.load_quantized(PEER["w4a16"]), ids)
    out = _logits(m, ids.to(device)).cpu()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-3 * float(ref.abs().max()))


def test_legacy_actorder_group(tmp_path, ids):
    """Checkpoints of compressed-tensors < 0.19 with actorder "group" carry weight_g_idx:
    imported as an act-order QuantLinear (perm)."""
    from safetensors.torch import load_file, save_file

    from lowbit import ops

    d = _copy_peer(tmp_path)
    m = lowbit.load_quantized(d)
    name = "model.layers.1.self_attn.o_proj"
    layer = m.get_submodule(name)
    k = layer.in_features
    perm = torch.randperm(k)
    codes = layer.codes()[:, perm]   # a layer whose groups hold permuted input features
    permuted = QuantLinear.from_codes(codes, layer.scales.t(), layer.zeros.t(), 4, 32, symmetric=True, perm=perm)
    m.model.layers[1].self_attn.o_proj = permuted
    sd = load_file(str(d / "model.safetensors"))
    sd[name + ".weight_packed"] = ops.pack_int32(permuted.codes().t().contiguous(), 4).t().contiguous()
    sd[name + ".weight_g_idx"] = permuted.g_idx
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    _edit_config(d, lambda qc: qc["config_groups"]["group_0"]["weights"].update(actorder="group"))
    back = lowbit.load_quantized(d)
    got = back.get_submodule(name)
    assert got.perm is not None and torch.equal(got.g_idx, permuted.g_idx)
    assert torch.equal(got.dequantize(), permuted.dequantize())
    torch.testing.assert_close(_logits(back, ids), _logits(m, ids), rtol=0, atol=1e-5)


# -- errors ------------------------------------------------------------------------------------


def test_export_errors(base, ids, tmp_path):
    with pytest.raises(ValueError, match="no lowbit quantized layer"):
        lowbit.save_quantized(copy.deepcopy(base), tmp_path, format="compressed-tensors")
    m = _quantized(base, "W4A16-g32", ids)
    layer = m.model.layers[0].mlp.down_proj
    m.model.layers[0].mlp.down_proj = QuantLinear.from_codes(layer.codes(), layer.scales.t(), layer.zeros.t(), 4,
                                                             32, symmetric=True, perm=torch.randperm(256))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.*act-order.*format='gptq'"):
        lowbit.save_quantized(m, tmp_path, format="compressed-tensors")
    m = _quantized(base, "LLM.int8", ids)
    with pytest.raises(ValueError, match="LLM.int8.*no outlier split"):
        lowbit.save_quantized(m, tmp_path, format="compressed-tensors")
    ragged = _llama(hidden=64, inter=96)
    lowbit.quantize(ragged, "W4A16-g64", progress=False)
    with pytest.raises(ValueError, match=r"down_proj.*in_features 96, not a multiple of its group_size 64"):
        lowbit.save_quantized(ragged, tmp_path, format="compressed-tensors")
    with pytest.raises(TypeError, match="unknown options"):
        lowbit.save_quantized(_quantized(base, "W8A16", ids), tmp_path, format="compressed-tensors", bogus=1)
    assert not (tmp_path / "config.json").exists()


def _fp8_weight_only(qc):
    qc["config_groups"]["group_0"]["input_activations"] = None


def _w4a8(qc):
    qc["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int", "strategy": "token",
                                                           "dynamic": True, "symmetric": True}


CONFIG_ERRORS = [
    ("w4a16", lambda qc: qc.update(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity"),
    ("w4a16", lambda qc: qc.update(transform_config={"config_groups": {"u": {}}}), "transform_config"),
    ("w4a16", lambda qc: qc.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "KV cache"),
    ("w4a16", lambda qc: qc.update(quantization_status="frozen"), "quantization_status is 'frozen'"),
    ("w4a16", lambda qc: qc["config_groups"]["group_0"].update(format="nvfp4-pack-quantized"),
     "nvfp4-pack-quantized.*not one lowbit reads"),
    ("w4a16", _w4a8, "W4A8"),
    ("w4a16", lambda qc: qc["config_groups"]["group_0"].update(output_activations={"num_bits": 8}),
     "output activations"),
    ("w4a16", lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=1), "1-bit weights"),
    ("w4a16", lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="block", group_size=None,
                                                                          block_structure=[32, 32]),
     "strategy 'block'"),
    ("w4a16", lambda qc: qc["config_groups"]["group_0"]["weights"].update(group_size=16),
     "weight_scale.*shape \\[64, 2\\], expected \\[64, 4\\]"),
    ("w4a16", lambda qc: qc.update(ignore=["lm_head", "re:.*down_proj$"]), "match no parameter.*weight_packed|"
                                                                           "match no parameter.*quantized tensors"),
    ("fp8", _fp8_weight_only, "FP8 weight-only"),
    ("w8a8", lambda qc: qc["config_groups"]["group_0"]["input_activations"].update(dynamic=False),
     "activation strategy 'token' \\(static\\)"),
    ("w8a8", lambda qc: qc["config_groups"]["group_0"]["input_activations"].update(dynamic=False, strategy="tensor"),
     "input_scale.*missing"),
    ("w8a8", lambda qc: qc["config_groups"]["group_0"]["input_activations"].update(symmetric=False),
     "asymmetric"),
    ("w8a8", lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="group", group_size=16),
     "8-bit symmetric per-channel or per-tensor"),
    ("w4a16", lambda qc: qc.update(config_groups={}), "no config_groups"),
    ("w4a16", lambda qc: qc["config_groups"].update(group_0=["W4A16"]), "preset name"),
]


@pytest.mark.parametrize("which,edit,match", CONFIG_ERRORS)
def test_import_errors(tmp_path, which, edit, match):
    d = _copy_peer(tmp_path, which)
    _edit_config(d, edit)
    with pytest.raises(CheckpointError, match=match):
        lowbit.load_quantized(d)


def test_import_tensor_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy_peer(tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"

    def write(s):
        save_file(s, str(d / "model.safetensors"), metadata={"format": "pt"})

    write({k: v for k, v in sd.items() if k != name + ".weight_scale"})
    with pytest.raises(CheckpointError, match=rf"'{name}.weight_scale' is missing"):
        lowbit.load_quantized(d)
    write({**sd, name + ".weight_packed": sd[name + ".weight_packed"][:, :4].contiguous()})
    with pytest.raises(CheckpointError, match=rf"'{name}.weight_packed' has shape \[64, 4\], expected \[64, 8\]"):
        lowbit.load_quantized(d)
    write({**sd, name + ".weight_shape": torch.tensor([64, 128])})
    with pytest.raises(CheckpointError, match="weight_shape is \\[64, 128\\].*another model"):
        lowbit.load_quantized(d)
    write({k: v for k, v in sd.items() if k != "model.norm.weight"})
    with pytest.raises(CheckpointError, match="no tensor for \\['model.norm.weight'\\]"):
        lowbit.load_quantized(d)
    write({**sd, "model.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="model.extra.weight.*match no parameter"):
        lowbit.load_quantized(d)
    write(sd)
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "model_type": None}))
    with pytest.raises(ValueError, match="model_type"):
        lowbit.load_quantized(d)


def test_targets_match_nothing(base, ids, tmp_path):
    m = _quantized(base, "W4A16-g32", ids)
    lowbit.save_quantized(m, tmp_path, format="compressed-tensors")
    (tmp_path / "lowbit_manifest.json").unlink()
    _edit_config(tmp_path, lambda qc: qc["config_groups"]["group_0"].update(targets=["re:nothing"]))
    with pytest.raises(CheckpointError, match="no layer of the model matches"):
        lowbit.load_quantized(tmp_path)
