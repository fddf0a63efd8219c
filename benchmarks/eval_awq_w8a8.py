"""AWQ and W8A8 / FP8 against RTN and GPTQ on the real models (issue 5's accuracy table).

Rows, per model:

* weight-only, at the 4- and 3-bit schemes eval_gptq.py uses for the model: RTN, GPTQ
  (``lowbit.GPTQ()``), AWQ (``lowbit.AWQ()``, scale search + clip search) and AWQ then GPTQ
  (``lowbit.AWQ(gptq=lowbit.GPTQ())``: GPTQ on the AWQ-scaled weights);
* weight and activation: naive W8A8 (``"W8A8"``, dynamic per-token int8, RTN weights),
  W8A8-static (one calibrated input scale per layer), SmoothQuant W8A8 dynamic and static
  (``lowbit.SmoothQuant(alpha)``), LLM.int8 (``"LLM.int8"``, outlier columns in 16-bit),
  FP8 dynamic (``"FP8"``) and static (``"FP8-static"``), SmoothQuant + FP8-static.

Data and metrics are eval_gptq.py's, through its own loaders (so the numbers of the two
tables compare), with calibration text always disjoint from the scored text:

* stories260k: calibration = ``--stories-calib`` windows of 512 (seed 0) from the first half
  of tinystories_sample_30k.txt; perplexity on its second half (all 15 windows of 512) and
  on the first ``--stories-windows`` windows of 512 of the WikiText-2 raw test split.
* smollm2: calibration = ``--smollm2-calib`` windows of 512 (seed 0) from WikiText-2
  validation; WikiText-2 test perplexity on the first ``--smollm2-windows`` windows of 2048.
* minilm: mean / min cosine of fp vs quantized sentence embeddings over ``--sentences``
  WikiText-2 test sentences; calibration = ``--minilm-calib`` other sentences of the pool.

Per row also the wall time of ``lowbit.quantize`` (``report.seconds``) and the model's bytes
after it.

    python benchmarks/eval_awq_w8a8.py                                   # everything
    python benchmarks/eval_awq_w8a8.py --models stories260k --quick      # smoke test (~1 min)
    python benchmarks/eval_awq_w8a8.py --models smollm2 --methods smoothquant --alpha 0.5 0.8
    python benchmarks/eval_awq_w8a8.py --rows 'W8A8*' 'FP8*'             # row ids: <preset>:<method>

Progress goes to the log (stderr); the tables are printed at the end. Results go to
benchmarks/results/eval_awq_w8a8.json (``--quick``: /tmp/eval_awq_w8a8_quick.json), merged
into an existing file model by model, so models can be run one at a time (a model's rows
from an earlier run with the same baseline figures are kept unless re-run).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import fnmatch
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_gptq  # noqa: E402  (the models' data splits and metrics)
from bench_quantize import device_description, git_commit  # noqa: E402

import lowbit  # noqa: E402
from lowbit import models  # noqa: E402
from lowbit._report import format_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "eval_awq_w8a8.json"
QUICK_OUT = Path("/tmp/eval_awq_w8a8_quick.json")
log = logging.getLogger("eval_awq_w8a8")

WEIGHT_METHODS = ("rtn", "gptq", "awq", "awq+gptq")
# (preset, method): the weight-and-activation rows, the same for every model.
ACT_ROWS = (("W8A8", "rtn"), ("W8A8-static", "rtn"), ("W8A8", "smoothquant"), ("W8A8-static", "smoothquant"),
            ("LLM.int8", "rtn"), ("FP8", "rtn"), ("FP8-static", "rtn"), ("FP8-static", "smoothquant"))
METHOD_NAMES = WEIGHT_METHODS + ("smoothquant",)
# --quick: the data sizes (calibration, scored windows/sentences) and, in plan(), one
# weight-only scheme per bit width: a stories260k smoke test of every method in about a
# minute on 2 cores.
QUICK = {"stories_calib": 8, "stories_windows": 4, "smollm2_calib": 2, "smollm2_windows": 1,
         "minilm_calib": 16, "sentences": 64}


def weight_schemes(name: str) -> list[str]:
    """eval_gptq.py's schemes for the model, in its order (each at 4 or 3 bits)."""
    return list(dict.fromkeys(s for s, _ in eval_gptq.GRID[name]))


def method_object(method: str, alpha: float | None):
    return {"rtn": lambda: "rtn", "gptq": lowbit.GPTQ, "awq": lowbit.AWQ,
            "awq+gptq": lambda: lowbit.AWQ(gptq=lowbit.GPTQ()),
            "smoothquant": lambda: lowbit.SmoothQuant(alpha=alpha)}[method]()


