#!/usr/bin/env python
"""Round-to-nearest quantization of a real model's Linear weights with lowbit's primitives.

Loads the stories260K Llama checkpoint (``../shared/data/models/stories260K/hf/model.safetensors``
relative to the repository root, or ``--model PATH``), quantizes every 2-D Linear weight
(attention and MLP projections; the embedding / tied ``lm_head`` and the 1-D norms are
skipped) with ``lowbit.rtn_quantize`` at bits {8, 4, 3, 2} x granularity {per-tensor,
per-channel, group 64, group 32} x {symmetric, asymmetric}, plus FP8 e4m3 per-channel
(dynamic absmax), dequantizes, and reports over all those weights:

* SQNR (dB) = 20 log10(||W|| / ||W - W_hat||), the norms taken over all weights
  together (sum of squares over every tensor, then the square root);
* mean relative error = mean over tensors of ||W - W_hat|| / ||W|| (Frobenius);
* packed bytes: GPTQ ``qweight`` (``QuantizedWeight.pack()``) + scales as fp16 + zero
  points packed at ``bits`` (``pack_int32(zeros, bits)``), against the fp16 size.
  FP8: one byte a value + one float32 scale a row.

Exits non-zero if a sanity relation fails: SQNR must rise with bits for each
granularity and symmetry, and group-wise must beat per-channel at 4 bits.

    python scripts/demo_primitives.py [--model PATH]
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO.parent / "shared" / "data" / "models" / "stories260K" / "hf" / "model.safetensors"

BITS = [8, 4, 3, 2]
# (label, rtn_quantize keyword arguments); coarse to fine.
GRANULARITIES = [
    ("per-tensor", {"per_tensor": True}),
    ("per-channel", {"group_size": None}),
    ("group 64", {"group_size": 64}),
    ("group 32", {"group_size": 32}),
]
SKIPPED_2D = ("embed_tokens", "lm_head")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help=f"model.safetensors to read (default {DEFAULT_MODEL})")
    return p.parse_args(argv)


def load_linear_weights(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The 2-D Linear weights of a checkpoint, and the names of the tensors skipped."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    used, skipped = {}, []
    for name, t in tensors.items():
        if t.dim() == 2 and t.is_floating_point() and not any(s in name for s in SKIPPED_2D):
            used[name] = t.float()
        else:
            skipped.append(name)
    return used, skipped


def summarize_names(names) -> list[str]:
    """Collapse per-layer names: 'model.layers.{0-4}.mlp.up_proj.weight'."""
    groups: dict[str, list[int]] = {}
    for name in names:
        m = re.match(r"(.*\.layers\.)(\d+)(\..*)", name)
        key = f"{m.group(1)}{{}}{m.group(3)}" if m else name
        groups.setdefault(key, []).append(int(m.group(2)) if m else -1)
    out = []
    for key, layers in groups.items():
        if "{}" not in key:
            out.append(key)
            continue
        lo, hi = min(layers), max(layers)
        span = f"{lo}-{hi}" if sorted(layers) == list(range(lo, hi + 1)) else ",".join(map(str, layers))
        out.append(key.replace("{}", "{" + span + "}"))
    return out


class Accumulator:
    """Error and size totals of one configuration over all weights."""

    def __init__(self):
        self.sig2 = self.err2 = 0.0
        self.rel = []
        self.packed = self.fp16 = 0

    def add(self, w: torch.Tensor, w_hat: torch.Tensor, packed_bytes: int) -> None:
        w, w_hat = w.double(), w_hat.double()
        s2, e2 = float(w.square().sum()), float((w - w_hat).square().sum())
        self.sig2 += s2
        self.err2 += e2
        self.rel.append(math.sqrt(e2 / s2) if s2 > 0 else 0.0)
        self.packed += packed_bytes
        self.fp16 += w.numel() * 2

    def sqnr(self) -> float:
        return math.inf if self.err2 == 0 else 10 * math.log10(self.sig2 / self.err2)

    def mean_rel(self) -> float:
        return sum(self.rel) / len(self.rel)


def int_packed_bytes(qw, lowbit) -> int:
    """qweight + fp16 scales + zero points packed at ``bits`` (GPTQ's qzeros)."""
    qweight = qw.pack()
    qzeros = lowbit.ops.pack_int32(qw.zeros.to(torch.uint8), qw.bits)
    return (qweight.numel() * qweight.element_size() + qw.scales.numel() * 2
            + qzeros.numel() * qzeros.element_size())


def main(argv=None) -> int:
    args = parse_args(argv)
    model = args.model.resolve()
    if not model.is_file():
        print(f"demo_primitives: model file not found: {model}\n"
              "  expected the stories260K checkpoint at "
              "<repo>/../shared/data/models/stories260K/hf/model.safetensors; "
              "pass another with --model PATH", file=sys.stderr)
        return 2

    import lowbit
    from lowbit._report import format_table
    from lowbit import ops

    weights, skipped = load_linear_weights(model)
    if not weights:
        print(f"demo_primitives: no 2-D Linear weights in {model}", file=sys.stderr)
        return 2
    numel = sum(w.numel() for w in weights.values())
    ks = sorted({w.shape[1] for w in weights.values()})
    print(f"model: {model}")
    print(f"quantizing {len(weights)} Linear weights ({numel:,} values, K in {ks}):")
    shapes: dict[str, set] = {}
    for name, w in weights.items():
        shapes.setdefault(re.sub(r"\.layers\.\d+\.", ".layers.{}.", name), set()).add(tuple(w.shape))
    for line in summarize_names(weights):
        key = re.sub(r"\{[^}]*\}", "{}", line)
        print(f"  {line}  {' '.join(str(list(s)) for s in sorted(shapes.get(key, ())))}")
    print("skipped: " + ", ".join(summarize_names(skipped)))
    print()

    results = []  # (bits, granularity index, symmetric, label, Accumulator)
    for bits in BITS:
        for gi, (gran, kw) in enumerate(GRANULARITIES):
            for symmetric in (True, False):
                acc = Accumulator()
                for w in weights.values():
                    qw = lowbit.rtn_quantize(w, bits, symmetric=symmetric, **kw)
                    acc.add(w, qw.dequantize(torch.float32), int_packed_bytes(qw, lowbit))
                results.append((bits, gi, symmetric, f"int{bits}", gran, acc))
    acc = Accumulator()
    for w in weights.values():
        q, scale = ops.quantize_fp8_dynamic(w, torch.float8_e4m3fn, True)
        acc.add(w, ops.dequantize_fp8(q, scale, torch.float32),
                q.numel() * q.element_size() + scale.numel() * scale.element_size())
    results.append((8, 1, True, "fp8 e4m3", "per-channel", acc))

    # Bits (high to low), then granularity (coarse to fine), sym before asym; FP8 closes its block.
    results.sort(key=lambda r: (-r[0], r[3] == "fp8 e4m3", r[1], not r[2]))
    rows = [[fmt, gran, ("sym" if sym else "asym") if fmt != "fp8 e4m3" else "absmax",
             f"{a.sqnr():.2f}", f"{100 * a.mean_rel():.2f}%", f"{a.packed:,}",
             f"{a.fp16:,}", f"{a.fp16 / a.packed:.2f}x"]
            for _, _, sym, fmt, gran, a in results]
    print(format_table(["format", "granularity", "grid", "SQNR dB", "mean rel err",
                        "packed B", "fp16 B", "vs fp16"], rows, right={3, 4, 5, 6, 7}))

    # -- sanity relations ------------------------------------------------------------
    sq = {(b, gran, sym): a.sqnr() for b, _, sym, fmt, gran, a in results if fmt.startswith("int")}
    failures = []
    for gran, _ in GRANULARITIES:
        for sym in (True, False):
            seq = [sq[(b, gran, sym)] for b in sorted(BITS)]
            if any(lo >= hi for lo, hi in zip(seq, seq[1:])):
                failures.append(f"SQNR does not rise with bits for {gran} "
                                f"{'sym' if sym else 'asym'}: "
                                + ", ".join(f"{b}b {s:.2f}" for b, s in zip(sorted(BITS), seq)))
    for sym in (True, False):
        pc = sq[(4, "per-channel", sym)]
        for gran in ("group 64", "group 32"):
            if sq[(4, gran, sym)] <= pc:
                failures.append(f"4-bit {gran} ({sq[(4, gran, sym)]:.2f} dB) does not beat "
                                f"per-channel ({pc:.2f} dB), {'sym' if sym else 'asym'}")

    best4 = max(((gran, sym) for gran, _ in GRANULARITIES for sym in (True, False)),
                key=lambda gs: sq[(4, *gs)])
    acc_best4 = next(a for b, _, s, f, g, a in results if (b, g, s) == (4, *best4) and f == "int4")
    fp8 = next(a for *_, f, _, a in results if f == "fp8 e4m3")
    print()
    print(f"takeaway: int8 is near-lossless ({sq[(8, 'per-channel', True)]:.1f} dB per-channel "
          f"sym; FP8 e4m3 {fp8.sqnr():.1f} dB); at 4 bits {best4[0]} "
          f"{'sym' if best4[1] else 'asym'} is best ({sq[(4, *best4)]:.1f} dB vs "
          f"{sq[(4, 'per-channel', best4[1])]:.1f} per-channel, {sq[(4, 'per-tensor', best4[1])]:.1f} "
          f"per-tensor) at {acc_best4.fp16 / acc_best4.packed:.2f}x smaller than fp16; "
          f"2-3 bits need more than RTN.")
    if failures:
        print("\nSANITY CHECK FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("sanity: SQNR rises with bits for every granularity; group-wise beats per-channel at 4 bits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
