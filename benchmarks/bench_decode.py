#!/usr/bin/env python
"""End-to-end greedy decoding of a Llama-3-8B-shaped model: bf16 vs lowbit W4A16 in place.

A ``LlamaForCausalLM`` with Llama-3-8B's shapes (hidden 4096, intermediate 14336, 32
layers, 32 heads, 8 KV heads, vocab 128256, RoPE theta 500000) is built on the meta
device from a transformers ``LlamaConfig`` and materialised on the GPU with ``to_empty``
and in-place random weights (normal, std 0.02; norms 1; bfloat16): no download, no 16 GB
of host memory. The same model is then measured in up to three phases, in one run:

* ``bf16``: the model as built;
* ``w4a16``: after ``lowbit.quantize(model, "W4A16", method="rtn")`` in place (group
  128, symmetric; RTN needs no calibration; ``lm_head`` stays bf16, the preset's default)
  : ``QuantLinear`` on ``ops.weight_only_matmul``;
* ``w4a16-mma``: after ``lowbit.nn.pack_mma(model, torch.bfloat16)`` (each eligible
  ``QuantLinear`` re-laid for ``ops.mma_matmul``, scales in bfloat16), when this lowbit
  has it.

For each phase and batch size B (``--batches``, default 1 and 16): a prompt of
``--prompt`` random tokens is prefilled into a transformers ``StaticCache``, then
``--steps`` greedy decode steps (one token per sequence per step, argmax in the step)
are timed: tokens/s = B * steps / time.

* eager: the step called from Python (HF's eager module code; at batch 1 this is bound by
  the host's launch overhead, which hides kernel speed);
* graph: the same step (fixed input buffers for the token, the position and the cache
  position, all advanced inside the step) captured once in a ``torch.cuda.CUDAGraph``
  and replayed ``--steps`` times, timed with CUDA events; ``--repeats`` such runs. If
  the capture fails the error is recorded and the graph columns are empty. The graph's
  tokens are checked against the eager run's (same prompt, same number of steps before).

Per phase the JSON also has the model's bytes (parameters + buffers), the peak GPU
memory (``torch.cuda.max_memory_allocated``, reset at the start of each phase), the time
of each step of the run (build, quantize, pack), and the relative error of the prefill's
last logits against the bf16 model's (and of ``w4a16-mma`` against ``w4a16``, the same
weights on another kernel).

    python benchmarks/bench_decode.py                        # full 32-layer run on CUDA (< 2 min)
    python benchmarks/bench_decode.py --layers 4 --steps 16  # quicker
    python benchmarks/bench_decode.py --device cpu --tiny    # CPU smoke test (2 layers, hidden 256)
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import lowbit  # noqa: E402
from lowbit._report import format_table  # noqa: E402
from lowbit.api import model_bytes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import _loadavg, run_info, setup_run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5)
# A tiny model whose linears the mma layout holds (N % 64, K % 16, K % 128 for group 128).
TINY = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, rope_theta=500000.0, max_position_embeddings=1024,
            rms_norm_eps=1e-5)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- the model -----------------------------------------------------------------------------

def build_config(shape: dict, layers: int):
    """A LlamaConfig (RoPE theta set whichever way this transformers takes it: v5's
    ``rope_parameters`` or v4's ``rope_theta``; checked in :func:`build_model`)."""
    from transformers import LlamaConfig

    common = {k: v for k, v in shape.items() if k != "rope_theta"}
    common.update(num_hidden_layers=layers, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    theta = shape["rope_theta"]
    try:
        config = LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": theta})
    except TypeError:
        config = LlamaConfig(**common, rope_theta=theta)
    if not isinstance(getattr(config, "rope_parameters", None), dict):
        config.rope_theta = theta     # v4: rope_parameters was kept as an unused attribute
    return config


def _fresh_rotary(model, config, device):
    """The rotary embedding rebuilt on the host and moved to ``device`` (``to_empty`` leaves
    its ``inv_freq`` buffer uninitialised)."""
    old = model.model.rotary_emb
    with torch.device("cpu"):
        new = type(old)(config=config)
    return new.to(device)


@torch.no_grad()
def build_model(config, device: str, dtype: torch.dtype):
    """LlamaForCausalLM on the meta device, materialised on ``device`` with random weights."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)                    # RMSNorm weights
        else:
            p.normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = _fresh_rotary(model, config, device)
    others = [n for n, _ in model.named_buffers() if not n.startswith("model.rotary_emb.")]
    if others:
        raise RuntimeError(f"bench_decode: buffers {others} are left uninitialised by to_empty; "
                           "initialise them in build_model")
    model.eval()
    # RoPE theta as the model computes it (the first inverse frequency after 1 is theta^(-2/d)).
    inv = model.model.rotary_emb.inv_freq.double().cpu()
    d = 2 * inv.numel()
    theta_used = float(inv[1] ** (-d / 2)) if inv.numel() > 1 else None
    return model, theta_used


# -- decoding ------------------------------------------------------------------------------

class Api:
    """What this transformers' LlamaForCausalLM.forward calls things."""

    def __init__(self, model):
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.cache_position = "cache_position" in params
        self.logits_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    def kwargs(self, ids, pos, cpos, cache) -> dict:
        kw = {"input_ids": ids, "position_ids": pos, self.cache_kw: cache, "use_cache": True}
        if self.cache_position:
            kw["cache_position"] = cpos
        if self.logits_kw:
            kw[self.logits_kw] = 1
        return kw


def make_cache(config, batch: int, max_len: int, device: str, dtype: torch.dtype):
    """A StaticCache, trying the constructor signatures of transformers v5 and v4."""
    from transformers import StaticCache

    tries = [
        dict(config=config, max_cache_len=max_len),                                         # v5
        dict(config=config, max_batch_size=batch, max_cache_len=max_len, device=device, dtype=dtype),  # 4.4x
        dict(config=config, batch_size=batch, max_cache_len=max_len, device=device, dtype=dtype),      # older
    ]
    errors = []
    for kw in tries:
        try:
            return StaticCache(**kw), "StaticCache(" + ", ".join(k for k in kw if k != "config") + ")"
        except (TypeError, ValueError) as e:
            errors.append(_first_line(e))
    # No StaticCache this way: eager decoding still runs on a DynamicCache (no graph).
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=config)
    except TypeError:
        cache = DynamicCache()
    return cache, "DynamicCache (no StaticCache signature worked: " + " | ".join(errors) + ")"


class Decoder:
    """Greedy decoding of ``batch`` sequences from fixed buffers (graph-capturable step)."""

    def __init__(self, model, api: Api, config, batch: int, max_len: int, device: str, dtype: torch.dtype):
        self.model, self.api, self.device = model, api, device
        self.cache, self.cache_args = make_cache(config, batch, max_len, device, dtype)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.cpos = torch.zeros(1, dtype=torch.long, device=device)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Fills the cache with ``prompt`` [B, P]; the first greedy token goes to ``ids``.
        Returns the last position's logits (float32 [B, V])."""
        p = prompt.shape[1]
        pos = torch.arange(p, device=self.device)
        out = self.model(**self.api.kwargs(prompt, pos[None], pos, self.cache))
        logits = out.logits[:, -1].float()
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.pos.fill_(p)
        self.cpos.fill_(p)
        return logits

    @torch.no_grad()
    def step(self) -> None:
        """One decode step in place: ids <- argmax(model(ids)), positions + 1."""
        out = self.model(**self.api.kwargs(self.ids, self.pos, self.cpos, self.cache))
        self.ids.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.pos.add_(1)
        self.cpos.add_(1)


def _eager(dec: Decoder, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        dec.step()
    toks = torch.empty(steps, dec.ids.shape[0], dtype=torch.long, device=dec.device)
    _sync(dec.device)
    t0 = time.perf_counter()
    for i in range(steps):
        dec.step()
        toks[i].copy_(dec.ids[:, 0])
    _sync(dec.device)
    return {"seconds": time.perf_counter() - t0, "tokens": toks}


def _graph(dec: Decoder, steps: int, warmup: int, repeats: int) -> dict:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            dec.step()
    torch.cuda.current_stream().wait_stream(side)
    t0 = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec.step()
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - t0
    toks = torch.empty(steps, dec.ids.shape[0], dtype=torch.long, device=dec.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runs = []
    for r in range(repeats):
        torch.cuda.synchronize()
        start.record()
        for i in range(steps):
            graph.replay()
            if r == 0:
                toks[i].copy_(dec.ids[:, 0])
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / 1e3)
    del graph
    return {"seconds": min(runs), "runs_s": runs, "capture_s": capture_s, "tokens": toks}


def measure_phase(model, config, name: str, args, dtype: torch.dtype, ref_logits: dict) -> dict:
    """Decode at every batch size: eager, then graph (CUDA). Returns the phase's results."""
    dev = args.device
    api = Api(model)
    res = {"phase": name, "weight_bytes": model_bytes(model), "batches": {}}
    max_len = args.prompt + args.warmup + args.steps * max(args.repeats, 1) + 8
    for b in args.batches:
        gen = torch.Generator(device="cpu").manual_seed(1000 + b)
        prompt = torch.randint(0, config.vocab_size, (b, args.prompt), generator=gen).to(dev)
        r: dict = {"batch": b}
        dec = Decoder(model, api, config, b, max_len, dev, dtype)
        r["cache_args"] = dec.cache_args
        _sync(dev)
        t0 = time.perf_counter()
        logits = dec.prefill(prompt)
        _sync(dev)
        r["prefill_first_s"] = time.perf_counter() - t0
        ref_logits.setdefault(name, {})[b] = logits
        e = _eager(dec, args.steps, args.warmup)
        r["eager_tok_s"] = b * args.steps / e["seconds"]
        r["eager_ms_per_step"] = e["seconds"] / args.steps * 1e3
        del dec
        if dev == "cuda" and not args.no_graph and r["cache_args"].startswith("DynamicCache"):
            r["graph_error"] = "no StaticCache (a CUDA graph needs fixed cache buffers)"
        elif dev == "cuda" and not args.no_graph:
            dec = Decoder(model, api, config, b, max_len, dev, dtype)
            _sync(dev)
            t0 = time.perf_counter()
            dec.prefill(prompt)
            _sync(dev)
            r["prefill_s"] = time.perf_counter() - t0   # warm (the eager run's was the first)
            try:
                g = _graph(dec, args.steps, args.warmup, args.repeats)
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
                r["graph_error"] = f"{type(err).__name__}: {_first_line(err)}"
                torch.cuda.synchronize()
            else:
                r["graph_tok_s"] = b * args.steps / g["seconds"]
                r["graph_ms_per_step"] = g["seconds"] / args.steps * 1e3
                r["graph_runs_ms_per_step"] = [s / args.steps * 1e3 for s in g["runs_s"]]
                r["graph_capture_s"] = g["capture_s"]
                same = (g["tokens"] == e["tokens"]).float().mean().item()
                r["graph_tokens_match_eager"] = same
            del dec
        elif dev == "cuda":
            r["graph_error"] = "--no-graph"
        else:
            r["graph_error"] = "CUDA graphs need --device cuda"
        res["batches"][str(b)] = r
        print(f"  {name} B={b}: eager {r['eager_tok_s']:.1f} tok/s"
              + (f", graph {r['graph_tok_s']:.1f} tok/s" if "graph_tok_s" in r else
                 f", graph: {r.get('graph_error')}"), file=sys.stderr, flush=True)
    return res


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


# -- main ----------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny Llama (2 layers, hidden 256, vocab 1024) for a smoke run; --layers is ignored")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (default 32, Llama-3-8B)")
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16],
                   help="batch sizes, comma-separated (default 1,16)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per run (default 32)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="timed graph runs (default 2; the fastest is reported)")
    p.add_argument("--scheme", default="W4A16", help="lowbit preset for the quantized phases (default W4A16)")
    p.add_argument("--no-graph", action="store_true", help="eager decoding only")
    p.add_argument("--no-quant", action="store_true", help="the bf16 phase only")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/bench_decode_<device>.json)")
    args = p.parse_args(argv)
    if args.layers < 1 or args.steps < 1 or args.prompt < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--layers, --steps, --prompt and --repeats must be >= 1, --warmup >= 0")
    if any(b < 1 for b in args.batches):
        p.error("--batches takes positive batch sizes")
    if args.tiny:
        args.layers = TINY["num_hidden_layers"]
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / f"bench_decode_{args.device}.json"
    return args


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    desc = setup_run("bench_decode", args)
    if desc is None:
        return 2
    import transformers
    transformers.logging.set_verbosity_error()
    t_start = time.perf_counter()
    load_before = _loadavg()
    dev, dtype = args.device, torch.bfloat16
    cuda = dev == "cuda"
    timings: dict = {}
    notes: list = []

    def peak_reset():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak():
        return torch.cuda.max_memory_allocated() if cuda else None

    peak_reset()
    t0 = time.perf_counter()
    config = build_config(TINY if args.tiny else LLAMA3_8B, args.layers)
    model, theta = build_model(config, dev, dtype)
    _sync(dev)
    timings["build_s"] = time.perf_counter() - t0
    want = (TINY if args.tiny else LLAMA3_8B)["rope_theta"]
    if theta is None or abs(theta / want - 1) > 1e-3:
        notes.append(f"RoPE theta in use is {theta}, not {want}: this transformers ignored the setting")
    print(f"model: {'tiny ' if args.tiny else ''}Llama, {args.layers} layers, {model_bytes(model) / 2**30:.2f} GiB "
          f"bf16, built in {timings['build_s']:.1f} s (RoPE theta {theta:.0f}); transformers "
          f"{transformers.__version__}", flush=True)

    ref_logits: dict = {}
    phases = []
    t0 = time.perf_counter()
    ph = measure_phase(model, config, "bf16", args, dtype, ref_logits)
    ph["peak_bytes"] = peak()
    timings["bf16_decode_s"] = time.perf_counter() - t0
    phases.append(ph)

    if not args.no_quant:
        peak_reset()
        _sync(dev)
        t0 = time.perf_counter()
        report = lowbit.quantize(model, args.scheme, method="rtn", progress=False)
        _sync(dev)
        timings["quantize_s"] = time.perf_counter() - t0
        if cuda:
            torch.cuda.empty_cache()
        print(f"lowbit.quantize ({args.scheme}, rtn): {len(report.layers)} layers in {timings['quantize_s']:.1f} s; "
              f"model {report.model_bytes_before / 2**30:.2f} -> {report.model_bytes_after / 2**30:.2f} GiB",
              flush=True)
        quant_peak = peak()
        peak_reset()
        t0 = time.perf_counter()
        ph = measure_phase(model, config, "w4a16", args, dtype, ref_logits)
        ph["peak_bytes"] = peak()
        ph["quantize_peak_bytes"] = quant_peak
        ph["layers_quantized"] = len(report.layers)
        ph["min_weight_sqnr_db"] = report.min_weight_sqnr_db
        timings["w4a16_decode_s"] = time.perf_counter() - t0
        phases.append(ph)

        pack = getattr(lowbit.nn, "pack_mma", None)
        if pack is None:
            notes.append("lowbit.nn.pack_mma is not in this lowbit: the w4a16-mma phase is skipped")
        else:
            peak_reset()
            _sync(dev)
            t0 = time.perf_counter()
            try:
                # Scales stored in the activations' dtype, where this lowbit takes one.
                takes_dtype = "dtype" in inspect.signature(pack).parameters
                n_packed = pack(model, dtype) if takes_dtype else pack(model)
            except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
                n_packed = None
                notes.append(f"lowbit.nn.pack_mma failed: {type(e).__name__}: {_first_line(e)}")
            _sync(dev)
            timings["pack_mma_s"] = time.perf_counter() - t0
            if n_packed is not None:
                if cuda:
                    torch.cuda.empty_cache()
                print(f"lowbit.nn.pack_mma: {n_packed} layers in {timings['pack_mma_s']:.1f} s", flush=True)
                t0 = time.perf_counter()
                ph = measure_phase(model, config, "w4a16-mma", args, dtype, ref_logits)
                ph["peak_bytes"] = peak()
                ph["layers_packed"] = n_packed
                timings["w4a16_mma_decode_s"] = time.perf_counter() - t0
                phases.append(ph)

    # Prefill logits against the bf16 model's (and mma against the GEMV path: same weights).
    for ph in phases:
        for b, lg in ref_logits.get(ph["phase"], {}).items():
            r = ph["batches"][str(b)]
            r["logits_rel_err_vs_bf16"] = _rel(lg, ref_logits["bf16"][b])
            if ph["phase"] == "w4a16-mma" and "w4a16" in ref_logits:
                r["logits_rel_err_vs_w4a16"] = _rel(lg, ref_logits["w4a16"][b])

    base = {b: phases[0]["batches"][str(b)] for b in args.batches}
    table_rows = []
    for ph in phases:
        for b in args.batches:
            r = ph["batches"][str(b)]
            for mode in ("eager", "graph"):
                v, v0 = r.get(f"{mode}_tok_s"), base[b].get(f"{mode}_tok_s")
                r[f"{mode}_vs_bf16"] = None if v is None or not v0 else v / v0
            table_rows.append([
                ph["phase"], b, f"{r['eager_tok_s']:.1f}", f"{r['eager_ms_per_step']:.2f}",
                "-" if r.get("graph_tok_s") is None else f"{r['graph_tok_s']:.1f}",
                "-" if r.get("graph_ms_per_step") is None else f"{r['graph_ms_per_step']:.2f}",
                "-" if r.get("graph_vs_bf16") is None else f"{r['graph_vs_bf16']:.2f}x",
                "-" if r.get("eager_vs_bf16") is None else f"{r['eager_vs_bf16']:.2f}x",
                _gib(ph["weight_bytes"]), _gib(ph.get("peak_bytes")),
                f"{r['logits_rel_err_vs_bf16']:.1e}" if "logits_rel_err_vs_bf16" in r else "-"])
    print(format_table(["phase", "B", "eager tok/s", "eager ms/step", "graph tok/s", "graph ms/step",
                        "graph vs bf16", "eager vs bf16", "weights GiB", "peak GiB", "logits err"],
                       table_rows, right=set(range(1, 11))))
    errs = sorted({f"{ph['phase']} B={b}: {r['graph_error']}" for ph in phases
                   for b, r in ph["batches"].items() if r.get("graph_error")})
    if not cuda or args.no_graph:
        errs = ["CUDA graphs need --device cuda" if not cuda else "--no-graph"]
    mism = [f"{ph['phase']} B={b}: {r['graph_tokens_match_eager']:.2f}" for ph in phases
            for b, r in ph["batches"].items() if r.get("graph_tokens_match_eager", 1.0) < 1.0]
    for line in [*(f"graph not measured: {e}" for e in errs), *notes,
                 *(f"graph tokens differ from eager (fraction equal): {m}" for m in mism)]:
        print("note: " + line)
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    elapsed = time.perf_counter() - t_start

    result = {
        "benchmark": "bench_decode",
        **run_info(dev, desc),
        "transformers_version": transformers.__version__,
        "settings": {"tiny": args.tiny, "layers": args.layers, "batches": args.batches, "prompt": args.prompt,
                     "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "scheme": args.scheme,
                     "method": "rtn", "dtype": "bfloat16", "graph": cuda and not args.no_graph,
                     "cache": "transformers StaticCache, max_cache_len = prompt + warmup + steps * repeats + 8"},
        "model": {k: getattr(config, k, None) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings", "rms_norm_eps")} | {"rope_theta_in_use": theta},
        "formula": "tok/s = batch * steps / seconds of the timed steps (eager: host clock after synchronize; "
                   "graph: CUDA events around the replays, fastest of --repeats runs); vs_bf16 = tok/s / bf16 tok/s",
        "loadavg_1min": {"start": load_before, "end": _loadavg()},
        "elapsed_s": round(elapsed, 1),
        "timings_s": timings,
        "notes": [*errs, *notes],
        "phases": phases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
