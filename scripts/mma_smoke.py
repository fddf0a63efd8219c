"""Quick CUDA check of lowbit.ops.mma_matmul against a plain-torch computation of its
specification (python/lowbit/reference/mma.py), on Llama-sized and awkward shapes, both
paths (tensor-core kernel and dequantize + GEMM). Prints one line per case and exits
non-zero on a mismatch. Meant for the first minute of a GPU session (scripts/device_check.sh).

Usage: python scripts/mma_smoke.py [--device cuda] [--small]
"""
from __future__ import annotations

import argparse
import sys

import torch

import lowbit
from lowbit import ops


def expected(x, codes, scales, zeros, gs, bias):
    """x @ W^T + bias, W = ((q - z) * s.to(x.dtype)) rounded to x.dtype; float64 sums."""
    k = x.shape[-1]
    g = torch.arange(k, device=x.device) // gs
    s = scales.to(x.dtype).double()[:, g]        # [N, K] from [N, G]
    z = zeros.double()[:, g]
    w = ((codes.double() - z) * s).float().to(x.dtype).double()
    y = x.double() @ w.t()
    if bias is not None:
        y = y + bias.double()
    return y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="only the small shapes (for compute-sanitizer)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    cases = [  # (M, K, N, bits, group_size, symmetric, dtype, bias)
        (1, 4096, 11008, 4, 128, True, torch.float16, False),
        (16, 4096, 11008, 4, 128, True, torch.bfloat16, False),
        (3, 11008, 4096, 4, 128, False, torch.float16, True),
        (33, 4096, 1024, 4, 32, False, torch.bfloat16, True),
        (64, 4096, 4096, 4, -1, True, torch.float16, False),
        (200, 4096, 4096, 8, 128, False, torch.float16, False),
        (7, 4096, 4096, 8, 64, True, torch.bfloat16, True),
        (17, 80, 192, 4, 32, False, torch.float16, True),     # ragged last group, K % 64 != 0
        (5, 144, 320, 8, 16, False, torch.bfloat16, False),   # N % 256 != 0, K % 64 != 0
        (1, 16, 64, 4, 16, True, torch.float16, False),
        (130, 576, 1536, 4, 64, False, torch.bfloat16, True),
    ]
    if args.small:
        cases = [c for c in cases if c[1] * c[2] <= 4096 * 1024]
    bad = 0
    for m, k, n, bits, gs, sym, dt, has_bias in cases:
        gs_eff = k if gs < 0 else gs
        g = (k + gs_eff - 1) // gs_eff
        codes = torch.randint(0, 2 ** bits, (n, k), generator=gen, dtype=torch.uint8)
        zeros = (torch.full((n, g), 2 ** (bits - 1), dtype=torch.uint8) if sym
                 else torch.randint(0, 2 ** bits, (n, g), generator=gen, dtype=torch.uint8))
        scales = (torch.rand(n, g, generator=gen) * 0.02 + 0.001).half()
        bias = torch.randn(n, generator=gen).to(dt) if has_bias else None
        x = torch.randn(m, k, generator=gen).to(dt)
        qweight = ops.pack_int32(codes.t().contiguous(), bits)
        qweight, sc, zs, x = (t.to(dev) for t in (qweight, scales.t().contiguous(), zeros.t().contiguous(), x))
        bias_d = None if bias is None else bias.to(dev)
        packed, ps, pz = ops.pack_mma(qweight, sc, zs, bits, gs_eff)
        ref = expected(x.cpu(), codes, scales, zeros, gs_eff, bias)
        for rows in (1 << 30, 0, -1):
            y = ops.mma_matmul(x, packed, ps, pz, bits, gs_eff, bias_d, rows).double().cpu()
            err = (y - ref).abs()
            rel_mean = (err.mean() / ref.abs().mean()).item()
            # The output's own rounding, against the unrounded float64 value: about 2e-4
            # for float16 and 1.4e-3 for bfloat16 (2**-12 and 2**-9 mean relative).
            ok = bool(torch.isfinite(y).all()) and rel_mean < (1e-3 if dt == torch.float16 else 3e-3)
            bad += not ok
            print(f"M={m:4d} K={k:5d} N={n:5d} W{bits} gs={gs:4d} {'sym ' if sym else 'asym'} {str(dt)[6:]:8s} "
                  f"bias={int(has_bias)} path={rows:11d}: rel mean err {rel_mean:.2e} max {err.max().item():.3e} "
                  f"{'ok' if ok else 'MISMATCH'}", flush=True)
    print(f"lowbit {lowbit.__version__}: {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
