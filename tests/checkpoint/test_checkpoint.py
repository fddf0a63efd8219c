"""lowbit.save_quantized / lowbit.load_quantized in lowbit's own format: every layer kind
round-trips bit for bit, shards, atomic writes, and every way a folder can be broken
(missing, truncated or modified files, edited configs, tensors that do not fit) is a
CheckpointError naming the file or tensor; nothing is ever unpickled."""
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.checkpoint import CheckpointError, model_from_config
from lowbit.formats import _io
from lowbit.nn import FP8Linear, QuantLinear, W8A8Linear
from _helpers import DEVICES, bits_equal
from _tiny_models import ENCODER_FAMILIES, FAMILIES, tiny_model

VOCAB, HIDDEN, INNER = 50, 256, 384


class Tiny(nn.Module):
    """Embedding -> a (Linear 256->384, bias) -> relu -> b (384->256) -> lm_head tied to
    the embedding, with a LayerNorm and a registered float buffer in between."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.a = nn.Linear(HIDDEN, INNER)
        self.b = nn.Linear(INNER, HIDDEN, bias=False)
        self.norm = nn.LayerNorm(HIDDEN)
        self.register_buffer("shift", torch.randn(HIDDEN))
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = self.norm(self.b(torch.relu(self.a(h))) + h + self.shift)
        return self.lm_head(h)


def _act_order(lin: nn.Linear, bits=4, group_size=32) -> QuantLinear:
    n, k = lin.weight.shape
    g = -(-k // group_size)
    return QuantLinear.from_codes(torch.randint(0, 2**bits, (n, k), dtype=torch.uint8), torch.rand(n, g) / 50 + 1e-3,
                                  torch.randint(0, 2**bits, (n, g), dtype=torch.uint8), bits, group_size,
                                  bias=None if lin.bias is None else lin.bias.detach(), perm=torch.randperm(k))


def _static(cls, scale_a=0.05, scale_b=0.1, **kw):
    def make(m):
        m.a = cls.from_weight(m.a.weight, m.a.bias, input_scale=scale_a, **kw)
        m.b = cls.from_weight(m.b.weight, None, input_scale=scale_b, **kw)
    return make


# Every layer kind: a preset for lowbit.quantize, or a function that swaps the layers in.
KINDS = {
    "W4-g128-sym": "W4A16",
    "W4-g32-asym": "W4A16-g32-asym",
    "W3-g128-asym": "W3A16",
    "W8-per-channel": "W8A16",
    "W4-bf16-scales": QuantConfig.preset("W4A16-g64", scale_dtype=torch.bfloat16),
    "act-order": lambda m: (setattr(m, "a", _act_order(m.a)), setattr(m, "b", _act_order(m.b, 3, 128))),
    "W8A8-dynamic": "W8A8",
    "W8A8-static": _static(W8A8Linear),
    "LLM.int8": "LLM.int8",
    "FP8-dynamic": "FP8",
    "FP8-static-per-tensor": _static(FP8Linear, per_tensor_weight=True),
}
CLASSES = {"W8A8-dynamic": W8A8Linear, "W8A8-static": W8A8Linear, "LLM.int8": W8A8Linear,
           "FP8-dynamic": FP8Linear, "FP8-static-per-tensor": FP8Linear}


def quantized(kind: str) -> Tiny:
    m = Tiny().eval()
    how = KINDS[kind]
    if callable(how):
        how(m)
    else:
        lowbit.quantize(m, how, progress=False)
    return m


def ids(n=2, length=12):
    return torch.randint(0, VOCAB, (n, length))


def save(model, path, **options) -> Path:
    return lowbit.save_quantized(model, path, **options)


def read_config(d) -> dict:
    return json.loads((Path(d) / "config.json").read_text())


def write_config(d, config, drop_manifest=True):
    (Path(d) / "config.json").write_text(json.dumps(config))
    if drop_manifest:
        (Path(d) / _io.MANIFEST).unlink()


def rewrite_shard(d, change, name="model.safetensors"):
    """Apply ``change(tensors)`` to a shard and drop the manifest (a hand-made folder)."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(Path(d) / name))
    change(t)
    save_file(t, str(Path(d) / name), metadata={"format": "pt"})
    (Path(d) / _io.MANIFEST).unlink(missing_ok=True)