def plan(name: str, args) -> list[dict]:
    """The rows to run for a model, after the --methods and --rows filters."""
    schemes = weight_schemes(name)
    if args.quick:      # one scheme per bit width: the first 4-bit and the first 3-bit
        schemes = [next(s for s in schemes if s.startswith(f"W{b}")) for b in (4, 3)]
    rows = [{"preset": s, "method": m} for s in schemes for m in WEIGHT_METHODS]
    rows += [{"preset": s, "method": m} for s, m in ACT_ROWS]
    out = []
    for r in rows:
        rid = f"{r['preset']}:{r['method']}"
        if args.methods and r["method"] not in args.methods:
            continue
        if args.rows and not any(fnmatch.fnmatch(rid.lower(), p.lower()) for p in args.rows):
            continue
        for a in (args.alpha if r["method"] == "smoothquant" else [None]):
            out.append({"id": rid if a is None else f"{rid}@{a:g}", **r, "alpha": a})
    return out


def run_row(model, calib, measure, batch_size: int, spec: dict, progress: bool) -> dict:
    scheme = lowbit.QuantConfig.preset(spec["preset"]).scheme
    # As eval_gptq.py: weight-only RTN gets no calibration (it would only measure output
    # SQNR); static activation scales need it even with RTN.
    needs_calib = spec["method"] != "rtn" or scheme.static_activations
    row = {"id": spec["id"], "preset": spec["preset"], "scheme": scheme.name, "method": spec["method"],
           "alpha": spec["alpha"]}
    q = copy.deepcopy(model)
    try:
        report = lowbit.quantize(q, spec["preset"], method_object(spec["method"], spec["alpha"]),
                                 calibration=calib if needs_calib else None, progress=progress,
                                 batch_size=batch_size)
    except Exception as e:  # noqa: BLE001  (one failing row must not end a long run)
        log.error("%s: quantize failed: %s\n%s", spec["id"], e, traceback.format_exc())
        return {**row, "error": f"{type(e).__name__}: {e}"}
    out_sqnr = [r.output_sqnr_db for r in report.layers if r.output_sqnr_db is not None]
    row.update(quantize_s=report.seconds, model_bytes=report.model_bytes_after, layers=len(report.layers),
               min_weight_sqnr_db=report.min_weight_sqnr_db if report.layers else None,
               min_output_sqnr_db=min(out_sqnr, default=None))
    t0 = time.perf_counter()
    try:
        row.update(measure(q))
    except Exception as e:  # noqa: BLE001
        log.error("%s: evaluation failed: %s\n%s", spec["id"], e, traceback.format_exc())
        row["error"] = f"{type(e).__name__}: {e}"
    row["eval_s"] = time.perf_counter() - t0
    return row


def _metric_keys(fp: dict) -> list[str]:
    return [k for k in fp if k.startswith(("ppl", "cosine"))]


