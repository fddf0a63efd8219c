"""Text data for calibration and evaluation. Nothing here touches the network.

* :func:`wikitext2_test_text` joins the WikiText-2 raw test split the way the GPTQ and
  AWQ papers' evaluation does: the dataset's rows (one per line of ``wiki.test.raw``,
  each keeping its newline) joined with ``"\\n\\n"``.
* :func:`calibration_samples` draws N windows of L tokens from a text file or a list of
  strings, seeded, as GPTQ draws its calibration set.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["wikitext2_test_text", "read_text", "calibration_samples"]


def read_text(source: str | os.PathLike | Sequence[str]) -> str:
    """A text file's contents, or a list of strings joined with ``"\\n\\n"``."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        return Path(source).read_text(encoding="utf-8")
    if isinstance(source, (str, os.PathLike)):
        raise FileNotFoundError(f"calibration/evaluation text file not found: {source}")
    texts = list(source)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("text source must be a file path or a list of strings")
    return "\n\n".join(texts)


def wikitext2_test_text(path: str | os.PathLike) -> str:
    """The WikiText-2 raw test split (``wiki.test.raw``) as the GPTQ/AWQ protocol feeds it
    to the tokenizer: rows (lines, newline kept) joined with ``"\\n\\n"``."""
    rows = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    return "\n\n".join(rows)


def calibration_samples(
    tokenizer,
    source: str | os.PathLike | Sequence[str],
    n_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
) -> torch.Tensor:
    """``n_samples`` windows of ``seqlen`` consecutive tokens from ``source``.

    The text is tokenized once; window starts are drawn uniformly with a
    ``torch.Generator`` seeded by ``seed``, so a seed gives the same samples everywhere.

    Returns:
        int64 ``[n_samples, seqlen]`` token ids.
    """
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if seqlen <= 0:
        raise ValueError(f"seqlen must be positive, got {seqlen}")
    ids = tokenizer(read_text(source), return_tensors="pt").input_ids[0]
    if ids.numel() < seqlen:
        raise ValueError(
            f"the calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}; "
            "give more text or a shorter seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
