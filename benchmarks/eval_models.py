"""Accuracy and size of RTN weight-only schemes on the real models, against their baselines.

For each model: the full-precision baseline, W8A16 and W4A16 at every group size the
model's layer shapes allow (32, 64, 128 where <= the smallest in_features, and
per-channel), symmetric and asymmetric. Causal LMs are scored by WikiText-2 perplexity
(GPTQ/AWQ protocol; ``--max-windows`` limits the windows on slow machines), encoders by
the cosine between baseline and quantized sentence embeddings; model bytes for all.

    python benchmarks/eval_models.py                     # all three models
    python benchmarks/eval_models.py --models stories260k --max-windows 0

Prints one table per model and writes benchmarks/results/eval_models.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import git_commit  # noqa: E402

import lowbit
from lowbit import cli, models

ROOT = Path(__file__).resolve().parents[1]
# Windows of 2048 tokens scored per causal LM by default (0 = all): SmolLM2 takes ~5 s a
# window on 2 CPU cores, so the whole test split (140 windows) per variant is ~12 min.
DEFAULT_WINDOWS = {"stories260k": 0, "smollm2": 16}


def schemes_for(model) -> list[str]:
    cfg = lowbit.QuantConfig()
    ks = [m.in_features for n, m in model.named_modules() if cfg.is_target(n, m)]
    groups = [g for g in (32, 64, 128) if g <= min(ks)]
    out = ["W8A16"]
    for g in groups:
        out += [f"W4A16-g{g}", f"W4A16-g{g}-asym"]
    return out + ["W4A16-pc", "W4A16-pc-asym"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(models.MODELS), choices=list(models.MODELS))
    p.add_argument("--max-windows", type=int, help="perplexity windows per causal LM (0 = all); "
                   f"default {DEFAULT_WINDOWS}")
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_models.json"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)

    results = {"date": datetime.date.today().isoformat(), "commit": git_commit() or "unknown", "torch": torch.__version__,
               "lowbit": lowbit.__version__, "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "method": "rtn", "models": {}}
    for name in args.models:
        spec = models.MODELS[name]
        probe, _ = models.load_model(name)
        schemes = schemes_for(probe)
        del probe
        windows = args.max_windows if args.max_windows is not None else DEFAULT_WINDOWS.get(name, 0)
        start = time.perf_counter()
        rows, _ = cli.compare(name, schemes, text="wikitext2", max_windows=windows or None,
                              decode_tokens=32 if spec.kind == "causal-lm" else 0,
                              sentences=args.sentences, progress=False)
        seconds = time.perf_counter() - start
        what = (f"WikiText-2 test perplexity ({'all windows' if not windows else f'first {windows} windows'})"
                if spec.kind == "causal-lm" else f"mean embedding cosine vs baseline over {args.sentences} sentences")
        print(f"\n{name}: {what}; {seconds:.0f} s")
        print(cli.format_rows(rows))
        results["models"][name] = {"description": spec.description, "metric": what, "max_windows": windows or None,
                                   "seconds": seconds, "rows": [asdict(r) for r in rows]}
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
