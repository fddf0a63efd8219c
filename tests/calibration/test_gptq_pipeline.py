"""lowbit.quantize(method="gptq" | lowbit.GPTQ(...)): the block-by-block GPTQ pipeline
(lowbit.calibration) on the tiny transformers families, its options, its equivalence with
the per-layer solve, batching and device handling, bad inputs (which must leave the model
unmodified), and the dampening retry of lowbit.algorithms.gptq.gptq_quantize_weight.

Accuracy margins (relative Frobenius error of logits vs fp32 on held-out random ids, GPTQ
/ RTN, W4A16-g32, calibration 32 x 64 random ids), measured 10 calibration seeds x 10
model seeds on the CPU (lowbit 0.1.0, torch 2.13, transformers 5.x):

    family   max ratio  mean ratio
    llama    0.854      0.767      (mistral: same weights as llama, same numbers)
    qwen2    0.855      0.796
    gpt2     0.794      0.751
    opt      0.768      0.715
    bert     0.608      0.511      (encoder hidden states: the MLM head layers are RTN in
                                    both runs and dominate the logits' error, ratio ~1.0)

With 16 x 32 calibration ids llama reached 0.996 on one seed: the Hessian of a 128-wide
layer needs a few thousand rows, hence 32 x 64. Held-out ids of 4 x 32 made the ratio itself
noisy: qwen2 reached 0.925 over 25 calibration seeds (model seed 0) and failed 0.93 once in a
CI dry run; with 16 x 64 held-out ids the same 25 seeds give qwen2 max 0.906 / mean 0.836,
llama 0.855 / 0.804. The bounds below are 0.95 (decoders) and 0.75 (BERT's encoder).

Exact equality across runs: CPU float32 GEMMs (MKL) are not bit-reproducible between runs
(the same quantize call in two processes gave 16 / 8192 different codes in block 0's
gate_proj, whose inputs go through the attention GEMMs). Only block 0's first group
(q/k/v: inputs = RMSNorm(embedding), no GEMM before them) is compared bit for bit; the
other comparisons use a code-mismatch fraction (measured <= 2.1%, bound 5%) and loss /
SQNR tolerances (measured <= 0.2% / 0.01 dB).
"""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import GPTQ, QuantConfig, QuantScheme, ops
from lowbit.algorithms.gptq import gptq_quantize_weight
from lowbit.calibration import CalibrationError
from lowbit.nn import QuantLinear, is_linear_like, linear_weight
from _helpers import assert_unmodified, bits_equal, rel_error, snapshot
from _tiny_models import FAMILIES, tiny_model

SCHEME = "W4A16-g32"
CALIB = (32, 64)      # samples x tokens (see the module docstring)
HELD = (16, 64)
DECODER_BOUND = 0.95
BERT_BOUND = 0.75
MISMATCH_BOUND = 0.05


# -- helpers ---------------------------------------------------------------------------------

def _ids(vocab: int, shape=CALIB) -> torch.Tensor:
    return torch.randint(0, vocab, shape)


@torch.no_grad()
def _out(model: nn.Module, ids: torch.Tensor, family: str) -> torch.Tensor:
    if family == "bert":   # encoder hidden states (the MLM head is RTN in both runs)
        return model.bert(input_ids=ids).last_hidden_state.float()
    return model(input_ids=ids).logits.float()



def _targets(model: nn.Module, config: str | QuantConfig = SCHEME) -> set[str]:
    cfg = QuantConfig.preset(config) if isinstance(config, str) else config
    return {n for n, m in model.named_modules() if is_linear_like(m) and cfg.is_target(n, m)}


def _codes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.codes() for n, m in model.named_modules() if isinstance(m, QuantLinear)}




def _quant(model, method="gptq", calib=None, **kw):
    kw.setdefault("progress", False)
    return lowbit.quantize(model, SCHEME, method, calibration=calib, **kw)


