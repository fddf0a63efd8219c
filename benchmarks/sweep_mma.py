"""Tuning sweep of the tensor-core kernel's launch knobs on a GPU: run once per setting of
LOWBIT_MMA_CTAS_PER_SM / LOWBIT_MMA_MINB (read once per process, so one process per
setting), times mma_matmul's kernel path (max_mma_rows = 1 << 30) on decode-sized M with
the weights rotated through copies larger than L2, and appends one JSON line per setting.

    for s in "2 2" "3 3"; do set -- $s; LOWBIT_MMA_CTAS_PER_SM=$1 LOWBIT_MMA_MINB=$2 \\
        python benchmarks/sweep_mma.py --out sweep.jsonl; done

Shapes are N x K (out x in features); the printed GB/s count the packed weights, scales
and zeros once per call.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mma import GraphTimer  # noqa: E402

from lowbit import ops  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,1024x4096", help="N x K, comma-separated")
    ap.add_argument("--m", default="1,16,32,64")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--rotate-mib", type=int, default=256)
    ap.add_argument("--out", default=None, help="JSON-lines file to append to")
    args = ap.parse_args(argv)
    timer = GraphTimer(argparse.Namespace(repeats=7, warmup=3, graph_ms=3.0, max_calls=64))
    dt = getattr(torch, args.dtype)
    setting = {k: os.environ.get(k, "") for k in ("LOWBIT_MMA_CTAS_PER_SM", "LOWBIT_MMA_MINB")}
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        g = k // 128
        qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
        scales = (torch.rand(g, n, device="cuda") * 0.01 + 1e-3).to(dt)
        zeros = torch.full((g, n), 8, dtype=torch.uint8, device="cuda")
        packed = ops.pack_mma(qweight, scales, zeros, 4, 128)
        nbytes = sum(t.numel() * t.element_size() for t in packed)
        copies = max(1, min(64, -(-(args.rotate_mib << 20) // nbytes)))
        sets = [packed] + [tuple(t.clone() for t in packed) for _ in range(copies - 1)]
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda").to(dt)
            r = timer.measure(lambda p, s, z: ops.mma_matmul(x, p, s, z, 4, 128, None, 1 << 30), sets)
            us = r["median_s"] * 1e6
            rows.append({"n": n, "k": k, "m": m, "us": us, "gbps": nbytes / r["median_s"] / 1e9, "timing": r["timing"]})
            print(f"{setting} {n}x{k} M={m}: {us:.1f} us, {nbytes / r['median_s'] / 1e9:.0f} GB/s", flush=True)
        del sets
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"setting": setting, "device": torch.cuda.get_device_name(), "dtype": args.dtype,
                                "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
