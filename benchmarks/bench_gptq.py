#!/usr/bin/env python
"""GPTQ: lowbit.ops.gptq_solve vs the plain-PyTorch reference and llm-compressor's GPTQ.

In one run, on the same machine, threads and inputs:

1. Per layer, for Llama-7B shapes out x in (N x K) = 4096x4096 (q/k/v/o), 11008x4096
   (gate/up), 4096x11008 (down): W = randn(N, K) * 0.02 (float32) and a Hessian from
   correlated activations X [n, K] (n = ``--rows``, 2048 by default):
   ``X = Z (I + A B) diag(s)`` with Z, A [K, 32], B [32, K] Gaussian (a low-rank mixing
   that correlates the inputs) and s = exp(0.75 randn(K)) (a per-column scale spread, so
   diag(H) varies and act-order has something to do). ``H = 2/n X^T X`` is accumulated
   with ``lowbit.ops.accumulate_hessian``, itself timed against ``2/n X^T X`` in torch.
   With n < K the Hessian is singular; the solvers' 1% dampening makes it definite.

   The GPTQ solve of one layer at 4-bit, group 128, symmetric, block 128, damp 0.01, with
   and without act-order, timed as:

   * lowbit: ``ops.gptq_solve(w, H, 4, 128, True, 0.01, act_order, False, 128)``: one call
     that does dampening, act-order, the Cholesky factor of H^-1 and the blocked sweep;
   * reference: ``lowbit.reference.gptq.gptq_solve`` in float32 (a per-column Python loop;
     only for shapes within ``--reference-max-k`` / ``--reference-max-n``);
   * peer: llm-compressor's ``quantize_weight`` through
     ``benchmarks/peers/llmcompressor_gptq.run_peer_gptq`` (its own timing of the call,
     which includes its dampening, Cholesky and inverse, as lowbit's op does; the peer's
     qparams observer runs untimed before it).

   Quality of every result: the relative layer output error
   ``tr((W - W_hat) H (W - W_hat)^T) / tr(W H W^T)`` (``lowbit.reference.gptq.layer_loss``
   over ``layer_loss(W, 0, H)``), evaluated as ``||(W - W_hat) X^T||^2 / ||W X^T||^2``, the
   same number (H = 2/n X^T X) for a float32 GEMM against X [n, K] instead of a float64
   one against H [K, K]; the first evaluation is checked against ``layer_loss`` itself.
   Baselines: round-to-nearest on lowbit's grid, and on the peer's grid (the peer's
   symmetric grid is absmax / 7.5 with 16 levels, lowbit's absmax / 7 with 15: compare
   each GPTQ against its own grid's RTN; ``benchmarks/peers/README.md``).

   Where lowbit's time goes, for the first shape: ``torch.linalg.cholesky`` of the damped
   H and the classic preparation (cholesky -> cholesky_inverse -> cholesky(upper), as
   the reference and the peer do it) against lowbit's whole call.

2. End to end: ``lowbit.quantize(model, "W4A16", method="gptq", calibration=ids)`` of
   SmolLM2-135M (``lowbit.models.load_smollm2``; ids from ``lowbit.data.calibration_samples``
   on Tiny Shakespeare from the shared data folder), or, with ``--random-model`` (automatic
   when the model or the text cannot be loaded), a random-init model of the same
   architecture on random token ids. Skipped while ``lowbit.api.METHODS`` lacks "gptq".
   llm-compressor's end-to-end ``oneshot`` is not timed (see the notes printed).

3. The machine's matmul rate (a square float32 GEMM, GFLOP/s), and the fraction of it the
   lowbit solve reaches on its nominal FLOPs ``N K^2 + N K B + 2 K^3 / 3`` (blocked
   updates, in-block updates, Cholesky + triangular inverse).

Timing: one warm-up call, then the median of ``--repeats`` calls; on the CPU a first call
slower than ``--max-call`` seconds is reported as measured once (no warm-up). CPU calls
with ``time.perf_counter``, CUDA calls with CUDA events (the peer: its own perf_counter
between ``torch.cuda.synchronize()`` calls). Every section fails soft: an error is
printed and recorded, and the run goes on.

    python benchmarks/bench_gptq.py --threads 2           # full CPU run (~10 minutes on 2 cores)
    python benchmarks/bench_gptq.py --quick               # 4096x4096 only
    python benchmarks/bench_gptq.py --device cuda --out /tmp/out
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import lowbit
from lowbit import ops
from lowbit._report import format_table
from lowbit.reference import gptq as ref_gptq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import _loadavg, device_description, run_info, setup_run, time_once  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHAPES = [(4096, 4096, "7B q/k/v/o"), (11008, 4096, "7B gate/up"), (4096, 11008, "7B down")]
BITS, GROUP, SYMMETRIC, DAMP, BLOCK = 4, 128, True, 0.01, 128
MIX_RANK = 32
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
               max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, head_dim=64,
               hidden_act="silu")
CALIB_TEXTS = ("text/other/tinyshakespeare_input.txt", "text/wikitext-2-raw/wiki.test.raw")


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _free(cuda: bool) -> None:
    if cuda:
        torch.cuda.empty_cache()


# -- timing ------------------------------------------------------------------------------

def measure(call, args) -> tuple[dict, object]:
    """``call() -> (seconds, result)``: one warm-up, then the median of ``--repeats`` calls.
    On the CPU a first call slower than ``--max-call`` is reported as measured once."""
    t0, res = call()
    if args.device == "cpu" and t0 > args.max_call:
        return {"median_s": t0, "min_s": t0, "repeats": 1, "warmup": 0}, res
    times = []
    for _ in range(args.repeats):
        res = None
        t, res = call()
        times.append(t)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times),
            "warmup": 1, "first_s": t0}, res


def timed(fn, cuda: bool):
    """A ``call`` for :func:`measure` that times ``fn()`` with ``time_once``."""
    def call():
        box = {}

        def run():
            box["r"] = fn()
        return time_once(run, (), cuda), box.get("r")
    return call


def gemm_rate(args) -> dict:
    """GFLOP/s of a square float32 matmul (the machine's compute ceiling for this work)."""
    cuda = args.device == "cuda"
    size = 8192 if cuda else 4096
    a = torch.randn(size, size, device=args.device)
    b = torch.randn(size, size, device=args.device)
    c = torch.empty(size, size, device=args.device)
    r, _ = measure(timed(lambda: torch.mm(a, b, out=c), cuda), args)
    del a, b, c
    flops = 2 * size ** 3
    out = {"size": size, "dtype": "float32", "median_s": r["median_s"], "repeats": r["repeats"],
           "gflops": flops / r["median_s"] / 1e9}
    if cuda:
        out["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return out


# -- inputs and quality ------------------------------------------------------------------

def activations(n: int, k: int, device: str, seed: int) -> torch.Tensor:
    """``X = Z (I + A B) diag(s)`` [n, K] float32: correlated columns of spread scales."""
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, k, device=device, generator=g)
    a = torch.randn(k, MIX_RANK, device=device, generator=g) / math.sqrt(k)
    b = torch.randn(MIX_RANK, k, device=device, generator=g) * (0.7 / math.sqrt(MIX_RANK))
    x = z + (z @ a) @ b
    x *= torch.exp(0.75 * torch.randn(k, device=device, generator=g))
    return x


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor, chunk: int = 2048) -> float:
    """``||(W - W_hat) X^T||^2 * 2/n`` = ``tr((W - W_hat) H (W - W_hat)^T)`` with H = 2/n X^T X
    (float32 GEMMs in row chunks, float64 sums)."""
    total = 0.0
    for i in range(0, w.shape[0], chunk):
        d = w[i:i + chunk].float() - w_hat[i:i + chunk].float()
        total += float((d @ x.t()).double().pow(2).sum())
    return total * 2.0 / x.shape[0]


