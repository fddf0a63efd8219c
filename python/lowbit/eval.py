"""Evaluation against the full-precision baseline: perplexity of causal LMs.

:func:`perplexity` follows the GPTQ/AWQ papers' protocol (Frantar et al., 2022, and the
AWQ code it copies): tokenize the whole text once, cut it into non-overlapping windows
of ``seqlen`` tokens (the model's context if shorter, 2048 at most), drop the tail, and
report ``exp(sum_w nll_w * seqlen / (n_windows * seqlen))`` where ``nll_w`` is window
``w``'s mean next-token cross-entropy (over its ``seqlen - 1`` predictions). Use
:func:`lowbit.data.wikitext2_test_text` for the papers' WikiText-2 text.
"""
from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

__all__ = ["perplexity", "model_context"]

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
