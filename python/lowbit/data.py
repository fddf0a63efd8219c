"""Text data for calibration and evaluation. Nothing here touches the network.

* :func:`wikitext2_test_text` joins the WikiText-2 raw test split the way the GPTQ and
  AWQ papers' evaluation does: the dataset's rows (one per line of ``wiki.test.raw``,
  each keeping its newline) joined with ``"\\n\\n"``.
* :func:`calibration_samples` draws N windows of L tokens from a text file or a list of
  strings, seeded, as GPTQ draws its calibration set.
* :func:`sentences` gives real English sentences (WikiText-2 test articles by default)
  for :func:`lowbit.eval.embedding_similarity`.
* :func:`shared_data_dir` finds the project's offline data folder (``../shared/data``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["wikitext2_test_text", "read_text", "calibration_samples", "sentences", "shared_data_dir"]

SHARED_DATA_ENV = "LOWBIT_SHARED_DATA"


def shared_data_dir() -> Path:
    """The offline data folder: ``$LOWBIT_SHARED_DATA`` if set, else ``../shared/data``
    beside the repository (this source tree's), else beside the working directory.

    Raises:
        FileNotFoundError: none of them exists (the message lists where it looked).
    """
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{SHARED_DATA_ENV}={env} is not a directory")
        return path
    repo_root = Path(__file__).resolve().parents[2]   # python/lowbit/data.py -> repository root
    tried = []
    for path in (repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if path.is_dir():
            return path
        tried.append(str(path))
    raise FileNotFoundError(
        "lowbit's offline data folder was not found (looked in " + ", ".join(tried)
        + f"); put shared/data beside the repository or set {SHARED_DATA_ENV}=/path/to/shared/data"
    )


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


# WikiText's tokenization, undone: " @-@ " joins (e.g. "guest @-@ starring"), spaces
# before closing punctuation and clitics, spaces inside brackets and double quotes.
_WIKI_DETOK = [
    (re.compile(r" @(.)@ "), r"\1"),
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d)\b"), r"\1"),
    (re.compile(r"(?<=s) ' "), "' "),                         # plural possessive: "Stevens ' father"
    (re.compile(r'" ([^"]*?) "'), r'"\1"'),
]
_WIKI_SENTENCE_END = re.compile(r"(?<= [.!?]) (?=\S)")        # "actor . He": tokens end sentences
# Plain text: after . ! ? (and a closing quote or bracket) before a capital, digit, quote
# or bracket, except after common abbreviations and initials ("Mr. Speaker", "J. Smith").
_ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "Mt", "No", "vs", "Gen", "Gov", "Sen", "Rep", "Prof")
_SENTENCE_END = re.compile(
    "".join(rf"(?<!\b{a}\.)" for a in _ABBREVIATIONS)
    + r"(?<!\b[A-Z]\.)(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[A-Z0-9])"
)


def _detokenize_wikitext(s: str) -> str:
    for pattern, repl in _WIKI_DETOK:
        s = pattern.sub(repl, s)
    return s


def sentences(
    n: int | None = None,
    source: str | os.PathLike = "wikitext2",
    min_words: int = 6,
    max_words: int = 64,
) -> list[str]:
    """Real English sentences for the embedding-similarity evaluation, deterministic.

    Sources:
        ``"wikitext2"`` (default): the WikiText-2 raw test split
        (``shared_data_dir()/text/wikitext-2-raw/wiki.test.raw``, CC BY-SA 3.0; Wikipedia
        Good and Featured articles). Headings (``= = Career = =``) and blank lines are
        skipped; each paragraph is split at WikiText's sentence-final tokens (``" . "``,
        ``" ! "``, ``" ? "``, so abbreviations like ``U.S.`` stay whole), then its
        tokenization is undone (``guest @-@ starring`` -> ``guest-starring``,
        ``actor .`` -> ``actor.``, ``" Scott "`` -> ``"Scott"``).
        A path: a UTF-8 text file of paragraphs separated by blank lines (line wraps
        inside a paragraph are undone), split after ``.``, ``!`` or ``?`` (and any
        closing quote or bracket) followed by whitespace and a capital, digit, quote or
        bracket, except after initials and common abbreviations (``Mr.``, ``Dr.``, ...).

    Sentences of fewer than ``min_words`` or more than ``max_words`` words are dropped.
    With ``n``, ``n`` sentences spread evenly over the whole source (indices
    ``i * total // n``), so they come from many articles, not just the first.

    Returns:
        A list of ``n`` (or all) strings, in source order; the same on every call.
    """
    if source == "wikitext2":
        lines = (shared_data_dir() / "text" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
        wikitext = True
    elif isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        lines = Path(source).read_text(encoding="utf-8")
        wikitext = False
    else:
        raise FileNotFoundError(f"sentences: source must be 'wikitext2' or a text file, got {source!r}")
    if not wikitext:  # paragraphs (blank-line separated), hard line wraps undone
        lines = "\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", lines))
    out = []
    for line in lines.splitlines():
        line = line.strip()
        if not line or (wikitext and line.startswith("=") and line.endswith("=")):
            continue
        if wikitext:
            parts = [_detokenize_wikitext(p.strip()) for p in _WIKI_SENTENCE_END.split(line)]
        else:
            parts = [p.strip() for p in _SENTENCE_END.split(line)]
        out.extend(p for p in parts if min_words <= len(p.split()) <= max_words)
    if n is None:
        return out
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if n > len(out):
        raise ValueError(f"sentences: the source has {len(out)} usable sentences, fewer than n={n}")
    return [out[i * len(out) // n] for i in range(n)]