def dequant_gidx(codes, scales, zeros, g_idx) -> torch.Tensor:
    """``w_hat[:, j] = (codes[:, j] - zeros[:, g_idx[j]]) * scales[:, g_idx[j]]``."""
    gi = g_idx.long()
    return (codes.float() - zeros[:, gi].float()) * scales[:, gi].float()


def rtn_lowbit(w) -> torch.Tensor:
    s, z = ops.quant_params(w, BITS, GROUP, SYMMETRIC)
    return ops.dequantize(ops.quantize(w, s, z, BITS, GROUP), s, z, GROUP, torch.float32)


def rtn_peer_grid(w, scale, zero_point) -> torch.Tensor:
    """Round-to-nearest on the peer's grid (its observer's scale/zero point [N, G]):
    q = clamp(round(w / s) + zp, -2^(b-1), 2^(b-1) - 1), w_hat = (q - zp) s."""
    n, k = w.shape
    s = scale.float().reshape(n, -1).repeat_interleave(GROUP, dim=1)[:, :k]
    zp = zero_point.float().reshape(n, -1).repeat_interleave(GROUP, dim=1)[:, :k]
    q = torch.clamp(torch.round(w / s) + zp, -2 ** (BITS - 1), 2 ** (BITS - 1) - 1)
    return (q - zp) * s