def table(fp: dict, fp_bytes: int, rows: list[dict]) -> str:
    keys = _metric_keys(fp)
    head = ["scheme", "method", "alpha"]
    for k in keys:
        head += [k, "vs fp"] if k.startswith("ppl") else [k]
    head += ["quantize s", "MiB", "min out SQNR dB"]
    mib = lambda n: f"{n / 2**20:.3f}"  # noqa: E731
    out = [["fp", "-", "-"] + sum(([f"{fp[k]:.3f}", "1.000"] if k.startswith("ppl") else [f"{fp[k]:.5f}"]
                                   for k in keys), []) + ["-", mib(fp_bytes), "-"]]
    for r in rows:
        cells = [r["preset"], r["method"], "-" if r["alpha"] is None else f"{r['alpha']:g}"]
        for k in keys:
            if k not in r:
                cells += ["error", ""] if k.startswith("ppl") else ["error"]
            elif k.startswith("ppl"):
                cells += [f"{r[k]:.3f}", f"{r[k] / fp[k]:.3f}"]
            else:
                cells += [f"{r[k]:.5f}"]
        cells += ["-" if "quantize_s" not in r else f"{r['quantize_s']:.1f}",
                  "-" if "model_bytes" not in r else mib(r["model_bytes"]),
                  "-" if r.get("min_output_sqnr_db") is None else f"{r['min_output_sqnr_db']:.1f}"]
        out.append(cells)
    return format_table(head, out, right=set(range(2, len(head))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(eval_gptq.GRID), choices=list(eval_gptq.GRID))
    p.add_argument("--methods", nargs="+", choices=METHOD_NAMES, help="only these methods")
    p.add_argument("--rows", nargs="+", metavar="PATTERN",
                   help="only rows whose id <preset>:<method> matches one of these glob patterns "
                        "(case-insensitive), e.g. 'W8A8*' '*:awq*' 'W3A16-g32-asym:*'")
    p.add_argument("--alpha", nargs="+", type=float, default=[0.5],
                   help="SmoothQuant migration strength(s); one row per alpha (default 0.5, the paper's)")
    p.add_argument("--stories-windows", type=int,
                   help="stories260k WikiText-2 test windows of 512 (default 200 of 1597)")
    p.add_argument("--stories-calib", type=int, help="stories260k calibration windows of 512 (default 128)")
    p.add_argument("--minilm-calib", type=int, help="MiniLM calibration sentences (default 128)")
    p.add_argument("--smollm2-windows", type=int, help="SmolLM2 WikiText-2 test windows of 2048 (default 8)")
    p.add_argument("--smollm2-calib", type=int, help="SmolLM2 calibration windows of 512 (default 16)")
    p.add_argument("--sentences", type=int, help="MiniLM scored sentences (default 512)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: tiny calibration, few scored windows/sentences ({QUICK}), one weight-only "
                        "scheme per bit width; "
                        f"output to {QUICK_OUT} unless --out")
    p.add_argument("--progress", action="store_true", help="show lowbit's progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="lowbit's INFO log too")
    p.add_argument("--out", type=Path, help=f"JSON path (default {OUT.relative_to(ROOT)}; --quick: {QUICK_OUT})")
    args = p.parse_args(argv)
    full = {"stories_calib": 128, "stories_windows": 200, "smollm2_calib": 16, "smollm2_windows": 8,
            "minilm_calib": 128, "sentences": 512}
    for k, v in (QUICK if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if any(not 0 <= a <= 1 for a in args.alpha):
        p.error("--alpha must be in [0, 1]")
    if args.out is None:
        args.out = QUICK_OUT if args.quick else OUT
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    torch.manual_seed(0)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    run = {"date": datetime.date.today().isoformat(), "commit": git_commit() or "unknown",
           "torch": torch.__version__, "lowbit": lowbit.__version__, "machine": device_description("cpu"),
           "threads": torch.get_num_threads(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "settings": settings}
    out: Path = args.out
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update(run)
    results.update({
        "methods": {"rtn": "rtn", "gptq": repr(lowbit.GPTQ()), "awq": repr(lowbit.AWQ()),
                    "awq+gptq": repr(lowbit.AWQ(gptq=lowbit.GPTQ())),
                    "smoothquant": [repr(lowbit.SmoothQuant(alpha=a)) for a in args.alpha]},
        "columns": {"quantize_s": "lowbit.quantize's report.seconds (wall time: capture, statistics, searches, "
                                  "solves, block re-runs; on the CPU, shared with other jobs)",
                    "model_bytes": "report.model_bytes_after: parameters and buffers of the quantized model",
                    "eval_s": "wall time of the row's metrics",
                    "min_output_sqnr_db": "lowest per-layer output SQNR lowbit.quantize reported: the weight "
                                          "error alone (not the activations' rounding) on calibration inputs; "
                                          "None for rows run without calibration"}})
    results.setdefault("models", {})
    tables, failed = [], []
    for name in args.models:
        rows_plan = plan(name, args)
        if not rows_plan:
            log.warning("%s: no row left after the filters", name)
            continue
        start = time.perf_counter()
        model, calib, measure, info, bs = eval_gptq.LOADERS[name](args)
        fp = measure(model)
        fp_bytes = lowbit.model_bytes(model)
        log.info("%s: fp %s, %d rows (%.0f s to load and score fp)", name, fp, len(rows_plan),
                 time.perf_counter() - start)
        # Rows of an earlier run with the same baseline (same data and settings) are kept
        # unless this run redoes them, so a model's table can be filled in over several runs.
        old = results["models"].get(name) or {}
        planned = {spec["id"] for spec in rows_plan}
        rows: list[dict] = [r for r in old.get("rows", []) if r["id"] not in planned] if old.get("fp") == fp else []
        entry = {"description": models.MODELS[name].description, **info, "run": run,
                 "calibration_shape": list(calib["input_ids"].shape if isinstance(calib, dict) else calib.shape),
                 "weight_schemes": weight_schemes(name), "complete": False, "fp": fp, "fp_model_bytes": fp_bytes,
                 "rows": rows}
        results["models"][name] = entry
        for i, spec in enumerate(rows_plan, 1):
            row = run_row(model, calib, measure, bs, spec, args.progress)
            rows.append(row)
            log.info("%s [%d/%d] %s", name, i, len(rows_plan),
                     ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            out.write_text(json.dumps(results, indent=1) + "\n")   # partial results survive an interrupted run
        failed += [f"{name} {r['id']}" for r in rows if "error" in r]
        seconds = time.perf_counter() - start
        entry.update(complete=True, seconds=seconds)
        out.write_text(json.dumps(results, indent=1) + "\n")
        log.info("%s done in %.0f s", name, seconds)
        about = "".join(f"\n  {k}: {v}" for k, v in info["metrics"].items())
        tables.append(f"{name} ({seconds:.0f} s){about}\n" + table(fp, fp_bytes, rows))
    print("\n\n".join(tables))
    print(f"\nwrote {out}")
    if failed:
        log.error("%d rows failed (their errors are in the log and the JSON): %s", len(failed), ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
