#!/usr/bin/env python
"""Weight-only quantized linear layers: lowbit.ops.weight_only_matmul vs torch's matmuls.

For Llama-7B and Llama-3-8B linear shapes [N, K] and M rows of x (1 = decode, larger =
prefill), this times in one run, on the same machine and threads:

* lowbit: ``ops.weight_only_matmul(x, qweight, scales, zeros, bits, group_size)`` with
  the model layer's layout (GPTQ qweight int32 [K * bits / 32, N]; scales float16 and
  zeros uint8 stored [G, N], passed as their [N, G] transposes);
* dense: ``torch.matmul(x, W.t())`` with W in float32, and in bfloat16 (CPU) or float16
  (CUDA), the unquantized baseline;
* torch's own weight-only kernels on the same codes: ``_weight_int8pack_mm`` (int8
  per-channel) and ``_weight_int4pack_mm_for_cpu`` / ``_weight_int4pack_mm`` (CUDA,
  bfloat16 only) for int4, their scales and zeros in x.dtype as they require.

Schemes: int8 per-channel (symmetric, zero 128), int4 group 128 and int4 group 32
(asymmetric). ``x`` is float32 and bfloat16 on the CPU (float16 and bfloat16 on CUDA);
torch's kernels get the same x.

Decode (M <= 16) is a memory-bound stream of the weights, so the caches must not hold
them between calls: every method's weights are replicated until the copies exceed
``--rotate-mib`` (default twice the last-level cache, at most 1 GiB) and the calls cycle
through them. ``lowbit_hot_ms`` (M = 1, one copy, cache-warm) is recorded too: it is the
kernel's compute ceiling. GB/s at M = 1 = (qweight + scales + zeros bytes) / time,
against the machine's copy bandwidth (1 GiB ``copy_``, read + write) measured in the
same run.

Timing: the median of up to ``--repeats`` calls after ``--warmup`` calls (one for calls
slower than a third of ``--budget``), fewer for slow calls (enough to fill ``--budget``
seconds, at least 3); a first call slower than ``--max-call`` seconds is reported as
measured once, and a call the previous M predicts slower than that is skipped (torch's
int kernels with float32 x take seconds at prefill sizes). CPU calls with
``time.perf_counter``, CUDA calls with CUDA events.

    python benchmarks/bench_linear.py                  # full CPU run (about 6 minutes on 2 cores)
    python benchmarks/bench_linear.py --quick          # 4096x4096, M in {1, 16, 256}
    python benchmarks/bench_linear.py --device cuda    # the same on a GPU
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit import ops
from lowbit import reference as ref
from lowbit._report import format_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import Timer, _loadavg, copy_bandwidth, device_description, run_info, setup_run, time_once  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# (N, K, layer): Llama-7B q/k/v/o, gate/up, down; Llama-3-8B gate/up, down (its q/o are
# 4096x4096 too).
SHAPES = [(4096, 4096, "7B q/k/v/o"), (11008, 4096, "7B gate/up"), (4096, 11008, "7B down"),
          (14336, 4096, "8B gate/up"), (4096, 14336, "8B down")]
SCHEMES = [("int8", 8, None), ("int4-g128", 4, 128), ("int4-g32", 4, 32)]
M_VALUES = [1, 4, 16, 64, 256, 1024]
DECODE_MAX_M = 16   # weights rotated through copies up to this M


def _llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB if unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            text = (idx / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or (32 << 20)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class Bench:
    """Times calls (median after warm-up) and decides what to skip."""

    def __init__(self, args):
        self.args = args
        self.cuda = args.device == "cuda"
        self.rotate_bytes = args.rotate_mib << 20
        self.last: dict = {}   # key -> (m, seconds) of the last measurement

    def copies(self, nbytes: int, m: int) -> int:
        if m > DECODE_MAX_M:
            return 1
        return max(1, min(self.args.max_copies, math.ceil(self.rotate_bytes / max(nbytes, 1))))

    def _once(self, fn, args) -> float:
        return time_once(fn, args, self.cuda)

    def time(self, fn, tensors: tuple, x, m: int, key=None, rotate: bool = True) -> dict:
        """Median seconds of fn(x, *tensors), the tensors rotated through copies at decode
        sizes (unless not ``rotate``). {"error": ...} when fn is unsupported here; {"skipped": ...} when the last
        measurement under ``key``, scaled to this M, exceeds --max-call."""
        a = self.args
        if key in self.last:
            m0, t0 = self.last[key]
            if t0 * m / m0 > a.max_call:
                return {"skipped": f"estimated {t0 * m / m0:.1f} s per call"}
        try:
            first = self._once(fn, (x, *tensors))
        except (RuntimeError, NotImplementedError) as e:
            return {"error": str(e).splitlines()[0][:200]}
        if first > a.max_call:
            r = {"median_s": first, "min_s": first, "repeats": 1, "copies": 1}
        else:
            n_copies = self.copies(_nbytes(*tensors), m) if rotate else 1
            sets = [(x, *tensors)] + [(x, *(t.clone() for t in tensors)) for _ in range(n_copies - 1)]
            warm = 1 if first * 3 > a.budget else a.warmup   # the first call was one
            for i in range(1, warm):
                self._once(fn, sets[i % len(sets)])
            n = a.repeats if first * a.repeats <= a.budget else max(3, math.ceil(a.budget / first))
            times = [self._once(fn, sets[(warm + i) % len(sets)]) for i in range(n)]
            del sets
            r = {"median_s": statistics.median(times), "min_s": min(times), "repeats": n, "copies": n_copies}
        if key is not None:
            self.last[key] = (m, r["median_s"])
        return r


def _quantized(n: int, k: int, bits: int, group: int | None, device: str):
    """Random codes in the model layer's layout, and the same weight for torch's kernels."""
    gs = group or k
    g = ref.num_groups(k, gs)
    codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, device=device)
    qweight = ops.pack_int32(codes.t(), bits)
    scales = (torch.rand(g, n, device=device) * 0.02 + 0.001).to(torch.float16)   # stored [G, N]
    if group is None:
        zeros = torch.full((g, n), 2 ** (bits - 1), dtype=torch.uint8, device=device)
    else:
        zeros = torch.randint(0, 2 ** bits, (g, n), dtype=torch.uint8, device=device)
    return codes, qweight, scales, zeros, gs


def _torch_int_kernel(codes, scales, zeros, bits, gs, device):
    """(fn(x, *tensors), tensors, dtypes it accepts) for torch's kernel on the same weight,
    or None. int4: W = (q - 8) * scale + zero' with zero' = (8 - zero) * scale; int8:
    W = (q - 128) * scale per channel."""
    n, k = codes.shape
    if bits == 8:
        w8 = (codes.to(torch.int16) - 128).to(torch.int8)
        s = scales[0].float()

        def int8(x, w, s_):
            return torch.ops.aten._weight_int8pack_mm(x, w, s_.to(x.dtype))
        return int8, (w8, s), (torch.float32, torch.float16, torch.bfloat16)
    sf = scales.float()                                   # [G, N]
    zf = (8 - zeros.float()) * sf
    sz = torch.stack([sf, zf], dim=-1).contiguous()       # [G, N, 2]
    if device == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 8)

        def int4_cpu(x, p, sz_):
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, gs, sz_.to(x.dtype))
        return int4_cpu, (packed, sz), (torch.float32, torch.float16, torch.bfloat16)
    try:
        u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
    except (RuntimeError, NotImplementedError):
        return None

    def int4_cuda(x, p, sz_):
        return torch.ops.aten._weight_int4pack_mm(x, p, gs, sz_.to(x.dtype))
    return int4_cuda, (packed, sz.to(torch.bfloat16)), (torch.bfloat16,)


def _lowbit(bits, gs):
    def fn(x, qweight, scales, zeros):
        return ops.weight_only_matmul(x, qweight, scales.t(), zeros.t(), bits, gs)
    return fn


def _dense(x, w):
    return torch.matmul(x, w.t())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def run(args) -> tuple[list, dict]:
    bench = Bench(args)
    dev = args.device
    half = torch.bfloat16 if dev == "cpu" else torch.float16
    x_dtypes = [torch.float32, torch.bfloat16] if dev == "cpu" else [torch.float16, torch.bfloat16]
    shapes = SHAPES[:1] if args.quick else SHAPES[:args.shapes]
    m_values = [1, 16, 256] if args.quick else M_VALUES
    rows, checks = [], {}
    for n, k, layer in shapes:
        w32 = torch.randn(n, k, device=dev) * 0.02
        dense = {}
        for m in m_values:
            x32 = torch.randn(m, k, device=dev)
            dense[m] = {"float32": bench.time(_dense, (w32,), x32, m)}
            w_half = w32.to(half)
            dense[m][str(half).split(".")[1]] = bench.time(_dense, (w_half,), x32.to(half), m)
            del w_half
            print(f"  dense {n}x{k} M={m} done", file=sys.stderr, flush=True)
        del w32
        for scheme, bits, group in SCHEMES:
            codes, qweight, scales, zeros, gs = _quantized(n, k, bits, group, dev)
            tq = _torch_int_kernel(codes, scales, zeros, bits, gs, dev)
            lb = _lowbit(bits, gs)
            lb_tensors = (qweight, scales, zeros)
            qbytes = _nbytes(qweight, scales, zeros)
            # Sanity: lowbit against the reference and torch's kernel on one M=4 input.
            xc = torch.randn(4, k, device=dev)
            y = lb(xc, *lb_tensors)
            check = {"vs_reference": _rel_err(y, ref.weight_only_matmul(xc, qweight, scales.t(), zeros.t(), bits, gs))}
            if tq is not None:
                try:
                    check["vs_torch_kernel"] = _rel_err(y, tq[0](xc.to(tq[2][0]), *tq[1]))
                except (RuntimeError, NotImplementedError) as e:
                    check["vs_torch_kernel"] = f"error: {str(e).splitlines()[0][:120]}"
            checks[f"{n}x{k} {scheme}"] = check
            del codes
            for m in m_values:
                for xd in x_dtypes:
                    x = torch.randn(m, k, device=dev).to(xd)
                    r_lb = bench.time(lb, lb_tensors, x, m)
                    hot = None
                    if m == 1:   # one copy, cache-warm: the kernel's own speed
                        hot = bench.time(lb, lb_tensors, x, m, rotate=False)
                    r_tq = None
                    if tq is not None and xd in tq[2]:
                        r_tq = bench.time(tq[0], tq[1], x, m, key=("torch_q", n, k, scheme, xd))
                    rows.append(_row(n, k, layer, scheme, xd, m, r_lb, hot, dense[m], r_tq, qbytes))
                    r = rows[-1]
                    print(f"  {n}x{k} {scheme} {str(xd)[6:]} M={m}: lowbit {_fmt(r['lowbit_ms'])} ms, "
                          f"torch-q {_fmt(r['torch_q_ms'])} ms, fp32 {_fmt(r['fp32_ms'])} ms",
                          file=sys.stderr, flush=True)
            del qweight, scales, zeros, tq
    return rows, checks


def _ms(r: dict | None) -> float | None:
    return None if r is None or "median_s" not in r else r["median_s"] * 1e3


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def _row(n, k, layer, scheme, xd, m, r_lb, hot, dense, r_tq, qbytes) -> dict:
    lb_ms = _ms(r_lb)
    half_key = [key for key in dense if key != "float32"][0]
    row = {
        "shape": f"{n}x{k}", "layer": layer, "scheme": scheme, "x_dtype": str(xd).split(".")[1], "m": m,
        "lowbit_ms": lb_ms, "lowbit_hot_ms": _ms(hot),
        "fp32_ms": _ms(dense["float32"]), f"{half_key}_ms": _ms(dense[half_key]), "half_dtype": half_key,
        "torch_q_ms": _ms(r_tq), "torch_q_note": (r_tq or {}).get("error") or (r_tq or {}).get("skipped"),
        "lowbit_copies": (r_lb or {}).get("copies"), "lowbit_repeats": (r_lb or {}).get("repeats"),
        "weight_bytes": qbytes,
    }
    row["half_ms"] = row[f"{half_key}_ms"]
    for key in ("fp32", "half", "torch_q"):
        other = row[f"{key}_ms"]
        row[f"vs_{key}"] = None if other is None or not lb_ms else other / lb_ms
    row["gbps"] = qbytes / (lb_ms * 1e-3) / 1e9 if m == 1 and lb_ms else None
    return row


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="4096x4096 only, M in {1, 16, 256}, fewer repeats")
    p.add_argument("--shapes", type=int, default=len(SHAPES),
                   help=f"how many of the {len(SHAPES)} shapes to run (default all)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 20; 5 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--budget", type=float, default=0.5,
                   help="seconds a slow measurement may take; fewer repeats (>= 3) beyond it")
    p.add_argument("--max-call", type=float, default=2.0,
                   help="a first call slower than this many seconds is reported as measured once, "
                        "and a call estimated slower (from the previous M) is skipped")
    p.add_argument("--rotate-mib", type=int, default=None,
                   help="decode (M <= 16) weights are replicated up to this many MiB "
                        "(default twice the last-level cache, at most 1024)")
    p.add_argument("--max-copies", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/bench_linear_<device>.json)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    if args.rotate_mib is None:
        args.rotate_mib = min(1024, 2 * _llc_bytes() >> 20) if args.device == "cpu" else 1024
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / f"bench_linear_{args.device}.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    desc = setup_run("bench_linear", args)
    if desc is None:
        return 2
    t_start = time.perf_counter()
    print(f"decode weights rotated through {args.rotate_mib} MiB")
    load_before = _loadavg()
    copy = copy_bandwidth(Timer(args.device, 5, 1, 10.0), args.device)
    print(f"copy bandwidth: {copy['gbps']:.1f} GB/s (1 GiB float32 copy_, read + write)\n")

    rows, checks = run(args)
    half_name = rows[0]["half_dtype"] if rows else "bfloat16"
    headers = ["shape", "scheme", "x", "M", "lowbit ms", "fp32 ms", f"{half_name} ms", "torch-q ms",
               "vs fp32", f"vs {half_name}", "vs torch-q", "GB/s (M=1)", "of copy"]
    table = format_table(headers, [
        [r["shape"], r["scheme"], r["x_dtype"], r["m"], _fmt(r["lowbit_ms"]), _fmt(r["fp32_ms"]),
         _fmt(r["half_ms"]), _fmt(r["torch_q_ms"]), _fmt(r["vs_fp32"], ".2f") + "x" if r["vs_fp32"] else "-",
         _fmt(r["vs_half"], ".2f") + "x" if r["vs_half"] else "-",
         _fmt(r["vs_torch_q"], ".2f") + "x" if r["vs_torch_q"] else "-",
         _fmt(r["gbps"], ".1f"), f"{100 * r['gbps'] / copy['gbps']:.0f}%" if r["gbps"] else ""]
        for r in rows], right=set(range(3, 13)))
    print(table)
    print("\naccuracy check (relative error, M=4): " + ", ".join(
        f"{key}: ref {v['vs_reference']:.1e}" + (f", torch {v['vs_torch_kernel']:.1e}"
                                                 if isinstance(v.get("vs_torch_kernel"), float) else "")
        for key, v in checks.items()))
    elapsed = time.perf_counter() - t_start

    result = {
        "benchmark": "bench_linear",
        **run_info(args.device, desc),
        "settings": {"quick": args.quick, "repeats": args.repeats, "warmup": args.warmup,
                     "budget_s": args.budget, "max_call_s": args.max_call,
                     "rotate_mib": args.rotate_mib, "decode_max_m": DECODE_MAX_M,
                     "scale_dtype": "float16", "zero_dtype": "uint8",
                     "layout": "qweight int32 [K*bits/32, N]; scales/zeros stored [G, N], passed transposed"},
        "bytes_formula": "GB/s at M=1: (qweight + scales + zeros bytes) / lowbit median time",
        "loadavg_1min": {"start": load_before, "end": _loadavg()},
        "elapsed_s": round(elapsed, 1),
        "copy": copy,
        "accuracy_check": checks,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