# -- per-layer section -------------------------------------------------------------------

def _hessian_rows(x, args) -> tuple[dict, torch.Tensor]:
    """Time lowbit's accumulate_hessian and torch's 2/n X^T X on X; return the row and H."""
    cuda = args.device == "cuda"
    n, k = x.shape
    h = torch.zeros(k, k, device=args.device)

    def lb():
        ops.accumulate_hessian(h, x, 0)
        return h
    row = {"k": k, "rows": n}
    r_lb, _ = measure(timed(lb, cuda), args)
    r_t, h_t = measure(timed(lambda: torch.mm(x.t(), x).mul_(2.0 / n), cuda), args)
    row.update(lowbit_s=r_lb["median_s"], torch_s=r_t["median_s"], lowbit_repeats=r_lb["repeats"],
               torch_repeats=r_t["repeats"], speedup=r_t["median_s"] / r_lb["median_s"],
               gflops_lowbit=2 * n * k * k / r_lb["median_s"] / 1e9,
               rel_diff_vs_torch=float((h - h_t).norm() / h_t.norm()))
    del h_t
    return row, h


def _breakdown(w, h, lowbit_s, args) -> dict:
    """Cholesky of the damped H, and the classic preparation chain, against lowbit's call."""
    cuda = args.device == "cuda"
    k = h.shape[0]
    hd = h.clone()
    hd.diagonal().add_(DAMP * hd.diagonal().mean())
    r_chol, _ = measure(timed(lambda: torch.linalg.cholesky(hd), cuda), args)

    def classic():
        L = torch.linalg.cholesky(hd)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    r_prep, _ = measure(timed(classic, cuda), args)
    del hd
    n = w.shape[0]
    chol = r_chol["median_s"]
    return {
        "shape": f"{n}x{k}", "act_order": False,
        "lowbit_total_s": lowbit_s,
        "cholesky_damped_h_s": chol,
        "cholesky_fraction_of_lowbit": chol / lowbit_s,
        "lowbit_rest_s": lowbit_s - chol,
        "classic_prep_s": r_prep["median_s"],
        "classic_prep": "cholesky(H) -> cholesky_inverse -> cholesky(upper): the reference's and the peer's "
                        "preparation (lowbit: one Cholesky of the permuted H and a recursive triangular inverse)",
        "cholesky_gflops": k ** 3 / 3 / chol / 1e9,
    }


def _nominal_flops(n: int, k: int) -> float:
    return n * k * k + n * k * BLOCK + 2 * k ** 3 / 3