def _mismatch(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {n: (a[n] != b[n]).float().mean().item() for n in a}


def _llama_one_block():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=256, max_position_embeddings=128, hidden_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(cfg)
    return model.float().eval()


# -- every family ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_family_gptq_swaps_targets_and_beats_rtn(family):
    model, vocab = tiny_model(family)
    targets = _targets(model)
    calib, held = _ids(vocab), _ids(vocab, HELD)
    ref = _out(model, held, family)
    g, r = copy.deepcopy(model), copy.deepcopy(model)
    before = lowbit.model_bytes(g)
    report = _quant(g, "gptq", calib)
    _quant(r, "rtn")

    kinds = {n: type(m) for n, m in g.named_modules()}
    assert {n for n, t in kinds.items() if t is QuantLinear} == targets
    assert not any(is_linear_like(m) and n in targets for n, m in g.named_modules())
    assert {r_.name for r_ in report.layers} == targets

    # The report: counts, exact output SQNR for GPTQ layers, bytes, summary.
    assert report.method == "gptq" and len(report.layers) == len(targets)
    assert report.model_bytes_before == before and report.model_bytes_after == lowbit.model_bytes(g)
    assert report.model_bytes_after < report.model_bytes_before
    assert "gptq" in report.summary() and "gptq" in str(report)
    blocks_prefix = {"llama": "model.layers.", "qwen2": "model.layers.", "mistral": "model.layers.",
                     "gpt2": "transformer.h.", "opt": "model.decoder.layers.", "bert": "bert.encoder.layer."}[family]
    inside = {n for n in targets if n.startswith(blocks_prefix)}
    outside = targets - inside
    for lr in report.layers:
        assert math.isfinite(lr.weight_sqnr_db) and lr.weight_sqnr_db > 10
        if lr.name in inside:
            assert lr.gptq_loss is not None and lr.gptq_loss >= 0 and lr.damp == pytest.approx(0.01)
            assert lr.output_sqnr_db is not None and math.isfinite(lr.output_sqnr_db) and lr.output_sqnr_db > 10
        else:   # RTN outside the blocks: no GPTQ figures
            assert lr.gptq_loss is None and lr.damp is None and lr.output_sqnr_db is None
    if family == "bert":
        assert outside == {"cls.predictions.transform.dense", "cls.predictions.decoder"}
    else:
        assert outside == set()   # lm_head is ignored by default

    # Still runs; error below RTN's on the same grid (held-out ids, not the calibration ids).
    out_g, out_r = _out(g, held, family), _out(r, held, family)
    assert torch.isfinite(out_g).all()
    eg, er = rel_error(ref, out_g), rel_error(ref, out_r)
    bound = BERT_BOUND if family == "bert" else DECODER_BOUND
    assert eg < bound * er, f"{family}: GPTQ rel error {eg:.4f} vs RTN {er:.4f} (ratio {eg / er:.3f})"


# -- options ---------------------------------------------------------------------------------

def test_act_order_perm_applied_end_to_end():
    model, vocab = tiny_model("llama")
    calib, held = _ids(vocab), _ids(vocab, HELD)
    q = copy.deepcopy(model)
    _quant(q, GPTQ(act_order=True), calib)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    nontrivial = 0
    for n, m in layers.items():
        k = m.in_features
        assert m.perm is not None, n
        assert torch.equal(m.perm.sort().values, torch.arange(k, device=m.perm.device)), n
        nontrivial += not torch.equal(m.perm, torch.arange(k, device=m.perm.device))
        # g_idx: input feature perm[j] in group j // gs; every group holds gs features.
        assert torch.equal(m.g_idx[m.perm].long(), torch.arange(k, device=m.perm.device) // 32), n
        x = torch.randn(3, 5, k)
        lin = nn.Linear(k, m.out_features, bias=m.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(m.dequantize(torch.float32))
            if m.bias is not None:
                lin.bias.copy_(m.bias)
            torch.testing.assert_close(m(x), lin(x), rtol=1e-5, atol=1e-5)
    assert nontrivial >= 10

    # Whole model: swapping every QuantLinear for an nn.Linear holding dequantize() changes nothing.
    dense = copy.deepcopy(q)
    for n, m in layers.items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(m.dequantize(torch.float32))
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        parent, _, child = n.rpartition(".")
        setattr(dense.get_submodule(parent), child, lin)
    torch.testing.assert_close(_out(q, held, "llama"), _out(dense, held, "llama"), rtol=1e-4, atol=1e-4)

    # And act-order is still GPTQ: below RTN on held-out ids.
    r = copy.deepcopy(model)
    _quant(r, "rtn")
    ref = _out(model, held, "llama")
    assert rel_error(ref, _out(q, held, "llama")) < DECODER_BOUND * rel_error(ref, _out(r, held, "llama"))


def test_static_groups_no_perm():
    model, vocab = tiny_model("qwen2")
    _quant(model, GPTQ(act_order=True, static_groups=True), _ids(vocab))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    for m in layers:
        assert m.perm is None
        assert "perm" not in m.state_dict()
        assert torch.equal(m.g_idx.long(), torch.arange(m.in_features) // 32)


def test_true_sequential_false_differs_slightly():
    model, vocab = tiny_model("llama")
    calib, held = _ids(vocab), _ids(vocab, HELD)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = _quant(a, GPTQ(true_sequential=True), calib, device="cpu")
    rb = _quant(b, GPTQ(true_sequential=False), calib, device="cpu")
    ca, cb = _codes(a), _codes(b)
    mis = _mismatch(ca, cb)
    # Block 0's q/k/v read the unquantized block's input either way.
    for nm in ("q_proj", "k_proj", "v_proj"):
        assert mis[f"model.layers.0.self_attn.{nm}"] < MISMATCH_BOUND
    # Later groups see different inputs: different codes and losses, but close.
    assert mis["model.layers.0.self_attn.o_proj"] > 0 or mis["model.layers.0.mlp.down_proj"] > 0
    assert sum(v > 0 for v in mis.values()) >= 4
    assert max(mis.values()) < 0.5
    la = {r.name: r.gptq_loss for r in ra.layers}
    lb = {r.name: r.gptq_loss for r in rb.layers}
    assert la != lb
    ref = _out(model, held, "llama")
    ea, eb = rel_error(ref, _out(a, held, "llama")), rel_error(ref, _out(b, held, "llama"))
    assert 0.5 < ea / eb < 2


@pytest.mark.parametrize("kw", [dict(damp=-0.01), dict(damp=float("inf")), dict(damp=float("nan")),
                                dict(max_damp_retries=-1), dict(block_size=0),
                                dict(hessian_dtype=torch.float16)])
def test_gptq_option_validation(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        GPTQ(**kw)


def test_method_string_equals_default_gptq(monkeypatch):
    # Two runs need not give identical codes: MKL's float32 GEMMs round differently with the
    # buffers' alignment, and GPTQ's error feedback carries a flipped code on (measured up to
    # 14% of one GPT-2 block-1 layer's codes between two identical runs). So check that the
    # string means GPTQ() by the options each layer is solved with.
    import lowbit.calibration as calib_mod

    seen = []
    real = calib_mod.gptq_quantize_weight

    def spy(w, h, scheme, options, name):
        seen.append(options)
        return real(w, h, scheme, options, name)

    monkeypatch.setattr(calib_mod, "gptq_quantize_weight", spy)
    model, vocab = tiny_model("gpt2")
    calib = _ids(vocab)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = _quant(a, "gptq", calib)
    n = len(seen)
    rb = _quant(b, GPTQ(), calib)
    assert ra.method == rb.method == "gptq"
    assert [r.name for r in ra.layers] == [r.name for r in rb.layers]
    assert n == len(seen) - n > 0 and all(o == GPTQ() for o in seen)


def test_unknown_method():
    model, vocab = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="unknown method"):
        _quant(model, "no_such_method", _ids(vocab))
    assert_unmodified(model, snap)


# -- equivalence with the per-layer solve ----------------------------------------------------

def test_pipeline_equals_per_layer_gptq(monkeypatch):
    """A one-block Llama, non true-sequential: every layer of the block sees the fp block's
    inputs, so the pipeline's result is gptq_quantize_weight on Hessians accumulated from
    the layers' actual inputs in the fp model."""
    import lowbit.calibration as calmod

    model = _llama_one_block()
    calib = _ids(256)
    targets = sorted(_targets(model))
    assert len(targets) == 7

    # The layers' real inputs, from the unquantized model, in the pipeline's batches (8).
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: xs[n].append(args[0].detach().clone())) for n in targets]
    with torch.no_grad():
        for b0 in range(0, calib.shape[0], 8):
            model(input_ids=calib[b0:b0 + 8], use_cache=False)
    for h in hooks:
        h.remove()

    # What the pipeline passes to the solve (spy).
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    real = calmod.gptq_quantize_weight

    def spy(w, h, scheme, options, name):
        seen[name] = (w.clone(), h.clone())
        return real(w, h, scheme, options, name)
    monkeypatch.setattr(calmod, "gptq_quantize_weight", spy)

    opts = GPTQ(true_sequential=False)
    q = copy.deepcopy(model)
    report = _quant(q, opts, calib, device="cpu", batch_size=8)
    assert set(seen) == set(targets)
    scheme = QuantConfig.preset(SCHEME).scheme
    by_name = {r.name: r for r in report.layers}
    first_group = {n for n in targets if n.split(".")[-1] in ("q_proj", "k_proj", "v_proj")}
    for n in targets:
        w = linear_weight(model.get_submodule(n)).detach().float()
        h = torch.zeros(w.shape[1], w.shape[1])
        rows = 0
        for x in xs[n]:
            ops.accumulate_hessian(h, x, rows)
            rows += x.numel() // x.shape[-1]
        assert rows == calib.numel()
        # Hessian = 2 X^T X / n (float64 reference) and the one the pipeline used.
        x64 = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs[n]]).double()
        torch.testing.assert_close(h.double(), 2 * x64.T @ x64 / rows, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(seen[n][1], h, rtol=1e-4, atol=1e-6)
        assert torch.equal(seen[n][0], w)

        got = q.get_submodule(n).codes()
        # The solve on the pipeline's own Hessian: bit-identical codes, loss and damp.
        res_same = real(w, seen[n][1], scheme, opts, n)
        assert torch.equal(got, res_same.codes), n
        assert by_name[n].gptq_loss == res_same.loss and by_name[n].damp == res_same.damp
        # The solve on the Hessian accumulated here from the layer's inputs.
        res = real(w, h, scheme, opts, n)
        if n in first_group:
            assert torch.equal(got, res.codes), n
        else:
            assert (got != res.codes).float().mean().item() < MISMATCH_BOUND, n
        assert by_name[n].gptq_loss == pytest.approx(res.loss, rel=0.02)
        # output_sqnr_db is exact from the Hessian: 10 log10 tr(W H W^T) / tr(D H D^T).
        d = (w - q.get_submodule(n).dequantize()).double()
        h64 = 2 * x64.T @ x64 / rows
        exact = 10 * math.log10(float(((w.double() @ h64) * w.double()).sum()) / float(((d @ h64) * d).sum()))
        assert by_name[n].output_sqnr_db == pytest.approx(exact, abs=0.01), n
        # ... which is the SQNR of the layer's outputs on all calibration rows.
        xw = x64 @ w.double().T
        xd = x64 @ d.T
        assert by_name[n].output_sqnr_db == pytest.approx(
            10 * math.log10(float(xw.pow(2).sum() / xd.pow(2).sum())), abs=0.01)


def test_batch_size_invariance():
    model, vocab = tiny_model("llama")
    calib = _ids(vocab)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = _quant(a, "gptq", calib, batch_size=8, device="cpu")
    rb = _quant(b, "gptq", calib, batch_size=1, device="cpu")
    mis = _mismatch(_codes(a), _codes(b))
    # Measured: block 0 identical, block 1 up to 169 / 8192 (2.1%) codes flipped by the
    # float32 rounding of the Hessian accumulation, losses within 0.2%, SQNR within 0.01 dB.
    # A flipped code is carried on by GPTQ's error feedback (and MKL's rounding varies with
    # alignment), so later layers are held to the quality they reach, not to their codes.
    for nm in ("q_proj", "k_proj", "v_proj"):
        assert mis[f"model.layers.0.self_attn.{nm}"] < 0.01
    for x, y in zip(ra.layers, rb.layers):
        assert x.name == y.name
        assert x.gptq_loss == pytest.approx(y.gptq_loss, rel=0.1)
        assert x.output_sqnr_db == pytest.approx(y.output_sqnr_db, abs=0.5)


def test_batch_size_larger_than_samples():
    model, vocab = tiny_model("opt")
    report = _quant(model, "gptq", _ids(vocab, (3, 16)), batch_size=8)
    assert len(report.layers) == 12 and all(r.gptq_loss is not None for r in report.layers)


def test_calibration_dict_with_attention_mask():
    model, vocab = tiny_model("llama")
    ids = _ids(vocab, (8, 32))
    report = _quant(model, "gptq", {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert len(report.layers) == 14


# -- device / offload ------------------------------------------------------------------------

def test_parameters_stay_put_and_unchanged(device):
    model, vocab = tiny_model("llama")
    model.to(device)
    snap = {k: v.detach().clone() for k, v in model.state_dict().items()}
    targets = _targets(model)
    _quant(model, "gptq", _ids(vocab), device=device)
    for n, m in model.named_modules():
        if n in targets:
            assert isinstance(m, QuantLinear)
            assert all(t.device.type == device for t in m.buffers())
    now = model.state_dict()
    swapped = {k for k in snap if k.rpartition(".")[0] in targets}
    assert len(swapped) == 14   # weights (no biases in Llama)
    for k, v in snap.items():
        if k in swapped:
            continue
        assert now[k].device == v.device and bits_equal(now[k], v), k
    assert all(p.device.type == device for p in model.parameters())


def test_explicit_cpu_device():
    model, vocab = tiny_model("mistral")
    report = _quant(model, "gptq", _ids(vocab), device="cpu")
    assert len(report.layers) == 14
    assert all(m.qweight.device.type == "cpu" for m in model.modules() if isinstance(m, QuantLinear))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_model_calibrated_on_cuda_matches_cpu():
    model, vocab = tiny_model("llama")
    calib, held = _ids(vocab), _ids(vocab, HELD)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = _quant(a, "gptq", calib, device="cuda")
    rb = _quant(b, "gptq", calib, device="cpu")
    for m in a.modules():
        if isinstance(m, QuantLinear):
            assert all(t.device.type == "cpu" for t in m.buffers())
    assert all(p.device.type == "cpu" for p in a.parameters())
    mis = _mismatch(_codes(a), _codes(b))
    # Different GEMMs round differently and GPTQ carries a flipped code on: codes are held
    # close only where no quantized layer came before; everything by the quality reached.
    for nm in ("q_proj", "k_proj", "v_proj"):
        assert mis[f"model.layers.0.self_attn.{nm}"] < MISMATCH_BOUND, mis
    for x, y in zip(ra.layers, rb.layers):
        assert x.gptq_loss == pytest.approx(y.gptq_loss, rel=0.1)
        assert x.output_sqnr_db == pytest.approx(y.output_sqnr_db, abs=0.5)
    ref = _out(model, held, "llama")
    oa, ob = _out(a, held, "llama"), _out(b, held, "llama")
    assert rel_error(ob, oa) < 0.25 * rel_error(ref, ob)


# -- bad input: clear error, model unmodified -------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 16), (4, 0)])
def test_zero_calibration_samples(shape):
    model, vocab = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match="zero samples"):
        _quant(model, "gptq", _ids(vocab, shape))
    assert_unmodified(model, snap)


def test_calibration_longer_than_context():
    model, vocab = tiny_model("llama")
    ctx = model.config.max_position_embeddings
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match=f"{ctx + 1} tokens.*context is {ctx}"):
        _quant(model, "gptq", _ids(vocab, (2, ctx + 1)))
    assert_unmodified(model, snap)
    _quant(copy.deepcopy(model), "gptq", _ids(vocab, (2, ctx)))   # exactly the context is fine


@pytest.mark.parametrize("method", ["gptq", GPTQ(act_order=True)], ids=["str", "obj"])
def test_no_calibration(method):
    model, _ = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="needs calibration"):
        _quant(model, method, None)
    assert_unmodified(model, snap)


