#!/usr/bin/env python
"""Throughput of lowbit's quantization primitives vs their plain-PyTorch references.

For each op, on Llama-7B weight shapes [N, K] = (4096, 4096) and (11008, 4096) in fp16
(plus an activation [2048, 4096] for ``quantize_per_token_int8``), this times lowbit's
kernel and the reference in ``lowbit.reference`` doing the same work, in the same run,
and reports GB/s against the machine's copy bandwidth measured in the same run.

    bytes moved = bytes the op must read + bytes it must write (each tensor once;
                  the formula of each op is next to its definition in ``_cases``)
    GB/s        = bytes moved / median time / 1e9
    copy GB/s   = (read + write bytes of dst.copy_(src), 1 GiB float32 each way) / median time

Each op allocates its outputs, as in real use; on a Linux CPU an allocation above
glibc's mmap threshold (at most 32 MiB) is fresh memory every call and costs a page
fault per 4 KiB first touched. The JSON records minor faults per call, and the copy
section also times ``src.clone()`` (a copy into fresh memory) for comparison.

Timing: ``--warmup`` calls, then the median of up to ``--repeats`` calls (fewer for a
slow call: enough to fill ``--budget`` seconds, at least 3; the count used is in the
JSON), each on the next of a few copies of the inputs in turn so that the last call's
data is not still in cache. CPU calls are timed with ``time.perf_counter``; CUDA calls
with CUDA events after a ``torch.cuda.synchronize``.

    python benchmarks/bench_quantize.py                     # full run, CPU
    python benchmarks/bench_quantize.py --quick --threads 1
    python benchmarks/bench_quantize.py --device cuda --out /tmp/b.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit import ops
from lowbit import reference as ref
from lowbit._report import format_table

REPO = Path(__file__).resolve().parent.parent
WEIGHT_SHAPES = [(4096, 4096), (11008, 4096)]
ACT_SHAPE = (2048, 4096)
BITS = 4
GROUP = 128
N_COPIES = 3  # input copies rotated between calls


# -- timing ------------------------------------------------------------------------------

def run_info(device: str, desc: str) -> dict:
    """What every benchmark's JSON records about the run: device, versions, build, threads,
    commit, date and command line."""
    return {
        "device": device,
        "device_description": desc,
        "torch_version": torch.__version__,
        "lowbit_version": lowbit.__version__,
        "lowbit_build": {"CPU_ISA": lowbit.build_info.CPU_ISA, "CUDA": lowbit.build_info.CUDA,
                         "TORCH_VERSION": lowbit.build_info.TORCH_VERSION},
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
    }


def time_once(fn, args, cuda: bool) -> float:
    """Seconds of one call ``fn(*args)``: CUDA events on a GPU, perf_counter on the CPU."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


class Timer:
    """Median wall time of a call, on CPU or CUDA."""

    def __init__(self, device: str, repeats: int, warmup: int, budget_s: float):
        self.cuda = device == "cuda"
        self.repeats, self.warmup, self.budget_s = repeats, warmup, budget_s

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _once(self, fn, args) -> float:
        return time_once(fn, args, self.cuda)

    def measure(self, fn, arg_sets: list) -> dict:
        """Time ``fn(*arg_sets[i % len(arg_sets)])``: median and fastest seconds, repeats
        used, and (CPU) minor page faults per call, i.e. first touches of fresh memory."""
        first = None
        for i in range(max(self.warmup, 1)):
            t = self._once(fn, arg_sets[i % len(arg_sets)])
            first = t if first is None else min(first, t)
        n = self.repeats
        if first * n > self.budget_s:  # a slow call: fill the budget, at least 3 times
            n = min(n, max(3, math.ceil(self.budget_s / max(first, 1e-9))))
        faults0 = _minor_faults()
        times = [self._once(fn, arg_sets[(self.warmup + i) % len(arg_sets)]) for i in range(n)]
        faults1 = _minor_faults()
        self._sync()
        faults = None if self.cuda or faults0 is None else round((faults1 - faults0) / n)
        return {"median_s": statistics.median(times), "min_s": min(times), "repeats": n,
                "minor_faults_per_call": faults}


def _minor_faults() -> int | None:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return None


def copy_bandwidth(timer: Timer, device: str) -> dict:
    """The machine's ceiling: ``dst.copy_(src)`` of 1 GiB float32 into an existing buffer,
    (read + write bytes) / median time. Also ``src.clone()``, which writes a freshly
    allocated buffer as the ops do (on Linux CPU: a page fault per 4 KiB first touched)."""
    numel = (1 << 30) // 4
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    copy = timer.measure(lambda s, d: d.copy_(s), [(src, dst), (dst, src)])
    del dst
    clone = timer.measure(lambda s: s.clone(), [(src,)])
    del src
    return {"bytes": nbytes, "ms": copy["median_s"] * 1e3, "gbps": nbytes / copy["median_s"] / 1e9,
            "repeats": copy["repeats"],
            "clone_ms": clone["median_s"] * 1e3, "clone_gbps": nbytes / clone["median_s"] / 1e9,
            "clone_minor_faults_per_call": clone["minor_faults_per_call"]}