def run_layers(args, gemm: dict | None) -> dict:
    cuda = args.device == "cuda"
    dev = args.device
    shapes = [s for s in SHAPES if f"{s[0]}x{s[1]}" in args.shapes]
    out = {"hessian": [], "rows": [], "breakdown": None, "errors": [], "loss_check": None}

    peer_reason = None
    peer = None
    try:
        from peers import llmcompressor_gptq as peer
        peer_reason = peer.peer_available()
    except Exception as e:   # noqa: BLE001
        peer_reason = f"peer adapter not importable: {_err(e)}"
    if peer_reason:
        print(f"peer: unavailable: {peer_reason}")
    out["peer"] = None if peer_reason else peer.peer_name()
    out["peer_unavailable"] = peer_reason

    xs: dict[int, tuple] = {}   # K -> (X, H): the same inputs for every shape with that K
    for n, k, layer in shapes:
        shape = f"{n}x{k}"
        try:
            if k not in xs:
                xs.clear()
                _free(cuda)
                x = activations(args.rows, k, dev, seed=k)
                hrow, h = _hessian_rows(x, args)
                out["hessian"].append(hrow)
                print(f"  hessian K={k}: lowbit {hrow['lowbit_s']:.3f} s, torch {hrow['torch_s']:.3f} s",
                      file=sys.stderr, flush=True)
                xs[k] = (x, h)
            x, h = xs[k]
            g = torch.Generator(device=dev).manual_seed(n * 7 + k)
            w = torch.randn(n, k, device=dev, generator=g) * 0.02
        except Exception as e:   # noqa: BLE001
            out["errors"].append(f"{shape} inputs: {_err(e)}")
            print(f"  {shape}: inputs failed: {_err(e)}", file=sys.stderr)
            traceback.print_exc()
            continue
        signal = output_error(w, torch.zeros_like(w), x)
        rel = lambda w_hat: output_error(w, w_hat, x) / signal   # noqa: E731

        rtn_err = None
        try:
            rtn_err = rel(rtn_lowbit(w))
        except Exception as e:   # noqa: BLE001
            out["errors"].append(f"{shape} rtn: {_err(e)}")
        run_ref = k <= args.reference_max_k and n <= args.reference_max_n
        for act in (False, True):
            row = {"shape": shape, "layer": layer, "act_order": act, "rtn_err": rtn_err}
            # lowbit
            try:
                r, res = measure(timed(lambda: ops.gptq_solve(w, h, BITS, GROUP, SYMMETRIC, DAMP, act,
                                                              False, BLOCK), cuda), args)
                codes, scales, zeros, g_idx, loss = res
                w_hat = dequant_gidx(codes, scales, zeros, g_idx)
                row.update(lowbit_s=r["median_s"], lowbit_min_s=r["min_s"], lowbit_repeats=r["repeats"],
                           lowbit_err=rel(w_hat), lowbit_loss=float(loss))
                if gemm:
                    row["lowbit_gflops_nominal"] = _nominal_flops(n, k) / r["median_s"] / 1e9
                    row["lowbit_fraction_of_gemm"] = row["lowbit_gflops_nominal"] / gemm["gflops"]
                if out["loss_check"] is None:   # the fast error against layer_loss itself, once
                    exact = ref_gptq.layer_loss(w, w_hat, h) / ref_gptq.layer_loss(w, torch.zeros_like(w), h)
                    out["loss_check"] = {"shape": shape, "fast": row["lowbit_err"], "layer_loss": exact,
                                         "rel_diff": abs(row["lowbit_err"] - exact) / exact}
                del codes, scales, zeros, g_idx, w_hat, res
            except Exception as e:   # noqa: BLE001
                row["lowbit_note"] = _err(e)
                print(f"  {shape} lowbit failed: {_err(e)}", file=sys.stderr)
            _free(cuda)
            # reference
            if not run_ref:
                row["reference_note"] = (f"skipped (K > --reference-max-k {args.reference_max_k} "
                                         f"or N > --reference-max-n {args.reference_max_n})")
            else:
                try:
                    r, res = measure(timed(lambda: ref_gptq.gptq_solve(
                        w, h, BITS, GROUP, SYMMETRIC, damp=DAMP, act_order=act, block_size=BLOCK), cuda), args)
                    codes, scales, zeros, g_idx, _ = res
                    row.update(reference_s=r["median_s"], reference_repeats=r["repeats"],
                               reference_err=rel(dequant_gidx(codes.to(dev), scales.to(dev), zeros.to(dev),
                                                              g_idx.to(dev))))
                    del res, codes, scales, zeros, g_idx
                except Exception as e:   # noqa: BLE001
                    row["reference_note"] = _err(e)
                    print(f"  {shape} reference failed: {_err(e)}", file=sys.stderr)
            # peer
            if peer_reason:
                row["peer_note"] = "unavailable"
            else:
                try:
                    def peer_call():
                        res = peer.run_peer_gptq(w, h, BITS, GROUP, SYMMETRIC, act, block_size=BLOCK, damp=DAMP)
                        return res["seconds"], res
                    r, res = measure(peer_call, args)
                    row.update(peer_s=r["median_s"], peer_repeats=r["repeats"], peer_first_s=r.get("first_s"),
                               peer_err=rel(res["w_hat"]), peer_backend=res["backend"],
                               peer_rtn_fallback=res["rtn_fallback"])
                    try:
                        row["rtn_peer_grid_err"] = rel(rtn_peer_grid(w, res["scale"], res["zero_point"]))
                    except Exception as e:   # noqa: BLE001
                        row["rtn_peer_grid_note"] = _err(e)
                    del res
                except Exception as e:   # noqa: BLE001
                    row["peer_note"] = _err(e)
                    print(f"  {shape} peer failed: {_err(e)}", file=sys.stderr)
            _free(cuda)
            lb = row.get("lowbit_s")
            row["vs_reference"] = row["reference_s"] / lb if lb and row.get("reference_s") else None
            row["vs_peer"] = row["peer_s"] / lb if lb and row.get("peer_s") else None
            out["rows"].append(row)
            print(f"  {shape} act_order={act}: lowbit {_fmt(row.get('lowbit_s'))} s, "
                  f"reference {_fmt(row.get('reference_s'))} s, peer {_fmt(row.get('peer_s'))} s",
                  file=sys.stderr, flush=True)
        if out["breakdown"] is None and out["rows"] and out["rows"][-2].get("lowbit_s"):
            try:
                out["breakdown"] = _breakdown(w, h, out["rows"][-2]["lowbit_s"], args)
            except Exception as e:   # noqa: BLE001
                out["breakdown"] = {"error": _err(e)}
        del w
        _free(cuda)
    xs.clear()
    return out


