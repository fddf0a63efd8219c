"""``python -m lowbit``: quantize a model, save it, and compare it with its full-precision baseline.

    python -m lowbit quantize --model smollm2 --method gptq --scheme w4a16 --out smollm2-w4 --format gptq
    python -m lowbit quantize --model smollm2 --scheme W4A16 --layers
    python -m lowbit eval --model smollm2 --scheme W8A16 W4A16 --max-windows 8
    python -m lowbit eval --model smollm2-w4 --baseline smollm2 --max-windows 8
    python -m lowbit bench --model smollm2 --scheme w4a16 w8a8 --prefill 128 --decode 16

Models are the offline ones of :mod:`lowbit.models` (``stories260k``, ``smollm2``,
``minilm``), a local Hugging Face folder, or (``eval``, ``bench``) a quantized checkpoint
folder (what ``quantize --out`` and :func:`lowbit.save_quantized` write, or a GPTQ / AWQ /
compressed-tensors checkpoint), loaded with :func:`lowbit.load_quantized`. Nothing is
downloaded.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import os
import statistics
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
from .config import PRESETS, QuantConfig, QuantScheme

__all__ = ["main", "compare", "bench", "Row", "BenchRow"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXTS = ("wikitext2", "tinystories")
FORMATS = ("lowbit", "gptq", "awq", "compressed-tensors")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.txt")


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


@dataclass
class BenchRow:
    """One model variant timed by :func:`bench` (tokens/s are medians over the repeats)."""

    variant: str
    model_bytes: int
    prefill_tok_s: float
    decode_tok_s: float | None   # None for encoders (no decode step)


@dataclass
class _Loaded:
    model: torch.nn.Module
    tokenizer: object
    kind: str                    # "causal-lm" or "encoder"
    checkpoint: bool             # a quantized checkpoint folder (lowbit.load_quantized)


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a quantized checkpoint folder: config.json with a quantization_config."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and "quant_method" in qc


def _kind_of(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False) or not any(a.endswith("ForCausalLM") for a in archs):
        return "encoder"
    return "causal-lm"


def _tokenizer(name: str):
    """A tokenizer from a built-in model name or a folder."""
    from . import models

    if name.lower() in models.MODELS:
        return models.load_model(name)[1]
    if not Path(name).is_dir():
        raise SystemExit(f"lowbit: unknown tokenizer {name!r}: use one of {', '.join(models.MODELS)} "
                         "or a folder with tokenizer files")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(name)


def _load(name: str, dtype: torch.dtype | None, tokenizer: str | None = None) -> _Loaded:
    """A built-in model, a Hugging Face folder or a quantized checkpoint folder, with its tokenizer.

    ``dtype`` None: float32, or for a checkpoint the dtype it was saved in."""
    from . import models

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name.lower() in models.MODELS:
        spec = models.MODELS[name.lower()]
        model, tok = models.load_model(name, dtype=dtype or torch.float32)
        return _Loaded(model, _tokenizer(tokenizer) if tokenizer else tok, spec.kind, False)
    path = Path(name)
    if not path.is_dir():
        raise SystemExit(f"lowbit: unknown model {name!r}: use one of {', '.join(models.MODELS)}, "
                         "a local Hugging Face model folder or a quantized checkpoint folder")
    import transformers

    if tokenizer:
        tok = _tokenizer(tokenizer)
    elif any((path / f).is_file() for f in _TOKENIZER_FILES):
        tok = transformers.AutoTokenizer.from_pretrained(str(path))
    else:
        raise ValueError(f"{path} has no tokenizer files; pass --tokenizer with the model it was quantized "
                         f"from (one of {', '.join(models.MODELS)}, or a folder)")
    if _is_checkpoint(path):
        from .checkpoint import load_quantized

        model = load_quantized(path, dtype=dtype)
        return _Loaded(model.eval(), tok, _kind_of(model.config), True)
    cfg = transformers.AutoConfig.from_pretrained(str(path))
    kind = _kind_of(cfg)
    cls = transformers.AutoModel if kind == "encoder" else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(str(path))
    return _Loaded(model.to(dtype or torch.float32).eval(), tok, kind, False)


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


def _calibration(loaded: _Loaded, samples: int, calib_file: str | None, eval_source: str = "wikitext2",
                 seqlen: int | None = None, avoid: list[str] | None = None):
    """Calibration inputs: ``samples`` windows of text (causal LMs) or ``4 * samples``
    sentences (encoders), from ``calib_file`` or a text disjoint from the evaluation text;
    None when ``samples`` is 0."""
    if samples <= 0:
        return None
    tok = loaded.tokenizer
    if loaded.kind == "causal-lm":
        text = data.read_text(calib_file) if calib_file else _calibration_text(eval_source)
        n = seqlen or min(512, lbeval.model_context(loaded.model) or 512)
        return data.calibration_samples(tok, [text], samples, n, seed=0)
    if calib_file:
        sents = data.sentences(source=calib_file)[: samples * 4]
    elif avoid is not None:
        # Calibration sentences from the other end of the source, not the scored ones.
        scored = set(avoid)
        sents = [t for t in data.sentences() if t not in scored][-samples * 4:]
    else:
        sents = data.sentences(n=samples * 4)
    if not sents:
        raise ValueError(f"--calib {calib_file}: no sentences of 6 to 64 words in the file")
    return dict(tok(sents, return_tensors="pt", padding=True, truncation=True, max_length=128))


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
    dtype: torch.dtype | None = torch.float32,
    calibration_samples: int = 8,
    progress: bool = True,
    calib: str | None = None,
    baseline: str | None = None,
    tokenizer: str | None = None,
) -> tuple[list[Row], dict[str, QuantReport]]:
    """Baseline and each scheme of ``schemes`` on one model, measured the same way.

    Causal LMs: perplexity on ``text`` (GPTQ/AWQ protocol), model bytes, greedy decode
    tokens/s. Encoders: mean cosine between baseline and quantized sentence embeddings
    over ``sentences`` real sentences. Layer output SQNR in the reports uses
    ``calibration_samples`` windows of ``calib`` (a text file), by default of a text
    disjoint from the evaluation text.

    ``model_name`` may be a quantized checkpoint folder: it is then scored as it is
    (``schemes`` must be empty), after the full-precision ``baseline`` model if one is
    named (encoders need one: their metric is the similarity to it).
    """
    t0 = time.perf_counter()
    loaded = _load(model_name, dtype, tokenizer)
    model, tok, kind = loaded.model, loaded.tokenizer, loaded.kind
    log.info("loaded %s (%s) in %.1f s", model_name, kind, time.perf_counter() - t0)
    if loaded.checkpoint and schemes:
        raise ValueError(f"--model {model_name} is a quantized checkpoint, scored as it is: drop --scheme "
                         "(add --baseline NAME to compare it with the full-precision model)")
    if baseline is not None and not loaded.checkpoint:
        raise ValueError("--baseline is for a quantized checkpoint given as --model; a full-precision --model "
                         "is its own baseline")
    if loaded.checkpoint and kind == "encoder" and baseline is None:
        raise ValueError(f"--model {model_name} is an encoder checkpoint: its score is the similarity to the "
                         "full-precision model, so add --baseline NAME")
    ckpt = None
    if loaded.checkpoint:
        ckpt = model
        model = _load(baseline, dtype or torch.float32).model if baseline is not None else None
    rows: list[Row] = []
    reports: dict[str, QuantReport] = {}
    if kind == "causal-lm":
        eval_text = _text(text)
        ids = tok(eval_text, return_tensors="pt").input_ids
        calib_len = min(512, seqlen or lbeval.model_context(ckpt or model) or 512)
        cal = (_calibration(loaded, calibration_samples, calib, text, seqlen=calib_len)
               if schemes and calibration_samples > 0 else None)

        def measure(m):
            ppl = lbeval.perplexity(m, input_ids=ids, seqlen=seqlen, max_windows=max_windows, progress=progress)
            tps = decode_tokens_per_s(m, tok, decode_tokens) if decode_tokens > 0 else None
            return "perplexity", ppl, tps
    else:
        sents = data.sentences(n=sentences)
        cal = _calibration(loaded, calibration_samples, calib, avoid=sents) if schemes else None
        reference = model

        def measure(m):
            if m is reference:
                return "cosine", 1.0, None
            res = lbeval.embedding_similarity(reference, m, tok, sents, progress=progress)
            return "cosine", float(res.mean), None

    if model is not None:
        metric, value, tps = measure(model)
        label = "fp" if model.dtype == torch.float32 else str(model.dtype).replace("torch.", "")
        rows.append(Row(label, metric, value, model_bytes(model), tps, None, None))
    if ckpt is not None:
        metric, value, tps = measure(ckpt)
        rows.append(Row(Path(model_name).name, metric, value, model_bytes(ckpt), tps, None, None))
    for scheme in schemes:
        q = copy.deepcopy(model)
        report = quantize(q, QuantConfig.preset(scheme), method, calibration=cal, progress=progress)
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


# -- bench -------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_forward(model, kind: str, *, prefill: int = 128, decode: int = 16, batch: int = 1, repeats: int = 3,
                 vocab: int | None = None, seed: int = 0) -> tuple[float, float | None]:
    """(prefill tokens/s, decode tokens/s) of ``model`` on its own device, medians of
    ``repeats`` timed runs after one warm-up.

    Prefill: one forward pass over ``batch`` x ``prefill`` random token ids (int64,
    seeded). Decode (causal LMs; None for encoders): after that prefill, ``decode``
    greedy steps of one token each through the model's KV cache (``past_key_values``).
    """
    device = next(model.parameters()).device
    vocab = vocab or model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prefill), generator=gen).to(device)
    mask = torch.ones_like(ids)

    def run_prefill() -> float:
        _sync(device)
        start = time.perf_counter()
        if kind == "causal-lm":
            model(ids, use_cache=False)
        else:
            model(input_ids=ids, attention_mask=mask)
        _sync(device)
        return time.perf_counter() - start

    # transformers 5 calls the KV cache ``cache`` (``past_key_values`` before).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def cache_of(out):
        return getattr(out, "cache", None) if cache_arg == "cache" else out.past_key_values

    def run_decode() -> float:
        out = model(ids, use_cache=True)
        past, nxt = cache_of(out), out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(decode):
            out = model(nxt, use_cache=True, **{cache_arg: past})
            past, nxt = cache_of(out), out.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - start

    run_prefill()
    prefill_s = statistics.median(run_prefill() for _ in range(repeats))
    if kind != "causal-lm" or decode <= 0:
        return batch * prefill / prefill_s, None
    run_decode()
    decode_s = statistics.median(run_decode() for _ in range(repeats))
    return batch * prefill / prefill_s, batch * decode / decode_s


def bench(
    model_name: str,
    schemes: list[str],
    *,
    prefill: int = 128,
    decode: int = 16,
    batch: int = 1,
    repeats: int = 3,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    baseline: str | None = None,
    tokenizer: str | None = None,
    progress: bool = True,
) -> list[BenchRow]:
    """Forward-pass speed of the baseline and of each scheme (RTN: speed depends on the
    grid, not on how it was found), timed the same way (:func:`time_forward`).

    ``model_name`` may be a quantized checkpoint folder: it is timed as it is (``schemes``
    must be empty), after the full-precision ``baseline`` model if one is named.
    """
    loaded = _load(model_name, dtype, tokenizer)
    if loaded.checkpoint and schemes:
        raise ValueError(f"--model {model_name} is a quantized checkpoint, timed as it is: drop --scheme "
                         "(add --baseline NAME to time the full-precision model too)")
    if baseline is not None and not loaded.checkpoint:
        raise ValueError("--baseline is for a quantized checkpoint given as --model; a full-precision --model "
                         "is its own baseline")
    ctx = lbeval.model_context(loaded.model)
    if ctx is not None and prefill + decode > ctx:
        raise ValueError(f"--prefill {prefill} + --decode {decode} tokens exceed {model_name}'s context of "
                         f"{ctx} tokens; use fewer")
    if min(prefill, batch, repeats) <= 0 or decode < 0:
        raise ValueError("--prefill, --batch and --repeats must be positive and --decode not negative")
    dev = torch.device(device)
    variants: list[tuple[str, torch.nn.Module]] = []
    if loaded.checkpoint:
        if baseline is not None:
            variants.append(("fp", _load(baseline, dtype).model))
        variants.append((Path(model_name).name, loaded.model))
    else:
        variants.append(("fp" if loaded.model.dtype == torch.float32 else str(loaded.model.dtype)[6:],
                         loaded.model))
        cal = None
        for scheme in schemes:
            config = QuantConfig.preset(scheme)
            if config.scheme.static_activations and cal is None:
                cal = _calibration(loaded, 2, None)
            q = copy.deepcopy(loaded.model)
            quantize(q, config, "rtn", calibration=cal if config.scheme.static_activations else None,
                     progress=progress)
            variants.append((config.scheme.name, q))
    rows = []
    vocab = loaded.model.config.vocab_size
    for label, m in variants:
        m.to(dev)
        p, d = time_forward(m, loaded.kind, prefill=prefill, decode=decode, batch=batch, repeats=repeats,
                            vocab=vocab)
        rows.append(BenchRow(label, model_bytes(m), p, d))
        log.info("%s: prefill %.1f tok/s, decode %s tok/s", label, p, "-" if d is None else f"{d:.1f}")
        m.to("cpu")
    return rows


def format_bench(rows: list[BenchRow]) -> str:
    """The bench table: tokens/s and speed relative to the first row (the baseline)."""
    base = rows[0]
    out = [[r.variant, f"{r.model_bytes / 2**20:.1f}", f"{r.prefill_tok_s:.1f}",
            f"{r.prefill_tok_s / base.prefill_tok_s:.2f}x",
            "-" if r.decode_tok_s is None else f"{r.decode_tok_s:.1f}",
            "-" if r.decode_tok_s is None or base.decode_tok_s is None else
            f"{r.decode_tok_s / base.decode_tok_s:.2f}x"] for r in rows]
    return format_table(["model", "MiB", "prefill tok/s", "vs fp", "decode tok/s", "vs fp"], out,
                        right={1, 2, 3, 4, 5})


# -- command line ------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    from . import models

    model_help = "; ".join(f"{s.name}: {s.description}" for s in models.MODELS.values())
    presets = ", ".join(PRESETS)
    scheme_help = (f"a preset, any case ({presets}) with optional suffixes -g32/-g64/-g128 (group size), "
                   "-pc (per-channel), -sym/-asym, e.g. W4A16-g64-asym; W8A8 and FP8 take -static, LLM.int8 "
                   "-t<threshold>")
    p = argparse.ArgumentParser(
        prog="python -m lowbit",
        description="Quantize a model after training, save it, and compare it with its full-precision baseline.",
        epilog="Examples:\n"
               "  python -m lowbit quantize --model smollm2 --method gptq --scheme w4a16 --out smollm2-w4 "
               "--format gptq\n"
               "  python -m lowbit quantize --model stories260k --scheme W4A16-g32 --layers\n"
               "  python -m lowbit eval --model smollm2 --scheme W4A16 --max-windows 8\n"
               "  python -m lowbit eval --model smollm2-w4 --baseline smollm2 --max-windows 8\n"
               "  python -m lowbit eval --model minilm --scheme W8A16 W4A16-g32\n"
               "  python -m lowbit bench --model smollm2 --scheme w4a16 w8a8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{quantize,eval,bench}")

    def base(sp, what="a built-in model or a local Hugging Face folder"):
        sp.add_argument("--model", default="smollm2", help=f"{what} (default smollm2). {model_help}")
        sp.add_argument("--tokenizer", metavar="NAME_OR_DIR",
                        help="the tokenizer, for a folder saved without one (a built-in model name or a folder)")
        sp.add_argument("--dtype", choices=list(_DTYPES),
                        help="dtype the model is loaded and run in (default float32; a checkpoint: its own)")
        sp.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
        sp.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")

    def methods(sp):
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
        sp.add_argument("--calib", metavar="FILE",
                        help="a UTF-8 text file to draw the calibration windows from (default: WikiText-2's "
                             "validation split, disjoint from the test split eval scores)")

    q = sub.add_parser("quantize", help="quantize a model, print the per-layer report, optionally save it",
                       description="Quantize a model's Linear layers, print per-layer SQNR and bytes, and with "
                                   "--out write the quantized checkpoint (lowbit.save_quantized).")
    q.add_argument("--scheme", default="W4A16", help=scheme_help + " (default W4A16)")
    q.add_argument("--group-size", type=int, metavar="N",
                   help="weight-only schemes: input columns per group (overrides the preset's; -1: per-channel)")
    q.add_argument("--layers", action="store_true", help="print the per-layer table, not just the summary")
    q.add_argument("--out", metavar="DIR", help="write the quantized checkpoint (safetensors + config.json) to DIR")
    q.add_argument("--format", choices=FORMATS,
                   help="checkpoint format for --out (default lowbit): lowbit (every lowbit layer kind), gptq "
                        "(weight-only 2/3/4/8-bit), awq (weight-only 4-bit, AutoAWQ GEMM), compressed-tensors "
                        "(weight-only, int8 W8A8 and FP8; what vLLM loads)")
    base(q)
    methods(q)

    e = sub.add_parser("eval", help="compare baseline and quantized models (perplexity or embedding similarity)",
                       description="Score the baseline and each scheme: perplexity on WikiText-2 (GPTQ/AWQ "
                                   "protocol), model bytes and decode tokens/s for causal LMs; cosine "
                                   "similarity of sentence embeddings for encoders. --model may be a quantized "
                                   "checkpoint folder: it is scored as it is, after --baseline if given.")
    e.add_argument("--scheme", nargs="+", help=scheme_help + " (default W4A16); several allowed")
    e.add_argument("--baseline", metavar="NAME_OR_DIR",
                   help="with a quantized checkpoint as --model: the full-precision model to score first")
    e.add_argument("--text", default="wikitext2",
                   help=f"evaluation text: {' or '.join(TEXTS)} (../shared/data) or a text file (default wikitext2)")
    e.add_argument("--seqlen", type=int, help="perplexity window (default: the model's context, at most 2048)")
    e.add_argument("--max-windows", type=int,
                   help="score only the first N windows (default: all; WikiText-2 has about 140 of 2048 tokens)")
    e.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens timed for decode speed (0: skip)")
    e.add_argument("--sentences", type=int, default=512, help="sentences for encoder similarity (default 512)")
    base(e, "a built-in model, a local Hugging Face folder or a quantized checkpoint folder")
    methods(e)

    b = sub.add_parser("bench", help="time the forward pass of quantized models against the baseline",
                       description="Tokens/s of the baseline and of each scheme (RTN) on this machine: one "
                                   "prefill of --prefill tokens and --decode single-token steps through the KV "
                                   "cache, medians of --repeats runs after a warm-up. --model may be a quantized "
                                   "checkpoint folder: it is timed as it is, after --baseline if given.")
    b.add_argument("--scheme", nargs="+", help=scheme_help + " (default W4A16); several allowed")
    b.add_argument("--baseline", metavar="NAME_OR_DIR",
                   help="with a quantized checkpoint as --model: the full-precision model to time first")
    b.add_argument("--prefill", type=int, default=128, help="prompt tokens per sequence (default 128)")
    b.add_argument("--decode", type=int, default=16, help="decode steps timed after the prefill (default 16)")
    b.add_argument("--batch", type=int, default=1, help="sequences per forward (default 1)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, median (default 3)")
    b.add_argument("--device", default="cpu", help="where to run: cpu (default) or cuda")
    base(b, "a built-in model, a local Hugging Face folder or a quantized checkpoint folder")
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
    if args.calib and not Path(args.calib).is_file():
        raise ValueError(f"--calib {args.calib}: no such file (give a UTF-8 text file to calibrate on)")
    if args.method == "gptq":
        return GPTQ(act_order=args.act_order, static_groups=args.static_groups, damp=args.damp)
    if args.method == "awq":
        return AWQ(clip=not args.no_clip)
    if args.method == "smoothquant":
        return SmoothQuant(alpha=args.alpha)
    return args.method


def _check_method(method: str, scheme: QuantScheme, flag: str) -> None:
    """Methods and schemes that go together (before anything is loaded)."""
    if method in ("gptq", "awq") and not scheme.weight_only:
        raise ValueError(f"--method {method} computes weight-only grids, but {flag} {scheme.name} quantizes "
                         "activations too; use --method smoothquant (or rtn) for W8A8 / FP8 schemes, or a "
                         "weight-only scheme (w8a16, w4a16, w3a16)")
    if method == "smoothquant" and scheme.weight_only:
        raise ValueError(f"--method smoothquant: SmoothQuant migrates activation outliers for W8A8 / FP8 schemes, "
                         f"but {flag} {scheme.name} is weight-only; use --scheme w8a8 or fp8, or --method awq "
                         "for weight-only schemes")


def _quant_config(args) -> QuantConfig:
    """The --scheme preset with --group-size applied, checked against --method and --format."""
    config = QuantConfig.preset(args.scheme)
    if args.group_size is not None:
        if args.group_size == 0 or args.group_size < -1:
            raise ValueError(f"--group-size must be positive, or -1 for per-channel, got {args.group_size}")
        if not config.scheme.weight_only:
            raise ValueError(f"--group-size applies to weight-only schemes (w8a16, w4a16, w3a16); "
                             f"{config.scheme.name} has per-channel weights: drop --group-size")
        config = QuantConfig.preset(args.scheme, group_size=None if args.group_size == -1 else args.group_size)
    scheme = config.scheme
    _check_method(args.method, scheme, "--scheme")
    if args.format is not None and args.out is None:
        raise ValueError(f"--format {args.format} says how to write the checkpoint: add --out DIR (where to write it)")
    fmt = args.format
    if fmt in ("gptq", "awq") and not scheme.weight_only:
        raise ValueError(f"--format {fmt} holds weight-only integer layers, but --scheme {scheme.name} quantizes "
                         "activations too; write W8A8 / FP8 with --format compressed-tensors or lowbit")
    if fmt == "awq" and scheme.bits != 4:
        raise ValueError(f"--format awq holds 4-bit weights only (AutoAWQ's GEMM layout), but --scheme "
                         f"{scheme.name} has {scheme.bits}-bit weights; use --format gptq, compressed-tensors "
                         "or lowbit")
    if fmt == "compressed-tensors" and scheme.outlier_threshold is not None:
        raise ValueError(f"--format compressed-tensors has no LLM.int8 layer (--scheme {scheme.name}: int8 with "
                         "16-bit outlier columns); use --format lowbit, or --scheme w8a8")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder (created if needed)")
    return config


def _run_quantize(args, dtype) -> None:
    config = _quant_config(args)
    method = _method(args)
    fmt = args.format or ("lowbit" if args.out else None)
    if fmt is not None:
        from .formats import get_format

        get_format(fmt)   # an unregistered format or a missing optional dependency: fail before quantizing
    loaded = _load(args.model, dtype, args.tokenizer)
    if loaded.checkpoint:
        raise ValueError(f"--model {args.model} is already a quantized checkpoint; quantize its full-precision "
                         "model instead")
    calib = _calibration(loaded, args.calibration_samples, args.calib)
    report = quantize(loaded.model, config, method, calibration=calib, progress=not args.quiet)
    print(report.table() if args.layers else "", end="\n" if args.layers else "")
    print(report.summary())
    result = report.to_dict()
    if args.out:
        from .checkpoint import save_quantized

        t0 = time.perf_counter()
        out = save_quantized(loaded.model, args.out, format=fmt)
        loaded.tokenizer.save_pretrained(str(out))
        size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
        print(f"wrote {out} ({fmt} format, {size / 2**20:.2f} MiB of safetensors) in {time.perf_counter() - t0:.1f} s")
        result.update(out=str(out), format=fmt)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def _run_eval(args, dtype) -> None:
    schemes = args.scheme if args.scheme is not None else ([] if _is_checkpoint(Path(args.model)) else ["W4A16"])
    method = _method(args)
    for s in schemes:
        _check_method(args.method, QuantConfig.preset(s).scheme, "--scheme")
    rows, reports = compare(args.model, schemes, method=method, text=args.text, seqlen=args.seqlen,
                            max_windows=args.max_windows, decode_tokens=args.decode_tokens,
                            sentences=args.sentences, dtype=dtype, calibration_samples=args.calibration_samples,
                            progress=not args.quiet, calib=args.calib, baseline=args.baseline,
                            tokenizer=args.tokenizer)
    what = args.method if schemes else "quantized checkpoint"
    print(f"{args.model}, {what}, {torch.get_num_threads()} CPU threads")
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "method": args.method, "text": args.text, "seqlen": args.seqlen,
            "max_windows": args.max_windows, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "rows": [asdict(r) for r in rows],
            "reports": {k: v.to_dict() for k, v in reports.items()}}, indent=1))


def _run_bench(args, dtype) -> None:
    schemes = args.scheme if args.scheme is not None else ([] if _is_checkpoint(Path(args.model)) else ["W4A16"])
    for s in schemes:
        QuantConfig.preset(s)   # a bad preset name: fail before loading
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here; use --device cpu")
    rows = bench(args.model, schemes, prefill=args.prefill, decode=args.decode, batch=args.batch,
                 repeats=args.repeats, dtype=dtype, device=args.device, baseline=args.baseline,
                 tokenizer=args.tokenizer, progress=not args.quiet)
    where = (torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda")
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{args.model} on {where}: batch {args.batch}, prefill {args.prefill} tokens, {args.decode} decode steps, "
          f"median of {args.repeats}")
    print(format_bench(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "device": where, "batch": args.batch, "prefill": args.prefill,
            "decode": args.decode, "repeats": args.repeats, "torch": torch.__version__,
            "rows": [asdict(r) for r in rows]}, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    logging.getLogger("lowbit").setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype] if args.dtype else None
    try:
        if args.command == "quantize":
            _run_quantize(args, dtype)
        elif args.command == "eval":
            _run_eval(args, dtype)
        else:
            _run_bench(args, dtype)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as err:
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2
    return 0
