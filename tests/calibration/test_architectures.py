"""lowbit.architectures.find_blocks on the tiny transformers families (table paths, the
generic guess, the blocks= override and its errors), and GPT-2 Conv1D layers as
quantization targets (lowbit.nn.is_linear_like / linear_weight / QuantLinear.from_linear)."""
import copy

import pytest
import torch
from torch import nn

from lowbit import QuantConfig, QuantScheme
from lowbit import reference as ref
from lowbit.architectures import KNOWN_BLOCKS, find_blocks
from lowbit.nn import QuantLinear, is_linear_like, linear_weight
from _tiny_models import ENCODER_FAMILIES, FAMILIES, tiny_model

# family -> (path with its head, path in the bare base model)
PATHS = {
    "llama": ("model.layers", "layers"), "qwen2": ("model.layers", "layers"),
    "mistral": ("model.layers", "layers"), "gpt2": ("transformer.h", "h"),
    "opt": ("model.decoder.layers", "decoder.layers"), "bert": ("bert.encoder.layer", "encoder.layer"),
    "roberta": ("roberta.encoder.layer", "encoder.layer"),
    "xlm-roberta": ("roberta.encoder.layer", "encoder.layer"),
    "distilbert": ("distilbert.transformer.layer", "transformer.layer"),
}


@pytest.mark.parametrize("base", [False, True], ids=["head", "base"])
@pytest.mark.parametrize("family", FAMILIES + ENCODER_FAMILIES)
def test_find_blocks_known_families(family, base):
    model, _ = tiny_model(family, base=base)
    assert model.config.model_type in KNOWN_BLOCKS
    name, blocks = find_blocks(model)
    assert name == PATHS[family][base]
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 2
    assert model.get_submodule(name) is blocks
    # The override names the same list; it is returned as it is.
    assert find_blocks(model, blocks=name) == (name, blocks)


def test_find_blocks_without_model_type():
    # A Llama whose config lost its model_type is still found at model.layers (the common path).
    model, _ = tiny_model("llama")
    model.config.model_type = "not-a-known-type"
    assert find_blocks(model)[0] == "model.layers"


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)


class Block(nn.Module):
    def __init__(self, experts=0):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.experts = nn.ModuleList([Expert() for _ in range(experts)])


def test_find_blocks_guesses_the_longest_list():
    model = nn.Module()
    model.embed = nn.Embedding(10, 8)
    model.heads = nn.ModuleList([Block(), Block()])
    # Three blocks of four experts: the experts are nested in a block list and do not count.
    model.trunk = nn.Module()
    model.trunk.stack = nn.ModuleList([Block(experts=4) for _ in range(3)])
    model.norms = nn.ModuleList([nn.LayerNorm(8) for _ in range(5)])    # no linear layers
    name, blocks = find_blocks(model)
    assert name == "trunk.stack" and blocks is model.trunk.stack


def test_find_blocks_ambiguous_names_candidates_and_blocks_arg():
    model = nn.Module()
    model.encoder = nn.ModuleList([Block() for _ in range(3)])
    model.decoder = nn.ModuleList([Block() for _ in range(3)])
    with pytest.raises(ValueError, match="cannot tell") as e:
        find_blocks(model)
    msg = str(e.value)
    assert "'encoder' (3 x Block)" in msg and "'decoder' (3 x Block)" in msg
    assert 'blocks="model.layers"' in msg and 'method="gptq"' in msg
    assert find_blocks(model, "decoder") == ("decoder", model.decoder)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)),
    nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]),       # linears, not blocks of them
], ids=["sequential", "modulelist-of-linears"])
def test_find_blocks_unknown_model(model):
    with pytest.raises(ValueError, match=f"found no transformer blocks in {type(model).__name__}.*blocks="):
        find_blocks(model)


@pytest.mark.parametrize("path,match", [
    ("model.layerz", r"blocks='model.layerz' names no submodule of LlamaForCausalLM \(its ModuleLists: "
                     r"'model.layers' \(2 x LlamaDecoderLayer\)\)"),
    ("model", "blocks='model' is a LlamaModel, not an nn.ModuleList"),
    ("model.layers.0", "blocks='model.layers.0' is a LlamaDecoderLayer, not an nn.ModuleList"),
    ("model.empty", "blocks='model.empty' is an empty nn.ModuleList"),
])
def test_bad_blocks_override(path, match):
    model, _ = tiny_model("llama")
    model.model.empty = nn.ModuleList()
    with pytest.raises(ValueError, match=match) as e:
        find_blocks(model, blocks=path)
    assert 'blocks="model.layers"' in str(e.value)
    with pytest.raises(TypeError, match="dotted path string"):
        find_blocks(model, blocks=["model", "layers"])