# -- end to end --------------------------------------------------------------------------

def _random_smollm2(args):
    import transformers
    cfg = transformers.LlamaConfig(**SMOLLM2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (args.calib_samples, args.calib_seqlen), generator=g)
    return model, ids


def end_to_end(args) -> dict:
    res = {"config": "W4A16", "method": "gptq", "calib_samples": args.calib_samples,
           "calib_seqlen": args.calib_seqlen}
    if "gptq" not in getattr(lowbit.api, "METHODS", ()):
        res["skipped"] = "gptq not in lowbit.quantize yet"
        print("end-to-end: skipped: gptq not in lowbit.quantize yet")
        return res
    model = ids = None
    if not args.random_model:
        try:
            from lowbit.data import calibration_samples, shared_data_dir
            from lowbit.models import load_smollm2
            root = shared_data_dir()
            text = next((root / p for p in CALIB_TEXTS if (root / p).is_file()), None)
            if text is None:
                raise FileNotFoundError(f"no calibration text under {root} ({', '.join(CALIB_TEXTS)})")
            model, tok = load_smollm2()
            ids = calibration_samples(tok, text, args.calib_samples, args.calib_seqlen, seed=0)
            res.update(model="SmolLM2-135M-Instruct (lowbit.models.load_smollm2)", random_model=False,
                       calibration_text=str(text.relative_to(root)))
        except Exception as e:   # noqa: BLE001
            print(f"end-to-end: real SmolLM2 unavailable ({_err(e)}); using a random-init model")
            res["random_model_reason"] = _err(e)
            model = None
    if model is None:
        model, ids = _random_smollm2(args)
        res.update(model="random-init LlamaForCausalLM with SmolLM2-135M's architecture", random_model=True,
                   calibration_text="random token ids")
    res["parameters"] = sum(p.numel() for p in model.parameters())
    cuda = args.device == "cuda"
    model.to(args.device)
    ids = ids.to(args.device)
    kwargs = {}
    if "progress" in inspect.signature(lowbit.quantize).parameters:
        kwargs["progress"] = False
    _sync(cuda)
    t0 = time.perf_counter()
    report = lowbit.quantize(model, "W4A16", method="gptq", calibration=ids, **kwargs)
    _sync(cuda)
    res["seconds"] = time.perf_counter() - t0
    try:
        res["layers"] = len(report.layers)
        res["report_seconds"] = report.seconds
        res["summary"] = report.summary()
        print(f"end-to-end: {res['summary']}")
    except Exception as e:   # noqa: BLE001
        res["report_note"] = _err(e)
    res["peer"] = ("not timed: llm-compressor's end-to-end path (oneshot + its calibration pipeline) needs "
                   "the full package (datasets, pyarrow, ...), which the peer install deliberately omits")
    del model
    _free(cuda)
    return res


