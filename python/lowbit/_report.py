"""Plain-text tables for scripts, benchmarks and the CLI (returns strings; never prints)."""
from __future__ import annotations

import math

__all__ = ["format_table", "ratio_db"]


def ratio_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` for energies (SQNR): inf without noise, -inf without signal."""
    if noise <= 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def format_table(headers: list[str], rows: list[list], right: set[int]) -> str:
    """Plain-text table; columns in ``right`` are right-aligned."""
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])