# -- GPT-2 Conv1D --------------------------------------------------------------------------

def _conv1ds(model):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}


def test_conv1d_is_linear_like():
    model, _ = tiny_model("gpt2")
    convs = _conv1ds(model)
    assert len(convs) == 8     # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    for m in convs.values():
        assert is_linear_like(m)
        w = linear_weight(m)
        assert w.shape == (m.nf, m.weight.shape[0]) and w.data_ptr() == m.weight.data_ptr()   # a view
    lin = nn.Linear(4, 3)
    assert is_linear_like(lin) and linear_weight(lin) is lin.weight
    q = QuantLinear.from_linear(nn.Linear(32, 8), 4, 32)
    for other in (q, nn.Conv1d(4, 4, 1), nn.LayerNorm(4), nn.Embedding(4, 4)):
        assert not is_linear_like(other)
        with pytest.raises(TypeError, match="neither an nn.Linear nor a transformers GPT-2 Conv1D"):
            linear_weight(other)

    class Conv1D(nn.Module):    # the name alone is not enough: no nf / [nx, nf] weight
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 3))
    assert not is_linear_like(Conv1D())


def test_default_config_targets_conv1d():
    model, _ = tiny_model("gpt2")
    chosen = [n for n, m in model.named_modules() if QuantConfig().is_target(n, m)]
    assert chosen == list(_conv1ds(model))       # lm_head ignored; every Conv1D chosen
    conv_cls = type(model.transformer.h[0].attn.c_attn)
    assert [n for n, m in model.named_modules() if QuantConfig(targets=[conv_cls]).is_target(n, m)] == chosen

    class MyLinear(nn.Linear):
        pass
    # A subclass of nn.Linear as target matches its own instances only.
    assert not any(QuantConfig(targets=[MyLinear]).is_target(n, m) for n, m in model.named_modules())
    assert [n for n, m in model.named_modules() if QuantConfig(targets=[r"mlp\.c_fc"]).is_target(n, m)] == [
        "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, True), QuantScheme(8, None, True),
                                    QuantScheme(3, 16, False, torch.float32), QuantScheme(2, 64, False)],
                         ids=lambda s: s.name)
def test_quant_linear_from_conv1d(scheme):
    model, _ = tiny_model("gpt2", seed=1)
    for name, conv in _conv1ds(model).items():
        with torch.no_grad():
            conv.bias.normal_()
        q = QuantLinear.from_linear(conv, scheme=scheme)
        nx, nf = conv.weight.shape
        assert (q.in_features, q.out_features) == (nx, nf) and torch.equal(q.bias, conv.bias)
        # The same grid as RTN of the weight in the nn.Linear layout.
        lin = nn.Linear(nx, nf)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.t())
            lin.bias.copy_(conv.bias)
        assert torch.equal(q.codes(), QuantLinear.from_linear(lin, scheme=scheme).codes())
        # The layer is exactly the Conv1D with the dequantized weight: out = x @ W + b.
        w_hat = q.dequantize()                                    # [nf, nx]
        conv_hat = copy.deepcopy(conv)
        with torch.no_grad():
            conv_hat.weight.copy_(w_hat.t())
        x = torch.randn(3, 5, nx)
        want = x.double() @ w_hat.double().t() + conv.bias.double()
        # fp32 accumulation over K = nx terms, as bounded in tests/api/test_quant_linear.py.
        s = ref.expand_groups(q.scales.t().double(), nx, q.group_size)
        z = ref.expand_groups(q.zeros.t().double(), nx, q.group_size)
        bound = (x.double().abs() @ (s * (q.codes().double() + z)).t() + conv.bias.double().abs()) * nx * 2**-24
        y = q(x)
        assert y.shape == (3, 5, nf)
        assert ((y.double() - want).abs() <= bound + 1e-30).all(), name
        ref_bound = (x.double().abs() @ w_hat.double().abs().t() + conv.bias.double().abs()) * nx * 2**-24
        assert ((conv_hat(x).double() - want).abs() <= ref_bound + 1e-30).all(), name