def test_inf_weight_names_layer():
    model, vocab = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("inf")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*Inf"):
        _quant(model, "gptq", _ids(vocab))
    assert_unmodified(model, snap)


def test_nan_activations_name_layer():
    model, vocab = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[7] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj.*NaN"):
        _quant(model, "gptq", _ids(vocab))
    assert_unmodified(model, snap)


def test_unknown_architecture_sequential():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="blocks="):
        _quant(model, "gptq", torch.randn(8, 32))
    assert_unmodified(model, snap)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Custom(nn.Module):
    """Two equally long ModuleLists of blocks: find_blocks cannot guess which one."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.stack = nn.ModuleList(_Block() for _ in range(2))
        self.refine = nn.ModuleList(_Block() for _ in range(2))
        self.head = nn.Linear(32, 50)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for blk in self.stack:
            x = blk(x)
        for blk in self.refine:
            x = blk(x)
        return self.head(x)


def test_blocks_override_custom_module():
    torch.manual_seed(torch.initial_seed() % 2**31)
    model = _Custom().eval()
    calib, held = torch.randint(0, 50, (16, 32)), torch.randint(0, 50, (4, 32))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="blocks="):
        _quant(model, "gptq", calib)
    assert_unmodified(model, snap)
    with pytest.raises(ValueError, match="blocks="):
        _quant(model, "gptq", calib, blocks="head")
    assert_unmodified(model, snap)

    with torch.no_grad():
        ref = model(held)
    report = _quant(model, "gptq", calib, blocks="stack")
    names = {r.name: r for r in report.layers}
    assert set(names) == {f"{s}.{i}.{f}" for s in ("stack", "refine") for i in range(2) for f in ("fc1", "fc2")} \
        | {"head"}
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    for n, r in names.items():
        assert (r.gptq_loss is not None) == n.startswith("stack."), n
    with torch.no_grad():
        out = model(held)
    assert torch.isfinite(out).all() and rel_error(ref, out) < 0.3


# -- dampening retry -------------------------------------------------------------------------

def _indefinite(k: int = 32) -> torch.Tensor:
    h = torch.eye(k)
    h[0, 0] = -0.05   # mean diagonal ~0.967: damp 0.01 leaves H[0,0] < 0, damp 0.1 makes it > 0
    return h


def test_damp_retry_succeeds(caplog):
    w = torch.randn(16, 32)
    scheme = QuantScheme(bits=4, group_size=32)
    with caplog.at_level(logging.WARNING, logger="lowbit.algorithms.gptq"):
        res = gptq_quantize_weight(w, _indefinite(), scheme, GPTQ(damp=0.01, max_damp_retries=3), "blk.0.fc")
    assert res.damp == pytest.approx(0.1)
    warns = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "blk.0.fc" in warns[0].getMessage() and "0.01" in warns[0].getMessage()
    assert res.codes.shape == (16, 32) and math.isfinite(res.loss)


def test_damp_retry_exhausted():
    w = torch.randn(16, 32)
    scheme = QuantScheme(bits=4, group_size=32)
    with pytest.raises(ValueError, match=r"blk\.0\.fc.*not positive definite"):
        gptq_quantize_weight(w, _indefinite(), scheme, GPTQ(damp=0.01, max_damp_retries=0), "blk.0.fc")


def test_damp_zero_retries_with_001(caplog):
    # damp=0 on an indefinite Hessian fails; the retry turns 0 into 0.01 (not 0 * 10).
    h = torch.eye(32)
    h[0, 0] = -0.005   # mean diag ~0.97: damp 0.01 adds ~0.0097
    with caplog.at_level(logging.WARNING, logger="lowbit.algorithms.gptq"):
        res = gptq_quantize_weight(torch.randn(8, 32), h, QuantScheme(bits=4, group_size=32),
                                   GPTQ(damp=0.0, max_damp_retries=1), "x")
    assert res.damp == pytest.approx(0.01)
    assert any("retrying with 0.01" in r.getMessage() for r in caplog.records)


# -- padding, layers a block never calls --------------------------------------------------------

def test_padding_rows_left_out_of_hessians():
    from lowbit.calibration import gptq_model

    model, vocab = tiny_model("llama")
    ids = _ids(vocab, (4, 32))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[3, 5:] = 0
    cfg = QuantConfig.preset(SCHEME)
    schemes = {n: cfg.scheme_for(n) for n, m in model.named_modules() if is_linear_like(m) and cfg.is_target(n, m)}
    results, _ = gptq_model(model, schemes, GPTQ(), {"input_ids": ids, "attention_mask": mask}, device="cpu",
                            progress=False)
    assert results and all(r.samples == int(mask.sum()) for r in results.values())


class _SkipBlock(_Block):
    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(32, 32)    # never called: no Hessian, so RTN


class _SkipModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.layers = nn.ModuleList(_SkipBlock() for _ in range(2))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for blk in self.layers:
            x = blk(x)
        return x


@pytest.mark.parametrize("true_sequential", [True, False])
def test_layer_never_called_gets_rtn_not_zeros(true_sequential):
    model = _SkipModel().eval()
    w = model.layers[0].unused.weight.detach().clone()
    report = _quant(model, GPTQ(true_sequential=true_sequential), torch.randint(0, 50, (8, 16)))
    rows = {r.name: r for r in report.layers}
    assert rows["layers.0.unused"].gptq_loss is None and rows["layers.0.fc1"].gptq_loss is not None
    # RTN at 4 bits g32 on a uniform init: about 18 dB; a zeroed weight would be 0 dB.
    assert rows["layers.0.unused"].weight_sqnr_db > 12
    w_hat = model.get_submodule("layers.0.unused").dequantize(torch.float32)
    assert rel_error(w, w_hat) < 0.2


# -- review fixes: per-layer-type attention inputs, call-order grouping, train mode ----------------

def test_mixed_layer_types_are_refused():
    model, vocab = tiny_model("llama")
    model.config.layer_types = ["sliding_attention", "full_attention"]
    snap = snapshot(model)
    with pytest.raises(CalibrationError, match="per layer type"):
        _quant(model, "gptq", _ids(vocab))
    assert_unmodified(model, snap)


def test_call_order_groups_by_tensor_not_address():
    # Hidden 256, 2 x 128 tokens: the attention output (o_proj's input) can be freed before
    # the MLP's normed input is allocated at the same address; grouping by data_ptr() then
    # merged o_proj with gate/up (seen in review). Grouping by identity keeps four groups.
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.calibration import _call_order, _capture_first_block

    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    layers = model.model.layers
    inputs, _ = _capture_first_block(model, layers[0], {"input_ids": torch.randint(0, 64, (2, 128))}, 2, 2,
                                     torch.device("cpu"))
    names = [n for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)]
    assert _call_order(layers[0], names, inputs) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_training_flags_restored():
    model, vocab = tiny_model("opt")
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    model.train()
    model.model.decoder.layers[1].eval()
    before = {n: m.training for n, m in model.named_modules()}
    report = _quant(model, "gptq", _ids(vocab), device="cpu")
    assert report.layers and all(r.gptq_loss is not None for r in report.layers)
    after = {n: m.training for n, m in model.named_modules() if not isinstance(m, QuantLinear)}
    assert after == {n: t for n, t in before.items() if n in after}
    assert model.training and not model.model.decoder.layers[1].training


def test_train_mode_model_calibrates_without_dropout():
    model, vocab = tiny_model("bert")
    model.bert.embeddings.dropout.p = 0.5      # applied to the first block's input in train mode
    model.train()
    calib = _ids(vocab)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    _quant(a, "gptq", calib, device="cpu")
    _quant(b, "gptq", calib, device="cpu")
    ca, cb = _codes(a), _codes(b)
    # Block 0's first group sees only the embeddings: identical unless dropout ran.
    for nm in ("query", "key", "value"):
        key = f"bert.encoder.layer.0.attention.self.{nm}"
        assert torch.equal(ca[key], cb[key]), key
