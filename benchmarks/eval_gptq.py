"""GPTQ against RTN on the real models, on the same weight grids.

For each model and scheme: round-to-nearest (``method="rtn"``), GPTQ (``lowbit.GPTQ()``,
no act-order) and GPTQ with act-order (``GPTQ(act_order=True)``); act-order with static
groups at one scheme (not on SmolLM2). Calibration text is always disjoint from the scored text:

* stories260k: calibration = 128 windows of 512 tokens (seed 0) from the FIRST half of
  ``tinystories_sample_30k.txt`` (cut at the first sentence end past its middle); scored by
  perplexity on the SECOND half (all 15 windows of 512) and on the WikiText-2 raw test split
  (first ``--stories-windows`` of its 1597 windows of 512; GPTQ/AWQ protocol,
  :func:`lowbit.eval.perplexity`).
* smollm2: calibration = ``--smollm2-calib`` windows of 512 tokens (seed 0) from WikiText-2
  *validation* (``lowbit.cli._calibration_text("wikitext2")``, the CLI's helper); scored by
  WikiText-2 test perplexity on the first ``--smollm2-windows`` windows of 2048 tokens (the
  eval_models.py protocol with 8 windows instead of 16, to fit the run on 2 shared cores).
* minilm: mean / min cosine between fp and quantized sentence embeddings over 512
  WikiText-2 test sentences (``lowbit.data.sentences(n=512)``,
  :func:`lowbit.eval.embedding_similarity`); calibration = 128 other sentences of the
  same pool (none of the scored ones), padded to the longest, attention mask passed.

    python benchmarks/eval_gptq.py                          # all three models
    python benchmarks/eval_gptq.py --models stories260k

Prints one table per model and writes benchmarks/results/eval_gptq.json (merging into an
existing file, so models can be run one at a time).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import git_commit  # noqa: E402

import lowbit
from lowbit import cli, data, models
from lowbit import eval as lbeval
from lowbit._report import format_table

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "eval_gptq.json"

# model -> [(scheme, methods)]: the grid. SmolLM2's is cut to what 2 CPU cores run in a
# few minutes (GPTQ re-runs each block once per true-sequential layer group).
ALL3 = ("rtn", "gptq", "gptq-act")
GRID = {
    "stories260k": [("W4A16-g32", ALL3), ("W4A16-g32-asym", ALL3 + ("gptq-act-static",)), ("W4A16-g64", ALL3),
                    ("W4A16-g64-asym", ALL3), ("W3A16-g32-asym", ALL3), ("W3A16-g64-asym", ALL3)],
    "minilm": [("W4A16-g128", ALL3 + ("gptq-act-static",)), ("W4A16-g128-asym", ALL3), ("W4A16-g32", ALL3),
               ("W4A16-g32-asym", ALL3), ("W3A16-g128-asym", ALL3), ("W3A16-g32-asym", ALL3)],
    "smollm2": [("W4A16-g128", ALL3), ("W4A16-g32-asym", ("rtn", "gptq")), ("W3A16-g128-asym", ("rtn", "gptq"))],
}
METHODS = {
    "rtn": "rtn",
    "gptq": lowbit.GPTQ(),
    "gptq-act": lowbit.GPTQ(act_order=True),
    "gptq-act-static": lowbit.GPTQ(act_order=True, static_groups=True),
}


def split_tinystories() -> tuple[str, str]:
    """TinyStories sample cut in two at the first sentence end past its middle (calibration
    half, evaluation half)."""
    text = data.read_text(data.shared_data_dir() / "text" / "other" / "tinystories_sample_30k.txt")
    cut = text.find(". ", len(text) // 2) + 2
    return text[:cut], text[cut:]


def _variants(name: str):
    for scheme, methods in GRID[name]:
        for m in methods:
            yield scheme, m


def _run_grid(name, model, calib, measure, batch_size, log_rows, rows):
    for scheme, mname in _variants(name):
        q = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = lowbit.quantize(q, scheme, METHODS[mname], calibration=calib if mname != "rtn" else None,
                                 progress=False, batch_size=batch_size)
        seconds = time.perf_counter() - t0
        row = {"scheme": lowbit.QuantConfig.preset(scheme).scheme.name, "method": mname,
               "quantize_s": seconds, "layers": len(report.layers),
               "min_weight_sqnr_db": report.min_weight_sqnr_db,
               "min_output_sqnr_db": min((r.output_sqnr_db for r in report.layers
                                          if r.output_sqnr_db is not None), default=None),
               "damp_retries": sum(1 for r in report.layers if r.damp is not None and r.damp != 0.01)}
        row.update(measure(q))
        rows.append(row)
        log_rows(row)
        del q


def eval_stories(args):
    model, tok = models.load_stories260k()
    calib_text, eval_text = split_tinystories()
    calib = data.calibration_samples(tok, [calib_text], args.stories_calib, 512, seed=0)
    ts_ids = tok(eval_text, return_tensors="pt").input_ids
    wt_ids = tok(data.wikitext2_test_text(data.shared_data_dir() / "text" / "wikitext-2-raw" / "wiki.test.raw"),
                 return_tensors="pt").input_ids

    def measure(m):
        return {"ppl_tinystories": lbeval.perplexity(m, input_ids=ts_ids, seqlen=512, progress=False),
                "ppl_wikitext2": lbeval.perplexity(m, input_ids=wt_ids, seqlen=512, max_windows=args.stories_windows,
                                                   progress=False)}

    info = {"calibration": f"{args.stories_calib} x 512 tokens (seed 0) from the first half of "
                           f"tinystories_sample_30k.txt ({len(calib_text)} chars)",
            "metrics": {"ppl_tinystories": f"perplexity, second half of tinystories_sample_30k.txt "
                                           f"({len(eval_text)} chars, {ts_ids.shape[1] // 512} windows of 512)",
                        "ppl_wikitext2": f"WikiText-2 raw test perplexity, first {args.stories_windows} of "
                                         f"{wt_ids.shape[1] // 512} windows of 512 (GPTQ/AWQ protocol; all "
                                         "windows take ~80 s a variant on the shared 2 cores)"}}
    return model, calib, measure, info, 8


def eval_smollm2(args):
    model, tok = models.load_smollm2()
    calib = data.calibration_samples(tok, [cli._calibration_text("wikitext2")], args.smollm2_calib, 512, seed=0)
    ids = tok(data.wikitext2_test_text(data.shared_data_dir() / "text" / "wikitext-2-raw" / "wiki.test.raw"),
              return_tensors="pt").input_ids

    def measure(m):
        return {"ppl_wikitext2": lbeval.perplexity(m, input_ids=ids, seqlen=2048, max_windows=args.smollm2_windows,
                                                   batch_size=4, progress=False)}

    info = {"calibration": f"{args.smollm2_calib} x 512 tokens (seed 0) from WikiText-2 validation "
                           "(text/wikitext-2/valid.txt, lowbit.cli._calibration_text('wikitext2')); "
                           f"the paper's 128 x 2048 would take ~{128 * 2048 // (args.smollm2_calib * 512)}x the GPTQ "
                           "time on 2 CPU cores",
            "metrics": {"ppl_wikitext2": f"WikiText-2 raw test perplexity, first {args.smollm2_windows} of "
                                         f"{ids.shape[1] // 2048} windows of 2048 (GPTQ/AWQ protocol, as "
                                         "eval_models.py)"},
            "note": "the fp baseline is the Q4_1 GGUF dequantized: its Linear weights already lie on an "
                    "asymmetric 4-bit grid with blocks of 32, so W4A16-g32-asym RTN is (nearly) lossless on it"}
    return model, calib, measure, info, 8


def eval_minilm(args):
    model, tok = models.load_minilm()
    scored = data.sentences(n=args.sentences)
    taken = set(scored)
    pool = [s for s in data.sentences() if s not in taken]
    nc = args.minilm_calib
    calib_sents = [pool[i * len(pool) // nc + len(pool) // (2 * nc)] for i in range(nc)]
    assert not taken & set(calib_sents)
    calib = dict(tok(calib_sents, return_tensors="pt", padding=True, truncation=True, max_length=128))
    mask = calib["attention_mask"]

    def measure(m):
        r = lbeval.embedding_similarity(model, m, tok, scored, progress=False)
        return {"cosine_mean": r.mean, "cosine_min": r.min}

    info = {"calibration": f"{nc} WikiText-2 test sentences not among the {args.sentences} scored (evenly "
                           f"spread over the other {len(pool)}), padded to {mask.shape[1]} tokens, attention "
                           f"mask passed ({mask.float().mean():.0%} real tokens; lowbit's Hessians count the "
                           "padded rows too)",
            "metrics": {"cosine_mean": f"mean cosine fp vs quantized sentence embeddings over {args.sentences} "
                                       "WikiText-2 test sentences (lowbit.data.sentences)",
                        "cosine_min": "lowest per-sentence cosine"}}
    return model, calib, measure, info, 8


LOADERS = {"stories260k": eval_stories, "smollm2": eval_smollm2, "minilm": eval_minilm}


def table(fp: dict, rows: list[dict]) -> str:
    keys = [k for k in fp if k.startswith(("ppl", "cosine"))]
    head = ["scheme", "method"]
    for k in keys:
        head += [k, "vs fp"] if k.startswith("ppl") else [k]
    head += ["quantize s", "min out SQNR dB"]
    out = [["fp", "-"] + sum(([f"{fp[k]:.3f}", "1.000"] if k.startswith("ppl") else [f"{fp[k]:.5f}"]
                              for k in keys), []) + ["-", "-"]]
    for r in rows:
        cells = [r["scheme"], r["method"]]
        for k in keys:
            cells += [f"{r[k]:.3f}", f"{r[k] / fp[k]:.3f}"] if k.startswith("ppl") else [f"{r[k]:.5f}"]
        cells += [f"{r['quantize_s']:.1f}", "-" if r["min_output_sqnr_db"] is None else f"{r['min_output_sqnr_db']:.1f}"]
        out.append(cells)
    return format_table(head, out, right=set(range(2, len(head))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(GRID), choices=list(GRID))
    p.add_argument("--stories-windows", type=int, default=200,
                   help="stories260k WikiText-2 test windows of 512 (default 200 of 1597)")
    p.add_argument("--stories-calib", type=int, default=128, help="stories260k calibration windows of 512 (default 128)")
    p.add_argument("--minilm-calib", type=int, default=128, help="MiniLM calibration sentences (default 128)")
    p.add_argument("--smollm2-windows", type=int, default=8, help="SmolLM2 WikiText-2 test windows of 2048 (default 8)")
    p.add_argument("--smollm2-calib", type=int, default=16, help="SmolLM2 calibration windows of 512 (default 16)")
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"date": datetime.date.today().isoformat(), "commit": git_commit() or "unknown", "torch": torch.__version__,
                    "lowbit": lowbit.__version__, "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(),
                    "methods": {k: (v if isinstance(v, str) else repr(v)) for k, v in METHODS.items()},
                    "quantize_s": "wall time of lowbit.quantize (GPTQ: capture, Hessians, solves, block "
                                  "re-runs; on the CPU, the machine shared with other jobs)"})
    results.setdefault("models", {})
    for name in args.models:
        start = time.perf_counter()
        model, calib, measure, info, bs = LOADERS[name](args)
        fp = measure(model)
        print(f"\n{name}: fp {fp}", flush=True)
        rows = []
        entry = {"description": models.MODELS[name].description, **info,
                 "calibration_shape": list(calib["input_ids"].shape if isinstance(calib, dict) else calib.shape),
                 "grid": [[s, list(m)] for s, m in GRID[name]], "complete": False, "fp": fp, "rows": rows}
        results["models"][name] = entry

        def log_row(r):
            print("  " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                  flush=True)
            out.write_text(json.dumps(results, indent=1) + "\n")    # partial results survive an interrupted run

        _run_grid(name, model, calib, measure, bs, log_row, rows)
        seconds = time.perf_counter() - start
        print(f"\n{name} ({seconds:.0f} s)\n" + table(fp, rows), flush=True)
        entry.update(complete=True, seconds=seconds)
        out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