# -- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_every_layer_kind(kind, tmp_path):
    m = quantized(kind)
    x = ids()
    ref = m(x)
    save(m, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "lowbit_manifest.json", "model.safetensors"]
    back = lowbit.load_quantized(tmp_path, model=Tiny())
    for name in ("a", "b"):
        assert type(back.get_submodule(name)) is CLASSES.get(kind, QuantLinear)
        assert repr(back.get_submodule(name)) == repr(m.get_submodule(name))
    assert back.lm_head.weight is back.emb.weight
    assert back.training is False
    assert bits_equal(back(x), ref)
    sd, ref_sd = back.state_dict(), m.state_dict()
    assert sd.keys() == ref_sd.keys()
    assert all(bits_equal(sd[k], ref_sd[k]) for k in sd)


def test_config_records_every_layer(tmp_path):
    m = quantized("act-order")
    save(m, tmp_path)
    qc = read_config(tmp_path)["quantization_config"]
    assert qc["quant_method"] == "lowbit" and qc["format_version"] == 1 and qc["lowbit_version"] == lowbit.__version__
    assert qc["layers"]["a"] == {"kind": "weight_only", "in_features": HIDDEN, "out_features": INNER, "bias": True,
                                 "bias_dtype": "float32", "bits": 4, "group_size": 32, "symmetric": False,
                                 "scale_dtype": "float32", "act_order": True}
    assert qc["layers"]["b"]["bits"] == 3 and qc["layers"]["b"]["bias"] is False
    assert qc["modules_not_converted"] == ["lm_head"]
    assert qc["tied_weights"] == {"lm_head.weight": "emb.weight"}
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "emb.weight" in f.keys()   # the tied copy is written once
        assert f.metadata()["lowbit_format_version"] == "1"


def test_untied_skeleton_is_tied_on_load(tmp_path):
    m = quantized("W4-g128-sym")
    save(m, tmp_path)
    skeleton = Tiny()
    skeleton.lm_head.weight = nn.Parameter(torch.zeros(VOCAB, HIDDEN))   # a skeleton that forgot the tie
    back = lowbit.load_quantized(tmp_path, model=skeleton)
    assert back.lm_head.weight is back.emb.weight
    x = ids()
    assert bits_equal(back(x), m(x))


def test_mma_layout_saves_the_gptq_layout(tmp_path):
    m = quantized("W4-g128-sym")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = ids()
    ref = m(x)
    assert lowbit.nn.pack_mma(m) == 2 and m.a.layout == "mma"
    save(m, tmp_path)
    back = lowbit.load_quantized(tmp_path, model=Tiny())
    assert back.a.layout == "gptq"
    sd = back.state_dict()
    assert all(bits_equal(sd[k], before[k]) for k in before)
    assert bits_equal(back(x), ref)


@pytest.mark.parametrize("family", FAMILIES + ENCODER_FAMILIES)
def test_model_from_config_builds_the_architecture(family):
    for base in (False, True):
        m, vocab = tiny_model(family, base=base)
        skeleton = model_from_config({**m.config.to_dict(), "architectures": [type(m).__name__]})
        assert type(skeleton) is type(m)
        skeleton.load_state_dict(m.state_dict())
        x = torch.randint(0, vocab, (1, 8))
        assert bits_equal(skeleton(x)[0], m(x)[0])
    # without architectures: the causal-LM (or encoder) class of the model type
    m, _ = tiny_model(family)
    cfg = m.config.to_dict()
    cfg.pop("architectures", None)
    assert model_from_config(cfg).config.model_type == m.config.model_type


def test_model_from_config_errors():
    with pytest.raises(ValueError, match="no 'model_type'"):
        model_from_config({"hidden_size": 8})
    with pytest.raises(ValueError, match="does not know model_type 'no-such-model'"):
        model_from_config({"model_type": "no-such-model"})


@pytest.mark.parametrize("family,scheme", [("llama", "W4A16-g32-asym"), ("gpt2", "W8A16"), ("opt", "FP8"),
                                           ("bert", "W8A8")])