# -- the cases ---------------------------------------------------------------------------

def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _weight(n: int, k: int, device: str) -> torch.Tensor:
    return (torch.randn(n, k, device=device) * 0.02).to(torch.float16)


def _cases(shapes: list, device: str):
    """Yield (op, shape, lowbit fn, reference fn, arg sets, bytes moved) per row."""
    fp8 = torch.float8_e4m3fn
    for n, k in shapes:
        ws = [_weight(n, k, device) for _ in range(N_COPIES)]
        grids = [ops.quant_params(w, BITS, GROUP, False) for w in ws]
        codes = [ops.quantize(w, s, z, BITS, GROUP) for w, (s, z) in zip(ws, grids)]
        qweights = [ops.pack_int32(c.t(), BITS) for c in codes]
        s0, z0 = grids[0]
        shape = f"{n}x{k}"

        # quant_params: read w (fp16 [N, K]); write scales (fp32 [N, G]) + zeros (int32 [N, G]).
        yield ("quant_params", shape,
               lambda w: ops.quant_params(w, BITS, GROUP, False),
               lambda w: ref.quant_params(w, BITS, GROUP, False),
               [(w,) for w in ws], _nbytes(ws[0], s0, z0))

        # quantize: read w + scales + zeros; write codes (uint8 [N, K]).
        yield ("quantize", shape,
               lambda w, s, z: ops.quantize(w, s, z, BITS, GROUP),
               lambda w, s, z: ref.quantize(w, s, z, BITS, GROUP),
               [(w, s, z) for w, (s, z) in zip(ws, grids)], _nbytes(ws[0], s0, z0, codes[0]))

        # dequantize: read codes + scales + zeros; write fp16 [N, K].
        yield ("dequantize", shape,
               lambda c, s, z: ops.dequantize(c, s, z, GROUP, torch.float16),
               lambda c, s, z: ref.dequantize(c, s, z, GROUP, torch.float16),
               [(c, s, z) for c, (s, z) in zip(codes, grids)], _nbytes(codes[0], s0, z0, ws[0]))

        # pack_int32 of codes.t() (the GPTQ qweight; a transposed, non-contiguous view):
        # read codes (uint8 [K, N]); write qweight (int32 [K * bits / 32, N]).
        yield ("pack_int32", shape,
               lambda c: ops.pack_int32(c.t(), BITS),
               lambda c: ref.pack_int32(c.t(), BITS),
               [(c,) for c in codes], _nbytes(codes[0], qweights[0]))

        # unpack_int32: read qweight; write codes (uint8 [K, N]).
        yield ("unpack_int32", shape,
               lambda p: ops.unpack_int32(p, BITS, k),
               lambda p: ref.unpack_int32(p, BITS, k),
               [(p,) for p in qweights], _nbytes(qweights[0], codes[0]))

        # quantize_fp8_dynamic (per-row e4m3): read x (fp16); write q (fp8 [N, K]) + scale
        # (fp32 [N, 1]). The absmax pass reads x a second time; that is not counted.
        yield ("quantize_fp8_dynamic", shape,
               lambda w: ops.quantize_fp8_dynamic(w, fp8, True),
               lambda w: ref.quantize_fp8_dynamic(w, fp8, True),
               [(w,) for w in ws], _nbytes(ws[0]) + n * k + n * 4)

        # quantize_per_token_int8: read x (fp16); write codes (int8 [N, K]) + scales (fp32 [N, 1]).
        yield ("quantize_per_token_int8", shape,
               ops.quantize_per_token_int8, ref.quantize_per_token_int8,
               [(w,) for w in ws], _nbytes(ws[0]) + n * k + n * 4)
        del ws, grids, codes, qweights

    n, k = ACT_SHAPE
    xs = [(torch.randn(n, k, device=device) * 3).to(torch.float16) for _ in range(N_COPIES)]
    yield ("quantize_per_token_int8", f"{n}x{k} (act)",
           ops.quantize_per_token_int8, ref.quantize_per_token_int8,
           [(x,) for x in xs], _nbytes(xs[0]) + n * k + n * 4)


def _same(a, b) -> bool:
    """Outputs equal bit for bit (tensors or tuples of tensors; FP8 compared as bytes)."""
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return bool(torch.equal(a, b))


# -- report ------------------------------------------------------------------------------

def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs)"