# -- report ------------------------------------------------------------------------------

def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="4096x4096 only")
    p.add_argument("--shapes", default=None,
                   help="comma-separated NxK of " + ", ".join(f"{n}x{k}" for n, k, _ in SHAPES) + " (default all)")
    p.add_argument("--rows", type=int, default=2048, help="activation rows n behind the Hessian (default 2048)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls after one warm-up (default 3; 2 on cuda)")
    p.add_argument("--max-call", type=float, default=10.0,
                   help="CPU: a first call slower than this many seconds is reported as measured once")
    p.add_argument("--reference-max-k", type=int, default=None,
                   help="run the reference only for K <= this (default 4096 on cpu, 0 = never on cuda)")
    p.add_argument("--reference-max-n", type=int, default=4096, help="... and N <= this (default 4096)")
    p.add_argument("--end-to-end", action=argparse.BooleanOptionalAction, default=True,
                   help="time lowbit.quantize(method='gptq') on SmolLM2-135M (default on)")
    p.add_argument("--random-model", action="store_true",
                   help="end-to-end on a random-init SmolLM2-135M-shaped model and random ids")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="folder for bench_gptq_<device>.json (default benchmarks/results/)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.device == "cuda" else 3
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.reference_max_k is None:
        args.reference_max_k = 4096 if args.device == "cpu" else 0
    known = [f"{n}x{k}" for n, k, _ in SHAPES]
    if args.shapes is None:
        args.shapes = known[:1] if args.quick else known
    else:
        args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        bad = [s for s in args.shapes if s not in known]
        if bad:
            p.error(f"--shapes: unknown {bad}; choose from {known}")
    return args


NOTES = [
    "error = tr((W - W_hat) H (W - W_hat)^T) / tr(W H W^T), H = 2/n X^T X (undamped), on the benchmark's X",
    "lowbit and reference: 4-bit g128 symmetric grid absmax/7 (15 levels); group scales taken when the "
    "sweep reaches the group (act-order: groups are runs of the processing order, g_idx)",
    "peer (llm-compressor): its symmetric grid is absmax/7.5 with 16 levels (more levels: its RTN is lower "
    "than ours), and its scales are fixed from the original weight before GPTQ; compare each GPTQ with "
    "its own grid's RTN (RTN err / RTN err peer grid)",
    "times include dampening, act-order permutation and the Cholesky/inverse of H for all three; "
    "the peer's untimed observer (qparams) is excluded",
]


