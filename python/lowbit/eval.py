"""Evaluation against the full-precision baseline: perplexity of causal LMs, and
embedding similarity of sentence encoders.

:func:`perplexity` follows the GPTQ/AWQ papers' protocol (Frantar et al., 2022, and the
AWQ code it copies): tokenize the whole text once, cut it into non-overlapping windows
of ``seqlen`` tokens (the model's context if shorter, 2048 at most), drop the tail, and
report ``exp(sum_w nll_w * seqlen / (n_windows * seqlen))`` where ``nll_w`` is window
``w``'s mean next-token cross-entropy (over its ``seqlen - 1`` predictions). Use
:func:`lowbit.data.wikitext2_test_text` for the papers' WikiText-2 text.

:func:`embedding_similarity` compares a quantized sentence encoder with its baseline:
both embed the same sentences (:func:`sentence_embeddings`, the all-MiniLM-L6-v2 recipe:
mean of ``last_hidden_state`` over the attention mask, then L2-normalised) and the
result is the cosine between the two embeddings of each sentence. Use
:func:`lowbit.data.sentences` for real sentences.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["perplexity", "model_context", "sentence_embeddings", "embedding_similarity", "SimilarityResult"]

log = logging.getLogger(__name__)


def model_context(model) -> int | None:
    """The model's maximum sequence length, from its config, if it says."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@torch.no_grad()
def perplexity(
    model,
    tokenizer=None,
    text: str | None = None,
    seqlen: int | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    max_windows: int | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of a causal LM on ``text`` (GPTQ/AWQ protocol, see the module docstring).

    Args:
        model: a causal LM returning ``.logits`` ``[B, L, vocab]`` (Hugging Face style).
        tokenizer, text: the text to score; or pass ``input_ids`` (int64 ``[1, T]`` or
            ``[T]``) already tokenized.
        seqlen: window length; default the model's context, capped at 2048.
        batch_size: windows per forward pass (the result does not depend on it).
        device: where to run; default the model's device.
        max_windows: score only the first windows (a quick estimate), None for all.
        progress: show a tqdm bar.

    Returns:
        The perplexity, a float.
    """
    if input_ids is None:
        if tokenizer is None or text is None:
            raise ValueError("perplexity needs tokenizer and text, or input_ids")
        input_ids = tokenizer(text, return_tensors="pt").input_ids
    ids = input_ids.reshape(-1)
    ctx = model_context(model)
    if seqlen is None:
        seqlen = min(ctx or 2048, 2048)
    if ctx is not None and seqlen > ctx:
        raise ValueError(f"seqlen={seqlen} exceeds the model's context of {ctx} tokens")
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if device is None:
        device = next(model.parameters()).device
    windows = ids[: n * seqlen].view(n, seqlen)
    total_nll = 0.0
    for b in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = windows[b : b + batch_size].to(device)
        logits = model(batch).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1)
        total_nll += float(loss.mean(dim=1).sum()) * seqlen
    ppl = math.exp(total_nll / (n * seqlen))
    log.info("perplexity %.4f over %d windows of %d tokens", ppl, n, seqlen)
    return ppl


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sentence_embeddings(
    model,
    tokenizer,
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    device: str | torch.device | None = None,
    normalize: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """Sentence embeddings: the mean of the encoder's ``last_hidden_state`` over each
    sentence's real tokens (attention mask), L2-normalised (sentence-transformers'
    all-MiniLM-L6-v2 recipe).

    Sentences are batched in order of length (less padding) and the rows put back in
    input order; pooling and normalisation run in float32 whatever the model's dtype.

    Args:
        model: an encoder whose output has ``.last_hidden_state`` ``[B, L, H]`` (e.g. a
            ``transformers.AutoModel``), called with the tokenizer's ``input_ids``,
            ``attention_mask`` (and ``token_type_ids`` if the tokenizer gives them).
        tokenizer: its tokenizer (must be able to pad).
        sentences: N strings.
        batch_size: sentences per forward pass.
        max_length: longer sentences are truncated to this many tokens.
        device: where to run; default the model's device.
        normalize: L2-normalise each embedding (the recipe); False gives the raw means.
        progress: show a tqdm bar.

    Returns:
        float32 ``[N, H]`` on the CPU.
    """
    sentences = list(sentences)
    if not sentences:
        raise ValueError("sentence_embeddings needs at least one sentence")
    if not all(isinstance(s, str) for s in sentences):
        raise TypeError("sentences must be a sequence of strings")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device is None:
        device = _model_device(model)
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]), reverse=True)
    out = torch.empty(len(sentences), 0)
    for b in tqdm(range(0, len(order), batch_size), desc="embeddings", disable=not progress, unit="batch"):
        idx = order[b : b + batch_size]
        enc = tokenizer(
            [sentences[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = getattr(model(**enc), "last_hidden_state", None)
        if hidden is None:
            raise TypeError(
                "sentence_embeddings needs a model whose output has last_hidden_state "
                "(an encoder such as transformers.AutoModel), not a causal-LM head"
            )
        mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)
        emb = (hidden.to(torch.float32) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if normalize:
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
        emb = emb.cpu()
        if out.shape[1] == 0:
            out = torch.empty(len(sentences), emb.shape[1], dtype=torch.float32)
        out[torch.tensor(idx)] = emb
    return out


@dataclasses.dataclass(frozen=True)
class SimilarityResult:
    """What :func:`embedding_similarity` measured.

    Attributes:
        mean: mean cosine over the sentences.
        min: the lowest cosine (the worst-served sentence).
        per_sentence: float32 ``[N]``, the cosine for each sentence, in input order.
    """

    mean: float
    min: float
    per_sentence: torch.Tensor

    def as_dict(self) -> dict:
        """``{"mean", "min", "n"}`` as plain numbers (for JSON reports)."""
        return {"mean": self.mean, "min": self.min, "n": int(self.per_sentence.numel())}


def embedding_similarity(
    baseline,
    quantized,
    tokenizer,
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SimilarityResult:
    """Cosine similarity between a baseline encoder's sentence embeddings and a quantized
    copy's, sentence by sentence (embeddings as in :func:`sentence_embeddings`).

    A perfect quantization scores 1.0 on every sentence; the mean says how much the
    embedding space moved on average and the min how far the worst sentence went.

    Args:
        baseline, quantized: encoders with the same tokenizer, each returning
            ``.last_hidden_state``; each runs on ``device`` or, by default, its own device.
        tokenizer: the shared tokenizer.
        sentences: N strings, e.g. :func:`lowbit.data.sentences`.
        batch_size, max_length: as in :func:`sentence_embeddings`.
        progress: show a tqdm bar.

    Returns:
        A :class:`SimilarityResult` (mean, min and float32 ``[N]`` per-sentence cosines).
    """
    a = sentence_embeddings(baseline, tokenizer, sentences, batch_size, max_length, device, progress=progress)
    b = sentence_embeddings(quantized, tokenizer, sentences, batch_size, max_length, device, progress=progress)
    if a.shape != b.shape:
        raise ValueError(f"the models' embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).to(torch.float32)
    result = SimilarityResult(mean=float(cos.double().mean()), min=float(cos.min()), per_sentence=cos)
    log.info("embedding similarity over %d sentences: mean %.6f, min %.6f", cos.numel(), result.mean, result.min)
    return result