def test_transformers_models_without_a_skeleton(family, scheme, tmp_path):
    """model= omitted: the skeleton comes from config.json (GPT-2's Conv1D layers too)."""
    m, vocab = tiny_model(family)
    lowbit.quantize(m, scheme, progress=False)
    x = torch.randint(0, vocab, (2, 10))
    ref = m(x)[0]
    save(m, tmp_path)
    assert (tmp_path / "generation_config.json").is_file() == (family != "bert")
    back = lowbit.load_quantized(tmp_path)
    assert type(back) is type(m)
    assert bits_equal(back(x)[0], ref)


def test_stories260k_round_trip(tmp_path):
    m, _ = lowbit.models.load_stories260k()
    lowbit.quantize(m, QuantConfig.preset("W4A16-g32", overrides={"down_proj": "W8A8"}), progress=False)
    x = torch.randint(0, 512, (2, 32))
    ref = m(x).logits
    save(m, tmp_path)
    back = lowbit.load_quantized(tmp_path)
    assert type(back.model.layers[0].mlp.down_proj) is W8A8Linear
    assert type(back.model.layers[0].self_attn.q_proj) is QuantLinear
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert bits_equal(back(x).logits, ref)
    # dtype= converts what is not quantized (and the biases); the lowbit buffers keep theirs
    half = lowbit.load_quantized(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert half.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16
    assert half.model.layers[0].mlp.down_proj.weight_scale.dtype == torch.float32
    assert half(x).logits.dtype == torch.bfloat16


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
def test_load_onto_cuda(tmp_path):
    m = quantized("W4-g32-asym")
    save(m, tmp_path)
    back = lowbit.load_quantized(tmp_path, model=Tiny(), device="cuda")
    assert back.a.qweight.device.type == "cuda"
    x = ids()
    assert bits_equal(back(x.cuda()).cpu(), m.cuda()(x.cuda()).cpu())


# -- shards and atomic writes ---------------------------------------------------------------


def test_shards_and_index(tmp_path):
    m = quantized("W4-g32-asym")
    save(m, tmp_path, max_shard_bytes=20_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not (tmp_path / "model.safetensors").exists()
    x = ids()
    assert bits_equal(lowbit.load_quantized(tmp_path, model=Tiny())(x), m(x))
    # saved again in one shard: the old shards and index go
    save(m, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "lowbit_manifest.json", "model.safetensors"]
    assert bits_equal(lowbit.load_quantized(tmp_path, model=Tiny())(x), m(x))


def test_no_temporary_files_left(tmp_path):
    save(quantized("FP8-dynamic"), tmp_path, max_shard_bytes=50_000)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".") or ".tmp" in p]


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    old = quantized("W4-g128-sym")
    save(old, tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save(quantized("W4-g32-asym"), tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    x = ids()
    assert bits_equal(lowbit.load_quantized(tmp_path, model=Tiny())(x), old(x))


def test_save_interrupted_after_the_shards_is_detected(tmp_path, monkeypatch):
    """New shards under an old config and manifest: loading refuses, naming the shard."""
    save(quantized("W4-g128-sym"), tmp_path)
    real = _io._atomic_write

    def fail_on_config(path, data):
        if path.name == "config.json":
            raise OSError("killed")
        real(path, data)

    monkeypatch.setattr(_io, "_atomic_write", fail_on_config)
    with pytest.raises(OSError, match="killed"):
        save(quantized("W4-g32-asym"), tmp_path)
    monkeypatch.undo()
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        lowbit.load_quantized(tmp_path, model=Tiny())


# -- broken folders -------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    save(quantized("W4-g128-sym"), tmp_path)
    return tmp_path


def test_missing_shard(tmp_path):
    save(quantized("W4-g128-sym"), tmp_path, max_shard_bytes=20_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: missing"):
        lowbit.load_quantized(tmp_path, model=Tiny())
    (tmp_path / _io.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: missing shard"):
        lowbit.load_quantized(tmp_path, model=Tiny())


def test_truncated_file(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt: its sha256"):
        lowbit.load_quantized(saved, model=Tiny())
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        lowbit.load_quantized(saved, model=Tiny(), verify=False)


def test_flipped_byte(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        lowbit.load_quantized(saved, model=Tiny())


def test_edited_config_fails_the_manifest(saved):
    config = read_config(saved)
    config["quantization_config"]["layers"]["a"]["bits"] = 8
    write_config(saved, config, drop_manifest=False)
    with pytest.raises(CheckpointError, match=r"config\.json: corrupt"):
        lowbit.load_quantized(saved, model=Tiny())


@pytest.mark.parametrize("field,value,match", [
    ("bits", 8, r"tensor 'a\.qweight' has shape \[32, 384\], the model expects \[64, 384\].*'bits': 8"),
    ("bits", 3, r"tensor 'a\.qweight' has shape \[32, 384\], the model expects \[24, 384\]"),
    ("group_size", 64, r"tensor 'a\.scales' has shape \[2, 384\], the model expects \[4, 384\]"),
    ("scale_dtype", "float32", r"tensor 'a\.scales' is torch\.float16, the model expects torch\.float32"),
    ("out_features", 256, r"layer 'a' is 384x256 in the model but 256x256 in the checkpoint"),
    ("bias", False, r"tensor 'a\.bias' in the checkpoint has no place in the model"),
    ("act_order", True, r"tensor 'a\.perm' is missing"),
    ("kind", "fp8", r"layers\['a'\] does not describe a lowbit layer: bits must be 8 for kind 'fp8', got 4"),
    ("kind", "int3", r"layers\['a'\] does not describe a lowbit layer: unknown kind 'int3'"),
    ("in_features", None, r"layers\['a'\] does not describe a lowbit layer"),
])
def test_edited_config_without_manifest(saved, field, value, match):
    config = read_config(saved)
    if value is None:
        del config["quantization_config"]["layers"]["a"][field]
    else:
        config["quantization_config"]["layers"]["a"][field] = value
    write_config(saved, config)
    with pytest.raises(CheckpointError, match=match):
        lowbit.load_quantized(saved, model=Tiny())


def test_bits_that_keep_the_shapes_are_caught_by_the_zero_points(tmp_path):
    """3- and 4-bit codes of 8 input columns both pack into one int32 row: only the zero
    points (beyond 3 bits) show that config.json's bits were edited."""
    small = nn.Sequential(nn.Linear(8, 64))
    small[0] = QuantLinear.from_linear(small[0], bits=4, group_size=None, symmetric=False)
    small[0].zeros.fill_(12)
    save(small, tmp_path)
    config = read_config(tmp_path)
    config["quantization_config"]["layers"]["0"]["bits"] = 3
    write_config(tmp_path, config)
    with pytest.raises(CheckpointError, match=r"tensor '0\.zeros' has zero points up to 12, beyond bits=3"):
        lowbit.load_quantized(tmp_path, model=nn.Sequential(nn.Linear(8, 64)))


def test_edited_kind_of_an_8_bit_layer(tmp_path):
    save(quantized("W8A8-dynamic"), tmp_path)
    config = read_config(tmp_path)
    config["quantization_config"]["layers"]["b"]["kind"] = "fp8"
    write_config(tmp_path, config)
    with pytest.raises(CheckpointError, match=r"tensor 'b\.weight' is torch\.int8, the model expects torch\.float8_e4m3fn"):
        lowbit.load_quantized(tmp_path, model=Tiny())


def test_wrong_tensor_shape_dtype_missing_unexpected(saved):
    rewrite_shard(saved, lambda t: t.__setitem__("a.scales", t["a.scales"][:1].clone()))
    with pytest.raises(CheckpointError, match=r"tensor 'a\.scales' has shape \[1, 384\], the model expects \[2, 384\]"):
        lowbit.load_quantized(saved, model=Tiny())
    rewrite_shard(saved, lambda t: t.__setitem__("a.scales", torch.ones(2, INNER)))
    with pytest.raises(CheckpointError, match=r"tensor 'a\.scales' is torch\.float32, the model expects torch\.float16"):
        lowbit.load_quantized(saved, model=Tiny())
    rewrite_shard(saved, lambda t: t.pop("a.scales"))
    with pytest.raises(CheckpointError, match=r"tensor 'a\.scales' is missing from the checkpoint's shards"):
        lowbit.load_quantized(saved, model=Tiny())
    rewrite_shard(saved, lambda t: t.update({"a.scales": torch.ones(2, INNER, dtype=torch.float16),
                                             "c.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"tensor 'c\.weight' in the checkpoint has no place in the model"):
        lowbit.load_quantized(saved, model=Tiny())
    rewrite_shard(saved, lambda t: (t.pop("c.weight"), t.__setitem__("a.scales", torch.full((2, INNER), float("inf"),
                                                                                            dtype=torch.float16))))
    with pytest.raises(CheckpointError, match=r"the scales of layer 'a' are not all finite"):
        lowbit.load_quantized(saved, model=Tiny())


def test_skeleton_that_does_not_fit(saved):
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(HIDDEN, INNER)

    with pytest.raises(CheckpointError, match=r"quantized layer 'b' is not a module of Other"):
        lowbit.load_quantized(saved, model=Other())
    wrong = Tiny()
    wrong.norm = nn.Identity()
    with pytest.raises(CheckpointError, match=r"tensor 'norm\.bias' in the checkpoint has no place in the model"):
        lowbit.load_quantized(saved, model=wrong)
    wrong = Tiny()
    wrong.b = nn.ReLU()
    with pytest.raises(CheckpointError, match=r"'b' is a ReLU in the model, not a linear layer"):
        lowbit.load_quantized(saved, model=wrong)


def test_skeleton_in_another_float_dtype_is_cast(saved):
    back = lowbit.load_quantized(saved, model=Tiny().to(torch.bfloat16))
    assert back.emb.weight.dtype == torch.bfloat16 and back.a.scales.dtype == torch.float16


def test_missing_or_broken_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        lowbit.load_quantized(saved, model=Tiny())
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        lowbit.load_quantized(saved, model=Tiny())
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        lowbit.load_quantized(saved / "nowhere")


def test_config_that_is_not_a_lowbit_checkpoint(saved):
    config = read_config(saved)
    qc = config.pop("quantization_config")
    write_config(saved, config)
    with pytest.raises(CheckpointError, match="no quantization_config with a quant_method"):
        lowbit.load_quantized(saved, model=Tiny())
    write_config(saved, {**config, "quantization_config": {**qc, "quant_method": "bitsandbytes"}},
                 drop_manifest=False)
    with pytest.raises(CheckpointError, match="quant_method 'bitsandbytes' is not a format lowbit reads"):
        lowbit.load_quantized(saved, model=Tiny())
    write_config(saved, {**config, "quantization_config": {**qc, "format_version": 2}}, drop_manifest=False)
    with pytest.raises(CheckpointError, match="format_version 2; this lowbit .* reads versions up to 1"):
        lowbit.load_quantized(saved, model=Tiny())
    write_config(saved, {**config, "quantization_config": qc}, drop_manifest=False)
    with pytest.raises(CheckpointError, match="no 'model_type'"):
        lowbit.load_quantized(saved)   # a plain nn.Module's checkpoint needs model=


def test_pickle_is_never_read(tmp_path, monkeypatch):
    sentinel = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    m = quantized("W4-g128-sym")
    d = tmp_path / "ckpt"
    save(m, d)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    refuse = lambda *a, **k: pytest.fail("something tried to unpickle")  # noqa: E731
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    x = ids()
    assert bits_equal(lowbit.load_quantized(d, model=Tiny())(x), m(x))
    (d / "model.safetensors").unlink()
    (d / _io.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing shard"):
        lowbit.load_quantized(d, model=Tiny())
    assert not sentinel.exists()


# -- save errors -----------------------------------------------------------------------------


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="has no lowbit layer .* run lowbit.quantize"):
        save(Tiny(), tmp_path)
    with pytest.raises(ValueError, match="unknown checkpoint format 'onnx'"):
        save(quantized("W8A8-dynamic"), tmp_path, format="onnx")
    with pytest.raises(TypeError, match=r"unknown options \['shard_size'\]"):
        save(quantized("W8A8-dynamic"), tmp_path, shard_size=10)
