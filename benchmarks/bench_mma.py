#!/usr/bin/env python
"""Tensor-core weight-only matmul: lowbit.ops.mma_matmul vs cuBLAS, tinygemm and lowbit's GEMV.

For the linear layers of Llama-2-7B (q/k/v/o 4096x4096, gate/up 11008x4096, down
4096x11008) and Llama-3-8B (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down
4096x14336), [N, K] = [out, in], and M rows of x (1 = one decode token, larger = a batch
or a prefill), this times in one run, on the same GPU:

* fp16 / bf16: ``F.linear(x, W)`` with the dequantized weight in that dtype (cuBLAS), the
  unquantized baseline;
* lowbit auto: ``ops.mma_matmul(x, *ops.pack_mma(...), max_mma_rows=-1)`` (its own choice
  of path), with float16 x, and with bfloat16 x ("auto bf16", scales packed in bfloat16);
* lowbit kernel: the same with ``max_mma_rows=1 << 30`` (always the tensor-core kernel);
* lowbit dequant: ``max_mma_rows=0`` (always dequantize W once + cuBLAS);
* lowbit GEMV: ``ops.weight_only_matmul`` on the GPTQ layout (``QuantLinear``'s path
  before ``pack_mma``), float16 x;
* tinygemm: ``torch.ops.aten._weight_int4pack_mm`` (bfloat16 x; 4-bit, group 32..256
  only), on ``_convert_weight_to_int4pack`` of the same codes; its zero-point form is
  ``W = (q - 8) * scale + zero'``, so it gets ``zero' = (8 - zero) * scale``;
* Marlin is not measured: it cannot be installed on the lent GPU machines (no network, no
  wheel in the image); the JSON says so.

Default grid: 4-bit, group 128, symmetric (``--bits 8``, ``--group-size``, ``--asym``
change it). The codes, scales (float16, [G, N]) and zeros are random; every method
computes with the same weight W = (q - zero) * scale.

Ratios (above 1: lowbit is faster): vs fp16 = fp16 / auto; vs bf16 = bf16 / auto bf16;
vs tinygemm = tinygemm / auto bf16 (both bfloat16 x). At M = 1 the achieved bandwidth is
(packed + scales + zeros + x + y bytes) / auto time, against the copy bandwidth measured
in the same run (``dst.copy_(src)`` of 1 GiB, bytes read + written). Per family a
summary line gives the smallest speed-up vs fp16 for M <= 16, the M = 1 bandwidth and
the speed-up of a whole decoder block (its seven linears, summed).

Correctness first: on every shape and M, each method's output on a fresh random x is
compared with ``x.double() @ W_x.double().t()`` (W_x: W with the scale rounded to x's
dtype, then W rounded to it, what a tensor core multiplies), after a freed block of the
output's size was filled with NaN (the allocator reuses it, so unwritten elements show):
relative error ||out - ref|| / ||ref|| and mean |out - ref| / mean |ref|, in the JSON; a
NaN, or an error above 1e-2 (half x; 1e-4 for float32 x), fails the run (exit code 1).

Timing (CUDA): each measurement captures ``calls`` calls in a CUDA graph (enough to fill
about ``--graph-ms``, at least one per weight copy) after warm-up calls, and times
``--repeats`` replays with CUDA events: the median replay time / calls. Graph replay
removes the host's launch cost, which would otherwise exceed a microsecond kernel. For
M <= 64 each method's weights are replicated to ``--rotate-mib`` (default 256 MiB, over
four times the L2 of an H100/H200) and the calls cycle through the copies, so the weights
come from HBM. If a capture fails the calls are timed eagerly in the same loop (the JSON
says which). CPU (the smoke mode): ``time.perf_counter``, median of ``--repeats`` calls.

    python benchmarks/bench_mma.py                          # full GPU run (under ~100 s)
    python benchmarks/bench_mma.py --m 1,16,256 --shapes 8b # Llama-3-8B shapes only
    python benchmarks/bench_mma.py --device cpu --quick     # CPU smoke test (seconds)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit import ops
from lowbit._report import format_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import Timer, _loadavg, copy_bandwidth, run_info, setup_run, time_once  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# (N, K) once each, in this order; the families name their layers.
SHAPES = [(4096, 4096), (1024, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]
FAMILIES = {   # family -> [(N, K, layer, count per decoder block)]
    "Llama-2-7B": [(4096, 4096, "q/k/v/o", 4), (11008, 4096, "gate/up", 2), (4096, 11008, "down", 1)],
    "Llama-3-8B": [(4096, 4096, "q/o", 2), (1024, 4096, "k/v", 2), (14336, 4096, "gate/up", 2),
                   (4096, 14336, "down", 1)],
}
FAMILY_KEYS = {"7b": "Llama-2-7B", "8b": "Llama-3-8B"}
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
QUICK_CUDA = ([(4096, 4096), (14336, 4096)], [1, 16, 256])
QUICK_CPU = ([(256, 512)], [1, 16])   # one small shape: N % 64 == 0, K % 128 == 0
ROTATE_MAX_M = 64          # weights rotated through copies up to this M
FORCE_KERNEL = 1 << 30     # max_mma_rows: always the tensor-core kernel
MARLIN_NOTE = ("Marlin (IST-DASLab marlin, vLLM's marlin kernels) is not measured: it is not installed on "
               "the lent GPU machines and cannot be (no network there, no wheel in the image)")

# method key -> (label, x dtype key); x dtype keys: "half" (float16 on CUDA, float32 on
# the CPU), "bf16". Dense baselines first.
METHODS_CUDA = {
    "fp16": ("fp16", "half"), "bf16": ("bf16", "bf16"),
    "auto": ("auto", "half"), "kernel": ("kernel", "half"), "dequant": ("dequant", "half"),
    "auto_bf16": ("auto bf16", "bf16"), "gemv": ("GEMV", "half"), "tinygemm": ("tinygemm", "bf16"),
}
METHODS_CPU = {
    "fp32": ("fp32", "half"), "auto": ("auto", "half"), "kernel": ("kernel", "half"),
    "dequant": ("dequant", "half"), "gemv": ("GEMV", "half"),
}
MMA_METHODS = ("auto", "kernel", "dequant", "auto_bf16")


def x_dtypes(device: str) -> dict:
    """x dtype of each key of the method tables."""
    return {"half": torch.float16 if device == "cuda" else torch.float32, "bf16": torch.bfloat16}


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


# -- the weight in each method's layout ----------------------------------------------------

class Weight:
    """One random quantized weight [N, K] in every layout the methods read."""

    def __init__(self, n: int, k: int, args, device: str, have_mma: bool):
        self.n, self.k, self.bits = n, k, args.bits
        self.gs = k if args.group_size <= 0 or args.group_size >= k else args.group_size
        g = -(-k // self.gs)
        self.codes = torch.randint(0, 2 ** self.bits, (n, k), dtype=torch.uint8, device=device)
        self.scales = (torch.rand(g, n, device=device) * 0.02 + 0.001).to(torch.float16)   # [G, N]
        if args.asym:
            self.zeros = torch.randint(0, 2 ** self.bits, (g, n), dtype=torch.uint8, device=device)
        else:
            self.zeros = torch.full((g, n), 2 ** (self.bits - 1), dtype=torch.uint8, device=device)
        self.qweight = ops.pack_int32(self.codes.t(), self.bits)
        self.cuda = device == "cuda"
        self.half = torch.float16 if self.cuda else torch.float32
        self.tensors: dict[str, tuple] = {}   # method -> weight tensors (x comes first in the call)
        self.notes: dict[str, str] = {}
        self.tensors["gemv"] = (self.qweight, self.scales, self.zeros)
        dense = {"fp16": torch.float16, "bf16": torch.bfloat16} if self.cuda else {"fp32": torch.float32}
        for key, dt in dense.items():
            self.tensors[key] = (self.w_as(dt),)
        if have_mma:
            try:
                packed = ops.pack_mma(self.qweight, self.scales.to(self.half), self.zeros, self.bits, self.gs)
                for key in ("auto", "kernel", "dequant"):
                    self.tensors[key] = packed
                if self.cuda:
                    self.tensors["auto_bf16"] = ops.pack_mma(self.qweight, self.scales.to(torch.bfloat16),
                                                             self.zeros, self.bits, self.gs)
            except (RuntimeError, ValueError, NotImplementedError) as e:
                for key in MMA_METHODS:
                    self.notes[key] = f"pack_mma: {_first_line(e)}"
        if self.cuda:
            self._tinygemm()

    def w_as(self, dtype: torch.dtype) -> torch.Tensor:
        """W_x [N, K]: the scale rounded to ``dtype``, then (q - zero) * scale rounded to it."""
        s = self.scales.to(dtype).float().t().repeat_interleave(self.gs, dim=1)[:, :self.k]
        z = self.zeros.float().t().repeat_interleave(self.gs, dim=1)[:, :self.k]
        return ((self.codes.float() - z) * s).to(dtype)

    def _tinygemm(self) -> None:
        if self.bits != 4 or self.gs not in (32, 64, 128, 256):
            self.notes["tinygemm"] = f"tinygemm takes 4-bit codes in groups of 32..256 (here bits={self.bits}, " \
                                     f"group {self.gs})"
            return
        try:
            u8 = (self.codes[:, ::2] << 4 | self.codes[:, 1::2]).to(torch.uint8)   # [N, K / 2]
            packed = torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), 8)
            sf = self.scales.to(torch.bfloat16).float()                               # [G, N]
            zf = (8 - self.zeros.float()) * sf
            sz = torch.stack([sf, zf], dim=-1).to(torch.bfloat16).contiguous()        # [G, N, 2]
            self.tensors["tinygemm"] = (packed, sz)
        except (RuntimeError, NotImplementedError, AttributeError) as e:
            self.notes["tinygemm"] = f"_convert_weight_to_int4pack: {_first_line(e)}"

    def fn(self, key: str):
        """The call ``fn(x, *self.tensors[key])``."""
        bits, gs = self.bits, self.gs
        if key in ("fp16", "bf16", "fp32"):
            return F.linear
        if key == "gemv":
            return lambda x, q, s, z: ops.weight_only_matmul(x, q, s.t(), z.t(), bits, gs)
        if key == "tinygemm":
            return lambda x, p, sz: torch.ops.aten._weight_int4pack_mm(x, p, gs, sz)
        rows = {"auto": -1, "auto_bf16": -1, "kernel": FORCE_KERNEL, "dequant": 0}[key]
        return lambda x, p, s, z: ops.mma_matmul(x, p, s, z, bits, gs, None, rows)

    def mma_bytes(self) -> int:
        return _nbytes(*self.tensors["auto"]) if "auto" in self.tensors else 0


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


# -- timing --------------------------------------------------------------------------------

class GraphTimer:
    """Per-call time on CUDA from replays of a captured graph of ``calls`` calls."""

    def __init__(self, args):
        self.repeats, self.warmup, self.graph_s, self.max_calls = args.repeats, args.warmup, args.graph_ms / 1e3, \
            args.max_calls

    def measure(self, fn, arg_sets: list) -> dict:
        for i in range(max(self.warmup, 1)):
            fn(*arg_sets[i % len(arg_sets)])
        first = time_once(fn, arg_sets[0], True)   # host launch included: an upper bound
        calls = max(len(arg_sets), min(self.max_calls, math.ceil(self.graph_s / max(first, 1e-7))))
        sets = [arg_sets[i % len(arg_sets)] for i in range(calls)]
        graph, mode = None, "graph"
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for a in sets[:2]:
                    fn(*a)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for a in sets:
                    fn(*a)
        except (RuntimeError, NotImplementedError) as e:
            graph, mode = None, f"eager (graph capture failed: {_first_line(e)})"
            torch.cuda.synchronize()

        def run():
            if graph is not None:
                graph.replay()
            else:
                for a in sets:
                    fn(*a)

        for _ in range(self.warmup):
            run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(self.repeats):
            torch.cuda.synchronize()
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                "repeats": self.repeats, "calls": calls, "timing": mode}


def _copies(nbytes: int, m: int, args) -> int:
    if m > ROTATE_MAX_M:
        return 1
    return max(1, min(args.max_copies, math.ceil((args.rotate_mib << 20) / max(nbytes, 1))))


def _rel_errs(out: torch.Tensor, ref: torch.Tensor) -> dict:
    o = out.double()
    if not torch.isfinite(o).all():
        return {"rel_err": math.nan, "rel_mean_err": math.nan}
    d = o - ref
    return {"rel_err": float(d.norm() / ref.norm().clamp(min=1e-300)),
            "rel_mean_err": float(d.abs().mean() / ref.abs().mean().clamp(min=1e-300))}


# -- the run -------------------------------------------------------------------------------

def run(args, methods: dict, have_mma: bool, timer) -> tuple[list, dict]:
    dev = args.device
    xdt = x_dtypes(dev)
    tol = {d: 1e-4 if dt == torch.float32 else 1e-2 for d, dt in xdt.items()}
    rows, checks = [], {}
    for n, k in args.shape_list:
        t_shape = time.perf_counter()
        w = Weight(n, k, args, dev, have_mma)
        shape = f"{n}x{k}"
        refs_w = {d: w.w_as(dt).double() for d, dt in xdt.items() if any(v[1] == d for v in methods.values())}
        checks[shape] = {}
        rot: dict[int, list] = {}   # id(weight tuple) -> its copies, for small M
        for m in args.m:
            row = {"shape": shape, "n": n, "k": k, "m": m, "bits": w.bits, "group_size": w.gs,
                   "layers": [f"{fam} {layer}" for fam, ls in FAMILIES.items() for nn_, kk, layer, _ in ls
                              if (nn_, kk) == (n, k)]}
            # Correctness on a fresh x per dtype.
            xs = {d: torch.randn(m, k, device=dev).to(dt) for d, dt in xdt.items()}
            refs = {d: xs[d].double() @ refs_w[d].t() for d in refs_w}
            failed = {}
            for key, (_, d) in methods.items():
                if key not in w.tensors:
                    continue
                # Poison: a freed block of the output's size, full of NaN, which the caching
                # allocator hands to the op's output next, so an unwritten element shows.
                torch.full((m, n), math.nan, dtype=xs[d].dtype, device=dev)
                try:
                    out = w.fn(key)(xs[d], *w.tensors[key])
                except (RuntimeError, ValueError, NotImplementedError) as e:
                    failed[key] = _first_line(e)
                    continue
                e = _rel_errs(out, refs[d])
                e["ok"] = bool(e["rel_err"] <= tol[d])   # NaN compares False
                checks[shape].setdefault(key, {})[str(m)] = e
                row[f"{key}_rel_err"] = e["rel_err"]
            if "fp16" in methods and "auto_rel_err" in row:
                a = w.fn("auto")(xs["half"], *w.tensors["auto"])
                b = w.fn("fp16")(xs["half"], *w.tensors["fp16"])
                row["auto_vs_fp16_output_rel_err"] = _rel_errs(a, b.double())["rel_err"]
            del refs
            # Timing.
            for key in methods:
                if key not in w.tensors or key in failed:
                    row[f"{key}_ms"] = None
                    row[f"{key}_note"] = failed.get(key) or w.notes.get(key, "not run")
                    continue
                base = w.tensors[key]
                copies = _copies(_nbytes(*base), m, args)
                if copies > 1:   # auto / kernel / dequant share one packed weight and its copies
                    have = rot.setdefault(id(base), [base])
                    while len(have) < copies:
                        have.append(tuple(t.clone() for t in base))
                    wsets = have[:copies]
                else:
                    wsets = [base]
                x = xs[methods[key][1]]
                try:
                    r = timer.measure(w.fn(key), [(x, *ws) for ws in wsets])
                except (RuntimeError, ValueError, NotImplementedError) as e:
                    row[f"{key}_ms"] = None
                    row[f"{key}_note"] = _first_line(e)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    continue
                row[f"{key}_ms"] = r["median_s"] * 1e3
                row[f"{key}_min_ms"] = r["min_s"] * 1e3
                row[f"{key}_copies"] = copies
                if "calls" in r:
                    row[f"{key}_calls"] = r["calls"]
                    if r["timing"] != "graph":
                        row[f"{key}_timing"] = r["timing"]
            if m > ROTATE_MAX_M:
                rot.clear()
            _ratios(row, w, m, xs)
            rows.append(row)
            print(f"  {shape} M={m}: " + ", ".join(
                f"{methods[key][0]} {_us(row.get(f'{key}_ms'))}" for key in methods) + " us",
                file=sys.stderr, flush=True)
            del xs
        checks[shape]["notes"] = dict(w.notes)
        print(f"  {shape}: {time.perf_counter() - t_shape:.1f} s", file=sys.stderr, flush=True)
        del w, rot, refs_w
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows, checks


def _ratios(row: dict, w: Weight, m: int, xs: dict) -> None:
    def ratio(a, b):
        ta, tb = row.get(f"{a}_ms"), row.get(f"{b}_ms")
        return None if ta is None or not tb else ta / tb

    row["vs_fp16"] = ratio("fp16", "auto")
    row["vs_bf16"] = ratio("bf16", "auto_bf16")
    row["vs_tinygemm"] = ratio("tinygemm", "auto_bf16")
    row["vs_fp32"] = ratio("fp32", "auto")
    row["vs_gemv"] = ratio("gemv", "auto")
    row["kernel_vs_fp16"] = ratio("fp16", "kernel")
    row["bytes_m1"] = None
    row["gbps"] = None
    if m == 1 and row.get("auto_ms"):
        x = xs["half"]
        nbytes = w.mma_bytes() + _nbytes(x) + w.n * x.element_size()
        row["bytes_m1"] = nbytes
        row["gbps"] = nbytes / (row["auto_ms"] * 1e-3) / 1e9
    dense = "fp16" if row.get("fp16_ms") else "fp32"
    if m == 1 and row.get(f"{dense}_ms"):
        wd = w.tensors[dense][0]
        row["dense_gbps"] = (_nbytes(wd) + (w.k + w.n) * wd.element_size()) / (row[f"{dense}_ms"] * 1e-3) / 1e9


def _us(ms) -> str:
    return "-" if ms is None else f"{ms * 1e3:.1f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def summaries(rows: list, args, copy_gbps: float) -> tuple[list, dict]:
    """Per family: min speed-up vs the dense half baseline for M <= 16, M = 1 bandwidth,
    whole-block speed-up (the block's linears summed) per M."""
    by = {(r["n"], r["k"], r["m"]): r for r in rows}
    dense = "fp16" if args.device == "cuda" else "fp32"
    lines, out = [], {}
    for fam, layers in FAMILIES.items():
        present = [(n, k, name, c) for n, k, name, c in layers if (n, k) in {(r["n"], r["k"]) for r in rows}]
        if not present:
            continue
        small = [(by[(n, k, m)][f"vs_{dense}"], f"{name} M={m}") for n, k, name, _ in present for m in args.m
                 if m <= 16 and (n, k, m) in by and by[(n, k, m)].get(f"vs_{dense}")]
        worst = min(small) if small else None
        bw = {name: by[(n, k, 1)]["gbps"] / copy_gbps for n, k, name, _ in present
              if (n, k, 1) in by and by[(n, k, 1)].get("gbps")}
        block = {}
        for m in args.m:
            rs = [(by.get((n, k, m)), c) for n, k, _, c in present]
            if all(r is not None and r.get(f"{dense}_ms") and r.get("auto_ms") for r, _ in rs):
                block[str(m)] = sum(r[f"{dense}_ms"] * c for r, c in rs) / sum(r["auto_ms"] * c for r, c in rs)
        complete = len(present) == len(layers)
        out[fam] = {"layers_measured": [name for _, _, name, _ in present], "complete": complete,
                    f"min_vs_{dense}_m_le_16": None if worst is None else worst[0],
                    "min_at": None if worst is None else worst[1],
                    "m1_bandwidth_of_copy": bw, "block_vs_" + dense: block}
        parts = ["min speed-up vs " + dense + " (M<=16) " +
                 ("-" if worst is None else f"{worst[0]:.2f}x at {worst[1]}")]
        if bw:
            parts.append("M=1 bandwidth " + ", ".join(f"{name} {100 * v:.0f}%" for name, v in bw.items())
                         + " of copy")
        for m in ("1", "16"):
            if m in block:
                parts.append(f"block M={m} {block[m]:.2f}x")
        lines.append(f"{fam}{'' if complete else ' (some layers)'}: " + "; ".join(parts))
    return lines, out


# -- main ----------------------------------------------------------------------------------

def _shape_arg(s: str) -> list:
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        if part in FAMILY_KEYS:
            out += [(n, k) for n, k, _, _ in FAMILIES[FAMILY_KEYS[part]]]
        elif "x" in part:
            n, k = part.split("x")
            out.append((int(n), int(k)))
        else:
            raise argparse.ArgumentTypeError(f"--shapes takes 7b, 8b or NxK items, got {part!r}")
    return list(dict.fromkeys(out))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--quick", action="store_true",
                   help="CUDA: 4096x4096 and 14336x4096, M in {1, 16, 256}; CPU: one 256x512 shape, M in {1, 16}")
    p.add_argument("--m", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="rows of x, comma-separated (default " + ",".join(map(str, M_VALUES)) + ")")
    p.add_argument("--shapes", type=_shape_arg, default=None,
                   help="comma-separated: 7b, 8b (a family's layers) or NxK (default both families)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--group-size", type=int, default=128, help="columns per group; 0 or -1: per-channel")
    p.add_argument("--asym", action="store_true", help="random zero points (default symmetric, zero 2**(bits-1))")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed graph replays (CUDA) or calls (CPU) per measurement (default 10 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls / replays first (default 2)")
    p.add_argument("--graph-ms", type=float, default=2.0,
                   help="CUDA: calls captured per graph fill about this many ms (default 2)")
    p.add_argument("--max-calls", type=int, default=64, help="CUDA: at most this many calls per graph")
    p.add_argument("--budget", type=float, default=2.0, help="CPU: seconds a slow measurement may take")
    p.add_argument("--rotate-mib", type=int, default=None,
                   help=f"up to M = {ROTATE_MAX_M} each weight is replicated up to this many MiB "
                        "(default 256 on CUDA, 64 on the CPU)")
    p.add_argument("--max-copies", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/bench_mma_<device>.json)")
    args = p.parse_args(argv)
    quick = QUICK_CUDA if args.device == "cuda" else QUICK_CPU
    if args.m is None:
        args.m = quick[1] if args.quick else M_VALUES
    if args.shapes is None:
        args.shapes = quick[0] if args.quick else SHAPES
    args.shape_list = args.shapes
    if any(m < 1 for m in args.m):
        p.error("--m takes positive row counts")
    if args.repeats is None:
        args.repeats = 10 if args.device == "cuda" else 5
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.rotate_mib is None:
        args.rotate_mib = 256 if args.device == "cuda" else 64
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / f"bench_mma_{args.device}.json"
    return args


def _mma_available(device: str) -> tuple[bool, str | None]:
    """Whether pack_mma + mma_matmul run here (a tiny call), and why not."""
    if not (hasattr(ops, "mma_matmul") and hasattr(torch.ops.lowbit, "mma_matmul")):
        return False, "this lowbit build has no mma_matmul op: the lowbit mma columns are skipped"
    try:
        codes = torch.randint(0, 16, (64, 128), dtype=torch.uint8, device=device)
        s = torch.full((1, 64), 0.01, dtype=torch.float16, device=device)
        z = torch.full((1, 64), 8, dtype=torch.uint8, device=device)
        p = ops.pack_mma(ops.pack_int32(codes.t(), 4), s, z, 4, 128)
        x = torch.randn(2, 128, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
        ops.mma_matmul(x, *p, 4, 128)
    except (RuntimeError, ValueError, NotImplementedError) as e:
        return False, f"mma_matmul does not run on {device} in this build ({_first_line(e)}): the lowbit mma " \
                      "columns are skipped"
    return True, None


def _marlin_note() -> str:
    if importlib.util.find_spec("marlin") is None:
        return MARLIN_NOTE
    return "a 'marlin' module is installed here but is not wired into this benchmark: not measured"


def main(argv=None) -> int:
    args = parse_args(argv)
    desc = setup_run("bench_mma", args)
    if desc is None:
        return 2
    if args.device == "cuda" and not lowbit.build_info.CUDA:
        print("bench_mma: --device cuda needs lowbit built with CUDA", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    load_before = _loadavg()
    have_mma, mma_note = _mma_available(args.device)
    if mma_note:
        print(f"NOTE: {mma_note}")
    methods = dict(METHODS_CUDA if args.device == "cuda" else METHODS_CPU)
    if not have_mma:
        for key in MMA_METHODS:
            methods.pop(key, None)
    copy = copy_bandwidth(Timer(args.device, 5, 1, 10.0), args.device)
    print(f"copy bandwidth: {copy['gbps']:.1f} GB/s (1 GiB float32 copy_, read + write)\n")
    timer = GraphTimer(args) if args.device == "cuda" else Timer(args.device, args.repeats, args.warmup, args.budget)

    rows, checks = run(args, methods, have_mma, timer)
    headers = ["shape", "M", *(f"{methods[key][0]} us" for key in methods)]
    ratio_cols = [c for c in ("vs_fp16", "vs_bf16", "vs_tinygemm", "vs_fp32", "vs_gemv")
                  if any(r.get(c) is not None for r in rows)]
    headers += [c.replace("_", " ") for c in ratio_cols] + ["GB/s (M=1)", "of copy"]
    table = format_table(headers, [
        [r["shape"], r["m"], *(_us(r.get(f"{key}_ms")) for key in methods), *(_x(r.get(c)) for c in ratio_cols),
         "" if r.get("gbps") is None else f"{r['gbps']:.0f}",
         "" if r.get("gbps") is None else f"{100 * r['gbps'] / copy['gbps']:.0f}%"]
        for r in rows], right=set(range(1, len(headers))))
    print(table)
    lines, fam = summaries(rows, args, copy["gbps"])
    if lines:
        print("\n" + "\n".join(lines))
    notes = sorted({f"{key}: {r[f'{key}_note']}" for r in rows for key in methods if r.get(f"{key}_note")})
    timing_notes = sorted({f"{key}: {r[f'{key}_timing']}" for r in rows for key in methods
                           if r.get(f"{key}_timing")})
    marlin = _marlin_note()
    for line in [*notes, *timing_notes, marlin, *([mma_note] if mma_note else [])]:
        print("note: " + line)
    bad = sorted({f"{shape} {key} M={m}" for shape, per in checks.items() for key, ms in per.items()
                  if key != "notes" for m, e in ms.items() if not e["ok"]})
    worst = {key: max((e["rel_err"] for per in checks.values() for k2, ms in per.items() if k2 == key
                       for e in ms.values()), default=None) for key in methods}
    print("\naccuracy vs float64 reference (max relative error over shapes and M): " + ", ".join(
        f"{methods[key][0]} {v:.1e}" for key, v in worst.items() if v is not None))
    if bad:
        print("FAILED accuracy check: " + ", ".join(bad))
    elapsed = time.perf_counter() - t_start

    result = {
        "benchmark": "bench_mma",
        **run_info(args.device, desc),
        "settings": {"m": args.m, "shapes": [f"{n}x{k}" for n, k in args.shape_list], "bits": args.bits,
                     "group_size": args.group_size, "symmetric": not args.asym, "quick": args.quick,
                     "repeats": args.repeats, "warmup": args.warmup, "graph_ms": args.graph_ms,
                     "max_calls": args.max_calls, "rotate_mib": args.rotate_mib, "rotate_max_m": ROTATE_MAX_M,
                     "max_copies": args.max_copies, "scale_dtype": "float16 (bfloat16 for auto_bf16)",
                     "methods": {key: {"label": lab, "x_dtype": str(x_dtypes(args.device)[d]).split(".")[1]}
                                 for key, (lab, d) in methods.items()}},
        "timing": ("CUDA: median over replays of a captured graph of `calls` calls (per call), CUDA events"
                   if args.device == "cuda" else "CPU: median of calls, time.perf_counter"),
        "ratio_formula": "vs_fp16 = fp16_ms / auto_ms; vs_bf16 = bf16_ms / auto_bf16_ms; vs_tinygemm = "
                         "tinygemm_ms / auto_bf16_ms; vs_gemv = gemv_ms / auto_ms; vs_fp32 (CPU) = fp32_ms / auto_ms",
        "bytes_formula": "gbps at M=1: (packed + scales + zeros + x + y bytes) / auto median time; "
                         "of copy = gbps / copy.gbps",
        "reference": "x.double() @ W_x.double().t(), W_x = (q - zero) * scale with scale rounded to x.dtype and "
                     "W rounded to x.dtype",
        "loadavg_1min": {"start": load_before, "end": _loadavg()},
        "elapsed_s": round(elapsed, 1),
        "copy": copy,
        "mma_available": have_mma,
        "notes": [*notes, *timing_notes, *([mma_note] if mma_note else [])],
        "marlin": marlin,
        "families": fam,
        "accuracy": checks,
        "accuracy_ok": not bad,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out} ({elapsed:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
