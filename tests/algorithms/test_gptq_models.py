"""GPTQ on the real stories260K model: better perplexity than RTN on the same grid.

Calibration and evaluation are disjoint: tinystories_sample_30k.txt is cut at the first
sentence end past its middle; 32 windows of 256 tokens (seed 0) are drawn from the first
half, and perplexity is scored on the second half (all 15 windows of 512 tokens,
:func:`lowbit.eval.perplexity`). The same split as benchmarks/eval_gptq.py, which uses
128 x 512 calibration windows.

Measured 2026-11-26 by this test's code (lowbit 0.1.0, CPU, fp32, torch 2.13,
transformers 5.23); fp32 baseline perplexity 5.5714:

    scheme          method          ppl      vs fp    vs RTN   (calibration seeds 1 / 2)
    W3A16-g32-asym  rtn             9.6805   1.7375
    W3A16-g32-asym  gptq            7.7612   1.3930   0.802    (8.1115 / 7.6444)
    W3A16-g32-asym  gptq act-order  7.7943   1.3990   0.805    (7.6860 / 7.7843)
    W4A16-g32-asym  rtn             6.2443   1.1208
    W4A16-g32-asym  gptq            5.8890   1.0570   0.943    (5.8667 / 5.8287)
    W4A16-g32-asym  gptq act-order  5.8794   1.0553   0.942    (5.7799 / 5.8648)
    W4A16-g32       rtn             6.4484   1.1574
    W4A16-g32       gptq            6.1084   1.0964   0.947    (6.1366 / 6.1341)
    W4A16-g32       gptq act-order  5.9830   1.0739   0.928    (6.1420 / 6.0593)

The test runs seed 0 only (the figures outside the parentheses). Other
calibration seeds move GPTQ's perplexity by up to 4.5% (W3) and 1% (W4); float summation
order (BLAS, the CUDA path when a GPU is present) is a far smaller perturbation. Bounds:

* GPTQ / RTN perplexity: at most 0.85 at 3 bits (measured 0.790-0.838 over seeds 0-2) and
  0.96 at 4 bits (measured 0.933-0.943): GPTQ must win by at least 15% / 4%, not merely tie.
* GPTQ / fp perplexity: 2.5% above the seed-0 measurement (1.3930 -> 1.43, 1.0570 -> 1.085).
* act-order / RTN at 3 bits: at most 0.85 (measured 0.794-0.805).
* RTN / fp: 1% above its measurement (RTN is deterministic), so a broken baseline cannot
  make GPTQ look good.
"""
import copy

import pytest

import lowbit
from lowbit import data, eval as lbeval
from _helpers import shared_data, stories260k

# scheme -> measured seed-0 perplexity ratios vs fp (rtn, gptq) and the GPTQ/RTN bound
MEASURED = {
    "W3A16-g32-asym": {"rtn": 1.7375, "gptq": 1.3930, "max_gptq_over_rtn": 0.85},
    "W4A16-g32-asym": {"rtn": 1.1208, "gptq": 1.0570, "max_gptq_over_rtn": 0.96},
}
FP_PPL = 5.5714
RTN_SLACK = 1.01
GPTQ_SLACK = 1.025
ACT_ORDER_MAX_OVER_RTN = 0.85   # at W3A16-g32-asym


@pytest.fixture(scope="module")
def stories():
    model, tok = stories260k()
    text = data.read_text(shared_data("text", "other", "tinystories_sample_30k.txt"))
    cut = text.find(". ", len(text) // 2) + 2
    calib_text, eval_text = text[:cut], text[cut:]
    assert len(calib_text) > 14000 and len(eval_text) > 14000
    calib = data.calibration_samples(tok, [calib_text], 32, 256, seed=0)
    ids = tok(eval_text, return_tensors="pt").input_ids
    assert ids.shape[1] // 512 == 15
    base = lbeval.perplexity(model, input_ids=ids, progress=False)
    assert base == pytest.approx(FP_PPL, rel=1e-3)

    def ppl(scheme, method):
        q = copy.deepcopy(model)
        report = lowbit.quantize(q, scheme, method, calibration=None if method == "rtn" else calib,
                                 progress=False)
        assert len(report.layers) == 35
        return lbeval.perplexity(q, input_ids=ids, progress=False)

    return base, ppl


@pytest.fixture(scope="module")
def rtn(stories):
    base, ppl = stories
    return {s: ppl(s, "rtn") for s in MEASURED}


@pytest.mark.parametrize("scheme", list(MEASURED))
def test_gptq_beats_rtn(stories, rtn, scheme):
    base, ppl = stories
    m = MEASURED[scheme]
    r = rtn[scheme]
    assert r / base <= m["rtn"] * RTN_SLACK, f"RTN {scheme}: ppl {r:.4f} (ratio {r / base:.4f})"
    g = ppl(scheme, "gptq")
    msg = f"{scheme}: GPTQ ppl {g:.4f} (ratio {g / base:.4f}), RTN {r:.4f}, GPTQ/RTN {g / r:.4f}"
    assert g / r <= m["max_gptq_over_rtn"], msg
    assert g / base <= m["gptq"] * GPTQ_SLACK, msg
    assert g / base > 1.01, msg     # 3-4 bits must cost something: GPTQ did quantize


def test_gptq_act_order_beats_rtn(stories, rtn):
    base, ppl = stories
    scheme = "W3A16-g32-asym"
    r = rtn[scheme]
    g = ppl(scheme, lowbit.GPTQ(act_order=True))
    assert g / r <= ACT_ORDER_MAX_OVER_RTN, f"act-order ppl {g:.4f} (ratio {g / base:.4f}), RTN {r:.4f}"
    assert g / base <= 1.3990 * GPTQ_SLACK
