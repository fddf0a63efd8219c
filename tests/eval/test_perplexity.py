"""lowbit.eval.perplexity on the real stories260K model (GPTQ/AWQ protocol).

Reference figures, measured with this code on 2026-11-23 (fp32, CPU, transformers 5.23):
TinyStories sample 5.5583 (in domain; ../shared/data/README.md says about 5.6); WikiText-2
test, all 1580 windows of 512, 123.28 (the data README's "about 105" was not reproduced
by this protocol, nor by scoring the raw file without the row join: 119.44); its first
64 windows 146.459. fp32 on one machine is deterministic to ~1e-6; tolerances allow for
BLAS differences across CPUs.
"""
import math

import pytest
import torch

from lowbit import data, eval as lbeval
from _helpers import shared_data, stories260k


@pytest.fixture(scope="module")
def model_tok():
    return stories260k()


@pytest.fixture(scope="module")
def tiny_text():
    return data.read_text(shared_data("text", "other", "tinystories_sample_30k.txt"))


def test_in_domain_perplexity(model_tok, tiny_text):
    model, tok = model_tok
    ppl = lbeval.perplexity(model, tok, tiny_text, progress=False)
    assert ppl == pytest.approx(5.5583, rel=1e-3)


def test_wikitext2_protocol(model_tok):
    model, tok = model_tok
    text = data.wikitext2_test_text(shared_data("text", "wikitext-2-raw", "wiki.test.raw"))
    # Rows keep their newline and are joined by "\n\n".
    assert text.startswith(" \n\n\n = Robert Boulter = \n\n\n \n\n\n Robert Boulter is")
    ppl = lbeval.perplexity(model, tok, text, max_windows=64, progress=False)
    assert ppl == pytest.approx(146.459, rel=1e-3)


def test_batching_and_input_ids_agree(model_tok, tiny_text):
    model, tok = model_tok
    ids = tok(tiny_text, return_tensors="pt").input_ids
    a = lbeval.perplexity(model, input_ids=ids, batch_size=1, progress=False)
    b = lbeval.perplexity(model, input_ids=ids[0], batch_size=7, progress=False)
    assert a == pytest.approx(b, rel=1e-5)


def test_damaged_model_scores_worse(model_tok, tiny_text):
    model, tok = model_tok
    base = lbeval.perplexity(model, tok, tiny_text, progress=False)
    w = model.model.layers[0].mlp.down_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(torch.randn_like(w) * w.std())
        damaged = lbeval.perplexity(model, tok, tiny_text, progress=False)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert damaged > base * 1.05 and math.isfinite(damaged)


def test_bad_arguments(model_tok):
    model, tok = model_tok
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        lbeval.perplexity(model, tok, "Once upon a time", seqlen=1024, progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        lbeval.perplexity(model, tok, "Once upon a time", progress=False)
    with pytest.raises(ValueError, match="needs tokenizer and text"):
        lbeval.perplexity(model, progress=False)
