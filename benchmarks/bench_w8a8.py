#!/usr/bin/env python
"""W8A8 linear layers: lowbit.ops.int8_matmul vs torch's float and int8 matmuls.

For Llama-7B linear shapes [N, K] = 4096x4096 (q/k/v/o), 11008x4096 (gate/up) and
4096x11008 (down), and M rows of x (16 = a decode batch, larger = prefill), this times in
one run, on the same machine and threads:

* lowbit: ``ops.int8_matmul(xq, xs, w, ws, None, bfloat16)`` on pre-quantized inputs
  (int8 x with per-token scales, int8 w with per-channel scales): the int8 GEMM with the
  dequantization fused, bfloat16 out;
* lowbit end to end: ``ops.quantize_per_token_int8(x)`` of a bfloat16 x, then the same;
* torch float matmuls of the same shapes (``x @ w.t()``, x and w already in the dtype):
  float32, bfloat16, and on CUDA float16;
* ``torch._int_mm(xq, w.t())``: torch's int8 GEMM (int32 out, no scales, no cast), where
  it runs (CUDA needs M > 16).

Ratios are baseline time / lowbit time (above 1: lowbit is faster); TOPS = 2 M N K / time.
A run starts with lowbit checked bit for bit against ``lowbit.reference.int8_matmul`` on
each shape (16 rows), and the machine's copy bandwidth (1 GiB ``copy_``) as its ceiling.

Timing: ``--warmup`` calls, then the median of up to ``--repeats`` calls (fewer for slow
calls: enough to fill ``--budget`` seconds, at least 3). Up to M = 64 each method's
weight is replicated until its copies exceed ``--rotate-mib`` and the calls cycle through
them, so that the caches do not hold the weight between calls. CPU calls are timed with
``time.perf_counter``; CUDA calls with CUDA events after a ``torch.cuda.synchronize``.

    python benchmarks/bench_w8a8.py                       # full CPU run (long on 2 cores)
    python benchmarks/bench_w8a8.py --m 64 --shapes 1     # one shape, M = 64
    python benchmarks/bench_w8a8.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit import ops
from lowbit.reference.matmul import int8_matmul as ref_int8_matmul
from lowbit._report import format_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import Timer, _loadavg, copy_bandwidth, run_info, setup_run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHAPES = [(4096, 4096, "7B q/k/v/o"), (11008, 4096, "7B gate/up"), (4096, 11008, "7B down")]
M_VALUES = [16, 64, 256, 1024, 4096]
ROTATE_MAX_M = 64   # weights rotated through copies up to this M


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _copies(nbytes: int, m: int, args) -> int:
    if m > ROTATE_MAX_M:
        return 1
    return max(1, min(args.max_copies, math.ceil((args.rotate_mib << 20) / max(nbytes, 1))))


def _time(timer: Timer, fn, x_args: tuple, w_args: tuple, m: int, args) -> dict:
    """Median time of fn(*x_args, *w_args), the weight tensors rotated through copies at
    small M. {"error": ...} when torch refuses the call on this device or shape."""
    try:
        fn(*x_args, *w_args)
    except (RuntimeError, NotImplementedError) as e:
        return {"error": str(e).splitlines()[0][:200]}
    n_copies = _copies(_nbytes(*w_args), m, args)
    sets = [(*x_args, *w_args)] + [(*x_args, *(t.clone() for t in w_args)) for _ in range(n_copies - 1)]
    r = timer.measure(fn, sets)
    r["copies"] = n_copies
    return r


def _ms(r: dict | None) -> float | None:
    return None if r is None or "median_s" not in r else r["median_s"] * 1e3


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def _lowbit(xq, xs, w, ws):
    return ops.int8_matmul(xq, xs, w, ws, None, torch.bfloat16)


def _lowbit_e2e(x, w, ws):
    xq, xs = ops.quantize_per_token_int8(x)
    return ops.int8_matmul(xq, xs, w, ws, None, torch.bfloat16)


def _dense(x, w):
    return x @ w.t()


def _int_mm(xq, w):
    return torch._int_mm(xq, w.t())


def run(args, timer: Timer) -> tuple[list, dict]:
    dev = args.device
    halves = [torch.bfloat16] + ([torch.float16] if dev == "cuda" else [])
    rows, checks = [], {}
    for n, k, layer in [SHAPES[i] for i in args.shapes]:
        wf = torch.randn(n, k, device=dev) * 0.02
        ws = wf.abs().amax(dim=1) / 127
        w = torch.round(wf / ws[:, None]).clamp(-128, 127).to(torch.int8)
        # Bit-exact check on 16 rows (the reference accumulates in float64 on the device).
        xq, xs = ops.quantize_per_token_int8(torch.randn(16, k, device=dev))
        checks[f"{n}x{k}"] = bool(torch.equal(_lowbit(xq, xs, w, ws), ref_int8_matmul(xq, xs, w, ws, None,
                                                                                       torch.bfloat16)))
        w_half = {dt: wf.to(dt) for dt in halves}
        for m in args.m:
            x = torch.randn(m, k, device=dev)
            x_bf = x.to(torch.bfloat16)
            xq, xs = ops.quantize_per_token_int8(x_bf)
            r = {
                "lowbit": _time(timer, _lowbit, (xq, xs), (w, ws), m, args),
                "lowbit_e2e": _time(timer, _lowbit_e2e, (x_bf,), (w, ws), m, args),
                "float32": _time(timer, _dense, (x,), (wf,), m, args),
                "int_mm": _time(timer, _int_mm, (xq,), (w,), m, args),
            }
            for dt, wh in w_half.items():
                r[str(dt).split(".")[1]] = _time(timer, _dense, (x.to(dt),), (wh,), m, args)
            row = {"shape": f"{n}x{k}", "layer": layer, "m": m}
            for key, res in r.items():
                row[f"{key}_ms"] = _ms(res)
                if "error" in res:
                    row[f"{key}_note"] = res["error"]
            row["lowbit_copies"] = r["lowbit"].get("copies")
            lb = row["lowbit_ms"]
            for key in r:
                if key != "lowbit":
                    other = row[f"{key}_ms"]
                    row[f"vs_{key}"] = None if other is None or not lb else other / lb
            row["lowbit_tops"] = 2 * m * n * k / (lb * 1e-3) / 1e12 if lb else None
            rows.append(row)
            print(f"  {n}x{k} M={m}: lowbit {_fmt(lb)} ms, e2e {_fmt(row['lowbit_e2e_ms'])} ms, "
                  f"fp32 {_fmt(row['float32_ms'])} ms, bf16 {_fmt(row['bfloat16_ms'])} ms, "
                  f"_int_mm {_fmt(row['int_mm_ms'])} ms", file=sys.stderr, flush=True)
            del x, x_bf, xq, xs
        del wf, w, ws, w_half
    return rows, checks


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--m", type=lambda s: [int(v) for v in s.split(",")], default=M_VALUES,
                   help="rows of x, comma-separated (default " + ",".join(map(str, M_VALUES)) + ")")
    p.add_argument("--shapes", type=lambda s: [int(v) for v in s.split(",")], default=list(range(len(SHAPES))),
                   help="which shapes, comma-separated indices into " + ", ".join(
                       f"{i}={n}x{k}" for i, (n, k, _) in enumerate(SHAPES)) + " (default all)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--budget", type=float, default=2.0,
                   help="seconds a slow measurement may take; fewer repeats (>= 3) beyond it")
    p.add_argument("--rotate-mib", type=int, default=256,
                   help=f"up to M = {ROTATE_MAX_M}, each weight is replicated up to this many MiB (default 256)")
    p.add_argument("--max-copies", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/bench_w8a8_<device>.json)")
    args = p.parse_args(argv)
    if any(i < 0 or i >= len(SHAPES) for i in args.shapes):
        p.error(f"--shapes takes indices 0..{len(SHAPES) - 1}")
    if any(m < 1 for m in args.m):
        p.error("--m takes positive row counts")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / f"bench_w8a8_{args.device}.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    desc = setup_run("bench_w8a8", args)
    if desc is None:
        return 2
    t_start = time.perf_counter()
    load_before = _loadavg()
    timer = Timer(args.device, args.repeats, args.warmup, args.budget)
    copy = copy_bandwidth(Timer(args.device, 5, 1, 10.0), args.device)
    print(f"copy bandwidth: {copy['gbps']:.1f} GB/s (1 GiB float32 copy_, read + write)\n")

    readback = None
    if args.device == "cuda":
        # What the NaN/Inf scale check costs int8_matmul on CUDA: one read-back of a few
        # bytes, which waits for the stream (the check's flags; the GEMM itself is async).
        flags = torch.zeros(2, dtype=torch.int64, device="cuda")
        readback = timer.measure(lambda f: f.cpu(), [(flags,)])["median_s"] * 1e3
        print(f"one device-to-host read-back (the scale check's stream synchronisation): {readback:.3f} ms\n")

    rows, checks = run(args, timer)
    halves = ["bfloat16"] + (["float16"] if args.device == "cuda" else [])
    short = {"bfloat16": "bf16", "float16": "fp16"}
    headers = ["shape", "M", "lowbit ms", "e2e ms", "fp32 ms", *(f"{short[h]} ms" for h in halves), "_int_mm ms",
               "vs fp32", *(f"vs {short[h]}" for h in halves), "vs _int_mm", "e2e vs bf16", "TOPS"]
    table = format_table(headers, [
        [r["shape"], r["m"], _fmt(r["lowbit_ms"]), _fmt(r["lowbit_e2e_ms"]), _fmt(r["float32_ms"]),
         *(_fmt(r[f"{h}_ms"]) for h in halves), _fmt(r["int_mm_ms"]), _ratio(r["vs_float32"]),
         *(_ratio(r[f"vs_{h}"]) for h in halves), _ratio(r["vs_int_mm"]),
         _ratio(None if not r["lowbit_e2e_ms"] or not r["bfloat16_ms"] else r["bfloat16_ms"] / r["lowbit_e2e_ms"]),
         _fmt(r["lowbit_tops"], ".2f")]
        for r in rows], right=set(range(1, len(headers))))
    print(table)
    notes = sorted({f"_int_mm: {r['int_mm_note']}" for r in rows if r.get("int_mm_note")})
    if notes:
        print("\n" + "\n".join(notes))
    bad = [key for key, ok in checks.items() if not ok]
    print("\nbit-exact vs reference (16 rows): " + ("all shapes" if not bad else "MISMATCH for " + ", ".join(bad)))
    elapsed = time.perf_counter() - t_start

    result = {
        "benchmark": "bench_w8a8",
        **run_info(args.device, desc),
        "settings": {"m": args.m, "shapes": [f"{SHAPES[i][0]}x{SHAPES[i][1]}" for i in args.shapes],
                     "repeats": args.repeats, "warmup": args.warmup, "budget_s": args.budget,
                     "rotate_mib": args.rotate_mib, "rotate_max_m": ROTATE_MAX_M, "max_copies": args.max_copies,
                     "lowbit_out_dtype": "bfloat16", "x_scales": "per token", "w_scales": "per channel",
                     "bias": None},
        "ratio_formula": "vs_<baseline> = baseline median ms / lowbit int8_matmul median ms",
        "loadavg_1min": {"start": load_before, "end": _loadavg()},
        "elapsed_s": round(elapsed, 1),
        "copy": copy,
        "readback_ms": readback,
        "bit_exact_vs_reference": checks,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out} ({elapsed:.0f} s)")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
