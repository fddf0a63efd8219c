"""``python -m lowbit``: quantize a model and compare it with its full-precision baseline.

    python -m lowbit quantize --model smollm2 --scheme W4A16 --layers
    python -m lowbit eval --model smollm2 --scheme W8A16 W4A16 --max-windows 8
    python -m lowbit eval --model minilm --scheme W4A16-g32

Models are the offline ones of :mod:`lowbit.models` (``stories260k``, ``smollm2``,
``minilm``) or a local Hugging Face folder. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import data
from . import eval as lbeval
from ._report import format_table
from .algorithms.awq import AWQ
from .algorithms.gptq import GPTQ
from .algorithms.smoothquant import SmoothQuant
from .api import METHODS, QuantReport, model_bytes, quantize
from .config import PRESETS, QuantConfig

__all__ = ["main", "compare", "Row"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXTS = ("wikitext2", "tinystories")


@dataclass
class Row:
    """One model variant measured: the baseline (``scheme == "fp"``) or a quantized one."""

    scheme: str
    metric: str          # "perplexity" (causal LMs) or "cosine" (encoders: mean embedding cosine vs baseline)
    value: float
    model_bytes: int
    decode_tok_s: float | None
    quantize_s: float | None
    min_weight_sqnr_db: float | None


def _load(name: str, dtype: torch.dtype):
    from . import models

    if name.lower() in models.MODELS:
        spec = models.MODELS[name.lower()]
        model, tok = models.load_model(name, dtype=dtype)
        return model, tok, spec.kind
    path = Path(name)
    if not path.is_dir():
        raise SystemExit(f"lowbit: unknown model {name!r}: use one of {', '.join(models.MODELS)} "
                         "or a local Hugging Face model folder")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    cfg = transformers.AutoConfig.from_pretrained(str(path))
    if getattr(cfg, "is_encoder_decoder", False) or not any(a.endswith("ForCausalLM") for a in cfg.architectures or []):
        model, kind = transformers.AutoModel.from_pretrained(str(path)), "encoder"
    else:
        model, kind = transformers.AutoModelForCausalLM.from_pretrained(str(path)), "causal-lm"
    return model.to(dtype).eval(), tok, kind


def _text(source: str) -> str:
    root = data.shared_data_dir()
    if source == "wikitext2":
        return data.wikitext2_test_text(root / "text" / "wikitext-2-raw" / "wiki.test.raw")
    if source == "tinystories":
        return data.read_text(root / "text" / "other" / "tinystories_sample_30k.txt")
    return data.read_text(source)


def _calibration_text(eval_source: str) -> str:
    # Never calibrate on the text being scored: WikiText-2's validation split for its test split.
    root = data.shared_data_dir()
    if eval_source == "wikitext2":
        return data.read_text(root / "text" / "wikitext-2" / "valid.txt")
    return data.read_text(root / "text" / "other" / "tinyshakespeare_input.txt")


@torch.no_grad()
def decode_tokens_per_s(model, tokenizer, new_tokens: int = 32, prompt: str = "Once upon a time") -> float:
    """Greedy decode speed (tokens/s, batch 1) through ``model.generate``, after a warm-up."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = dict(do_sample=False, pad_token_id=pad)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def compare(
    model_name: str,
    schemes: list[str],
    *,
    method: str | GPTQ = "rtn",
    text: str = "wikitext2",
    seqlen: int | None = None,
    max_windows: int | None = None,
    decode_tokens: int = 32,
    sentences: int = 512,
    dtype: torch.dtype = torch.float32,
    calibration_samples: int = 8,
    progress: bool = True,
) -> tuple[list[Row], dict[str, QuantReport]]:
    """Baseline and each scheme of ``schemes`` on one model, measured the same way.

    Causal LMs: perplexity on ``text`` (GPTQ/AWQ protocol), model bytes, greedy decode
    tokens/s. Encoders: mean cosine between baseline and quantized sentence embeddings
    over ``sentences`` real sentences. Layer output SQNR in the reports uses
    ``calibration_samples`` windows of a text disjoint from the evaluation text.
    """
    t0 = time.perf_counter()
    model, tok, kind = _load(model_name, dtype)
    log.info("loaded %s (%s) in %.1f s", model_name, kind, time.perf_counter() - t0)
    rows: list[Row] = []
    reports: dict[str, QuantReport] = {}
    if kind == "causal-lm":
        eval_text = _text(text)
        ids = tok(eval_text, return_tensors="pt").input_ids
        calib_len = min(512, seqlen or lbeval.model_context(model) or 512)
        calib = (data.calibration_samples(tok, [_calibration_text(text)], calibration_samples, calib_len, seed=0)
                 if calibration_samples > 0 else None)

        def measure(m):
            ppl = lbeval.perplexity(m, input_ids=ids, seqlen=seqlen, max_windows=max_windows, progress=progress)
            tps = decode_tokens_per_s(m, tok, decode_tokens) if decode_tokens > 0 else None
            return "perplexity", ppl, tps
    else:
        sents = data.sentences(n=sentences)
        # Calibration sentences from the other end of the source, not the scored ones.
        pool = data.sentences()
        scored = set(sents)
        unscored = [t for t in pool if t not in scored]
        calib = (dict(tok(unscored[-calibration_samples * 4:], return_tensors="pt", padding=True, truncation=True,
                          max_length=128)) if calibration_samples > 0 else None)
        baseline = model

        def measure(m):
            if m is baseline:
                return "cosine", 1.0, None
            res = lbeval.embedding_similarity(baseline, m, tok, sents, progress=progress)
            return "cosine", float(res.mean), None

    metric, value, tps = measure(model)
    rows.append(Row("fp" if dtype == torch.float32 else str(dtype).replace("torch.", ""), metric, value,
                    model_bytes(model), tps, None, None))
    for scheme in schemes:
        q = copy.deepcopy(model)
        report = quantize(q, QuantConfig.preset(scheme), method, calibration=calib, progress=progress)
        reports[scheme] = report
        metric, value, tps = measure(q)
        rows.append(Row(QuantConfig.preset(scheme).scheme.name, metric, value, report.model_bytes_after, tps,
                        report.seconds, report.min_weight_sqnr_db))
        del q
    return rows, reports