def main(argv=None) -> int:
    args = parse_args(argv)
    desc = setup_run("bench_gptq", args)
    if desc is None:
        return 2
    t_start = time.perf_counter()
    load_before = _loadavg()
    result = {"benchmark": "bench_gptq", **run_info(args.device, desc),
              "settings": {"shapes": args.shapes, "rows": args.rows, "bits": BITS, "group_size": GROUP,
                           "symmetric": SYMMETRIC, "damp": DAMP, "block_size": BLOCK, "repeats": args.repeats,
                           "max_call_s": args.max_call, "reference_max_k": args.reference_max_k,
                           "reference_max_n": args.reference_max_n, "mix_rank": MIX_RANK,
                           "activations": "X = Z (I + A B) diag(exp(0.75 randn(K))), Z/A/B Gaussian, A [K, 32]"},
              "notes": NOTES}

    gemm = None
    try:
        gemm = gemm_rate(args)
        print(f"matmul: {gemm['gflops']:.0f} GFLOP/s (float32 {gemm['size']}^3)\n")
    except Exception as e:   # noqa: BLE001
        print(f"matmul rate failed: {_err(e)}")
        result["gemm_error"] = _err(e)
    result["gemm"] = gemm

    layers = None
    try:
        layers = run_layers(args, gemm)
    except Exception as e:   # noqa: BLE001
        traceback.print_exc()
        result["layers_error"] = _err(e)
    if layers:
        result.update(layers)
        rows = layers["rows"]
        peer_label = "peer s"
        table = format_table(
            ["shape", "act", "lowbit s", "ref s", peer_label, "vs ref", "vs peer", "err lowbit", "err ref",
             "err peer", "RTN err", "RTN err peer grid"],
            [[r["shape"], "yes" if r["act_order"] else "no", _fmt(r.get("lowbit_s")),
              _fmt(r.get("reference_s")) if "reference_s" in r else ("skipped" if "skipped" in
                                                                       r.get("reference_note", "") else "error"),
              _fmt(r.get("peer_s")) if "peer_s" in r else r.get("peer_note", "-")[:12],
              _fmt(r.get("vs_reference"), ".1f") + "x" if r.get("vs_reference") else "-",
              _fmt(r.get("vs_peer"), ".2f") + "x" if r.get("vs_peer") else "-",
              _pct(r.get("lowbit_err")), _pct(r.get("reference_err")), _pct(r.get("peer_err")),
              _pct(r.get("rtn_err")), _pct(r.get("rtn_peer_grid_err"))] for r in rows],
            right=set(range(2, 12)))
        print("\nGPTQ solve of one layer, 4-bit g128 symmetric, block 128, damp 0.01 "
              f"(median of {args.repeats} after 1 warm-up; CPU calls over {args.max_call:g} s measured once)")
        print(table)
        if layers.get("peer"):
            print(f"peer: {layers['peer']} ({', '.join(sorted({r.get('peer_backend', '?') for r in rows}))})")
        for h in layers["hessian"]:
            print(f"accumulate_hessian K={h['k']} n={h['rows']}: lowbit {h['lowbit_s']:.3f} s "
                  f"({h['gflops_lowbit']:.0f} GFLOP/s), torch 2/n X^T X {h['torch_s']:.3f} s, "
                  f"{h['speedup']:.2f}x, rel diff {h['rel_diff_vs_torch']:.1e}")
        b = layers.get("breakdown")
        if b and "error" not in b:
            print(f"where lowbit's time goes ({b['shape']}, no act-order): {b['lowbit_total_s']:.3f} s total; "
                  f"Cholesky of damped H {b['cholesky_damped_h_s']:.3f} s "
                  f"({100 * b['cholesky_fraction_of_lowbit']:.0f}%), the rest {b['lowbit_rest_s']:.3f} s; "
                  f"classic prep (chol -> chol_inverse -> chol upper) {b['classic_prep_s']:.3f} s")
        if gemm:
            fr = [f"{r['shape']}{' act' if r['act_order'] else ''} {100 * r['lowbit_fraction_of_gemm']:.0f}%"
                  for r in rows if r.get("lowbit_fraction_of_gemm")]
            print("lowbit nominal FLOPs (N K^2 + N K B + 2K^3/3) / time, of the matmul rate: " + ", ".join(fr))
        if layers.get("loss_check"):
            c = layers["loss_check"]
            print(f"error check vs layer_loss ({c['shape']}): rel diff {c['rel_diff']:.1e}")
        for e in layers["errors"]:
            print(f"error: {e}")
        print("\nnotes:\n" + "\n".join(f"* {n}" for n in NOTES))
        if layers.get("peer_unavailable"):
            print(f"* peer unavailable: {layers['peer_unavailable']}")

    if args.end_to_end:
        print()
        try:
            result["end_to_end"] = end_to_end(args)
            e2e = result["end_to_end"]
            if "seconds" in e2e:
                print(f"end-to-end GPTQ W4A16 of {e2e['model']} ({e2e['calib_samples']} x {e2e['calib_seqlen']} "
                      f"tokens, {e2e['calibration_text']}): {e2e['seconds']:.1f} s")
                print(f"peer end-to-end: {e2e['peer']}")
        except Exception as e:   # noqa: BLE001
            traceback.print_exc()
            result["end_to_end"] = {"error": _err(e)}
            print(f"end-to-end failed: {_err(e)}")

    elapsed = time.perf_counter() - t_start
    result["loadavg_1min"] = {"start": load_before, "end": _loadavg()}
    result["elapsed_s"] = round(elapsed, 1)
    out = args.out / f"bench_gptq_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out)
    print(f"\nwrote {out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