def _loadavg() -> float | None:
    """1-minute load average (other processes on the machine skew CPU timings)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def setup_run(name: str, args) -> str | None:
    """Common start of a benchmark's main: --device cuda needs a GPU (None: the caller exits
    with 2), --threads applied, seed 0, the device line printed. Returns the device
    description."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{name}: --device cuda needs a CUDA GPU", file=sys.stderr)
        return None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    desc = device_description(args.device)
    print(f"device: {desc}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"lowbit CPU_ISA={lowbit.build_info.CPU_ISA} CUDA={lowbit.build_info.CUDA}")
    return desc


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement (default 20; 5 with --quick)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--budget", type=float, default=10.0,
                   help="seconds a slow measurement may take; fewer repeats (>= 3) beyond it")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats; weight shape 4096x4096 only (the activation row stays)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the check that lowbit and the reference agree bit for bit")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/bench_quantize_<device>.json)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / f"bench_quantize_{args.device}.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and lowbit.build_info.CUDA):
        print("bench_quantize: --device cuda needs a CUDA GPU and lowbit built with CUDA "
              f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
              f"lowbit.build_info.CUDA={lowbit.build_info.CUDA})", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timer = Timer(args.device, args.repeats, args.warmup, args.budget)
    shapes = WEIGHT_SHAPES[:1] if args.quick else WEIGHT_SHAPES

    desc = device_description(args.device)
    load_before = _loadavg()
    copy = copy_bandwidth(timer, args.device)
    print(f"copy bandwidth: {copy['gbps']:.1f} GB/s (1 GiB float32 copy_, read + write); "
          f"clone into fresh memory: {copy['clone_gbps']:.1f} GB/s\n")

    rows, mismatches = [], []
    for op, shape, fn, ref_fn, arg_sets, nbytes in _cases(shapes, args.device):
        if not args.no_check and not _same(fn(*arg_sets[0]), ref_fn(*arg_sets[0])):
            mismatches.append(f"{op} {shape}")
        lb, rf = timer.measure(fn, arg_sets), timer.measure(ref_fn, arg_sets)
        t_lb, t_ref = lb["median_s"], rf["median_s"]
        row = {
            "op": op, "shape": shape, "bytes": nbytes,
            "lowbit_ms": t_lb * 1e3, "reference_ms": t_ref * 1e3,
            "speedup": t_ref / t_lb,
            "lowbit_gbps": nbytes / t_lb / 1e9, "reference_gbps": nbytes / t_ref / 1e9,
            "copy_fraction": nbytes / t_lb / 1e9 / copy["gbps"],
            "lowbit_min_ms": lb["min_s"] * 1e3, "reference_min_ms": rf["min_s"] * 1e3,
            "lowbit_repeats": lb["repeats"], "reference_repeats": rf["repeats"],
            "lowbit_minor_faults_per_call": lb["minor_faults_per_call"],
        }
        rows.append(row)
        print(f"  {op} {shape}: {row['lowbit_ms']:.2f} ms vs {row['reference_ms']:.2f} ms",
              file=sys.stderr, flush=True)

    headers = ["op", "shape", "lowbit ms", "ref ms", "speed-up", "lowbit GB/s", "of copy"]
    table = format_table(headers, [
        [r["op"], r["shape"], f"{r['lowbit_ms']:.3f}", f"{r['reference_ms']:.3f}",
         f"{r['speedup']:.1f}x", f"{r['lowbit_gbps']:.2f}", f"{100 * r['copy_fraction']:.0f}%"]
        for r in rows], right={2, 3, 4, 5, 6})
    print(table)
    slower = [f"{r['op']} {r['shape']} ({r['speedup']:.2f}x)" for r in rows if r["speedup"] < 1]
    if slower:
        print("\nslower than the reference: " + ", ".join(slower))
    faulting = [f"{r['op']} {r['shape']} ({r['lowbit_minor_faults_per_call']})" for r in rows
                if (r["lowbit_minor_faults_per_call"] or 0) > 0]
    if faulting:
        print("\nlowbit calls that page-fault fresh output memory (minor faults per call): "
              + ", ".join(faulting))
    if mismatches:
        print("\nWARNING: lowbit and reference outputs differ for: " + ", ".join(mismatches))

    result = {
        "benchmark": "bench_quantize",
        **run_info(args.device, desc),
        "settings": {"quick": args.quick, "repeats": args.repeats, "warmup": args.warmup,
                     "budget_s": args.budget, "input_copies": N_COPIES, "bits": BITS,
                     "group_size": GROUP, "weight_dtype": "float16"},
        "bytes_formula": "bytes read + bytes written by the op, each tensor counted once",
        "loadavg_1min": {"start": load_before, "end": _loadavg()},
        "copy": copy,
        "outputs_match_reference": None if args.no_check else not mismatches,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