def format_rows(rows: list[Row]) -> str:
    """The comparison table: one row per variant, ratios against the first (the baseline)."""
    base = rows[0]
    out = []
    for r in rows:
        out.append([
            r.scheme, f"{r.value:.4f}" if r.metric == "cosine" else f"{r.value:.3f}",
            f"{r.value / base.value:.4f}" if r.metric == "perplexity" else "",
            f"{r.model_bytes / 2**20:.1f}", f"{base.model_bytes / r.model_bytes:.2f}x",
            "-" if r.decode_tok_s is None else f"{r.decode_tok_s:.1f}",
            "-" if r.min_weight_sqnr_db is None else f"{r.min_weight_sqnr_db:.1f}",
            "-" if r.quantize_s is None else f"{r.quantize_s:.1f}",
        ])
    return format_table([
        "model", base.metric, "vs fp" if base.metric == "perplexity" else "", "MiB", "smaller",
        "decode tok/s", "min W SQNR dB", "quantize s"], out, right={1, 2, 3, 4, 5, 6, 7})


# -- command line ------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    from . import models

    model_help = "; ".join(f"{s.name}: {s.description}" for s in models.MODELS.values())
    presets = ", ".join(PRESETS)
    scheme_help = (f"a preset ({presets}) with optional suffixes -g32/-g64/-g128 (group size), "
                   "-pc (per-channel), -sym/-asym, e.g. W4A16-g64-asym; W8A8 and FP8 take -static, LLM.int8 -t<threshold>")
    p = argparse.ArgumentParser(
        prog="python -m lowbit",
        description="Quantize a model after training and compare it with its full-precision baseline.",
        epilog="Examples:\n  python -m lowbit eval --model smollm2 --scheme W4A16 --max-windows 8\n"
               "  python -m lowbit quantize --model stories260k --scheme W4A16-g32 --layers\n"
               "  python -m lowbit eval --model minilm --scheme W8A16 W4A16-g32",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{quantize,eval}")

    def common(sp):
        sp.add_argument("--model", default="smollm2",
                        help=f"a built-in model or a local Hugging Face folder (default smollm2). {model_help}")
        sp.add_argument("--method", default="rtn", choices=list(METHODS), help="quantization method (default rtn)")
        sp.add_argument("--act-order", action="store_true", help="GPTQ: columns in descending Hessian-diagonal order")
        sp.add_argument("--static-groups", action="store_true",
                        help="GPTQ: group scales from the original weight (no permutation at inference)")
        sp.add_argument("--damp", type=float, default=0.01, help="GPTQ: dampening, fraction of the mean diagonal")
        sp.add_argument("--alpha", type=float, default=0.5,
                        help="SmoothQuant: migration strength in [0, 1] (default 0.5)")
        sp.add_argument("--no-clip", action="store_true", help="AWQ: skip the clip search")
        sp.add_argument("--calibration-samples", type=int, default=8,
                        help="windows of real text (512 tokens; sentences for encoders) for calibration: GPTQ's "
                             "Hessians and each layer's output SQNR (default 8; 0: none, RTN only)")
        sp.add_argument("--dtype", default="float32", choices=list(_DTYPES),
                        help="dtype the model is loaded and run in (default float32)")
        sp.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
        sp.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")

    q = sub.add_parser("quantize", help="quantize a model and print the per-layer report",
                       description="Quantize a model's Linear layers and print per-layer SQNR and bytes. "
                                   "(Saving checkpoints comes with lowbit's checkpoint formats.)")
    q.add_argument("--scheme", default="W4A16", help=scheme_help + " (default W4A16)")
    q.add_argument("--layers", action="store_true", help="print the per-layer table, not just the summary")
    common(q)

    e = sub.add_parser("eval", help="compare baseline and quantized models (perplexity or embedding similarity)",
                       description="Score the baseline and each scheme: perplexity on WikiText-2 (GPTQ/AWQ "
                                   "protocol), model bytes and decode tokens/s for causal LMs; cosine "
                                   "similarity of sentence embeddings for encoders.")
    e.add_argument("--scheme", nargs="+", default=["W4A16"], help=scheme_help + " (default W4A16); several allowed")
    e.add_argument("--text", default="wikitext2",
                   help=f"evaluation text: {' or '.join(TEXTS)} (../shared/data) or a text file (default wikitext2)")
    e.add_argument("--seqlen", type=int, help="perplexity window (default: the model's context, at most 2048)")
    e.add_argument("--max-windows", type=int,
                   help="score only the first N windows (default: all; WikiText-2 has about 140 of 2048 tokens)")
    e.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens timed for decode speed (0: skip)")
    e.add_argument("--sentences", type=int, default=512, help="sentences for encoder similarity (default 512)")
    common(e)
    return p


def _method(args):
    """"rtn", or the GPTQ / AWQ / SmoothQuant options the flags ask for."""
    if args.method != "rtn" and args.calibration_samples <= 0:
        raise ValueError(f"--method {args.method} needs calibration data: --calibration-samples must be positive")
    if args.method != "gptq" and (args.act_order or args.static_groups or args.damp != 0.01):
        raise ValueError("--act-order, --static-groups and --damp are GPTQ options: add --method gptq")
    if args.method != "smoothquant" and args.alpha != 0.5:
        raise ValueError("--alpha is a SmoothQuant option: add --method smoothquant")
    if args.method != "awq" and args.no_clip:
        raise ValueError("--no-clip is an AWQ option: add --method awq")
    if args.method == "gptq":
        return GPTQ(act_order=args.act_order, static_groups=args.static_groups, damp=args.damp)
    if args.method == "awq":
        return AWQ(clip=not args.no_clip)
    if args.method == "smoothquant":
        return SmoothQuant(alpha=args.alpha)
    return args.method


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    logging.getLogger("lowbit").setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype]
    try:
        if args.command == "quantize":
            config = QuantConfig.preset(args.scheme)
            model, tok, kind = _load(args.model, dtype)
            calib = None
            if args.calibration_samples > 0:
                if kind == "causal-lm":
                    n = min(512, lbeval.model_context(model) or 512)
                    calib = data.calibration_samples(tok, [_calibration_text("wikitext2")], args.calibration_samples,
                                                     n, seed=0)
                else:
                    calib = dict(tok(data.sentences(n=args.calibration_samples * 4), return_tensors="pt",
                                     padding=True, truncation=True, max_length=128))
            report = quantize(model, config, _method(args), calibration=calib, progress=not args.quiet)
            print(report.table() if args.layers else "", end="\n" if args.layers else "")
            print(report.summary())
            if args.json:
                Path(args.json).write_text(json.dumps(report.to_dict(), indent=1))
        else:
            rows, reports = compare(args.model, args.scheme, method=_method(args), text=args.text, seqlen=args.seqlen,
                                    max_windows=args.max_windows, decode_tokens=args.decode_tokens,
                                    sentences=args.sentences, dtype=dtype,
                                    calibration_samples=args.calibration_samples, progress=not args.quiet)
            print(f"{args.model}, {args.method}, {torch.get_num_threads()} CPU threads")
            print(format_rows(rows))
            if args.json:
                Path(args.json).write_text(json.dumps({
                    "model": args.model, "method": args.method, "text": args.text, "seqlen": args.seqlen,
                    "max_windows": args.max_windows, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "rows": [asdict(r) for r in rows],
                    "reports": {k: v.to_dict() for k, v in reports.items()}}, indent=1))
    except (ValueError, TypeError, ImportError, FileNotFoundError) as err:
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2
    return 0
