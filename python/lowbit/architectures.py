"""Where a model keeps its transformer blocks: :func:`find_blocks`, for block-by-block
calibration (GPTQ runs one block at a time on the previous block's outputs).

Known architectures are looked up by ``model.config.model_type`` in :data:`KNOWN_BLOCKS`,
which gives the block list's path inside the *base* model (``LlamaModel``, ``GPT2Model``,
``BertModel``...). A model with a head reaches its base model through
``model.base_model_prefix`` (``"model"``, ``"transformer"``, ``"bert"``...), so each path
is tried both under that prefix and as it is::

    ==================  =====================================================================
    base-model path     model_type
    ==================  =====================================================================
    layers              llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, gemma,
                        gemma2, gemma3_text, phi, phi3, olmo, olmo2, granite, starcoder2,
                        cohere, stablelm, smollm3, deepseek_v3, gpt_neox
    h                   gpt2, gpt_bigcode, gptj, gpt_neo, codegen, bloom, falcon
    decoder.layers      opt
    encoder.layer       bert, roberta, xlm-roberta, camembert, electra, mpnet, deberta, deberta-v2
    transformer.layer   distilbert
    ==================  =====================================================================

So ``LlamaForCausalLM`` -> ``model.layers``, ``LlamaModel`` -> ``layers``,
``GPT2LMHeadModel`` -> ``transformer.h``, ``OPTForCausalLM`` -> ``model.decoder.layers``,
``BertForMaskedLM`` -> ``bert.encoder.layer``, ``RobertaModel`` -> ``encoder.layer``,
``DistilBertForMaskedLM`` -> ``distilbert.transformer.layer``.

Any other model is tried at ``model.layers`` and ``layers`` (the common decoder-only
layout), then by a guess: the longest ``nn.ModuleList`` of modules of one class that each
contain a linear layer (:func:`lowbit.nn.is_linear_like`), lists nested inside another
such list not counted. When the guess is a tie, or nothing fits, :func:`find_blocks`
raises a ValueError saying how to name the block list explicitly (``blocks=``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from .nn import is_linear_like

__all__ = ["find_blocks", "KNOWN_BLOCKS", "ScaleGroup", "SCALE_GROUPS", "scale_groups"]

log = logging.getLogger(__name__)


def _table(groups: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {model_type: path for path, types in groups.items() for model_type in types}


#: ``model_type`` -> dotted path of the block ``nn.ModuleList`` inside the base model.
KNOWN_BLOCKS: dict[str, str] = _table({
    "layers": ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
               "gemma3_text", "phi", "phi3", "olmo", "olmo2", "granite", "starcoder2", "cohere", "stablelm",
               "smollm3", "deepseek_v3", "gpt_neox"),
    "h": ("gpt2", "gpt_bigcode", "gptj", "gpt_neo", "codegen", "bloom", "falcon"),
    "decoder.layers": ("opt",),
    "encoder.layer": ("bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet", "deberta",
                      "deberta-v2"),
    "transformer.layer": ("distilbert",),
})

# Tried for any model: the decoder-only layout of most Hugging Face causal LMs.
_COMMON_PATHS = ("model.layers", "layers")

_HOW = ('pass the dotted path of the nn.ModuleList that holds the blocks, e.g. '
        'lowbit.quantize(model, config, method="gptq", calibration=..., blocks="model.layers")')


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """The transformer blocks of ``model``: ``(qualified name, nn.ModuleList)``.

    Args:
        model: a Hugging Face model (with or without its head) or any ``nn.Module``.
        blocks: the dotted path of the block list inside ``model`` (``"model.layers"``,
            ``"transformer.h"``), to skip the lookup; it must name a non-empty
            ``nn.ModuleList``.

    Returns:
        ``(name, module_list)`` with ``model.get_submodule(name) is module_list``.

    Raises:
        ValueError: ``blocks`` does not name a non-empty ``nn.ModuleList`` of ``model``, or
            (without ``blocks``) the model is not in :data:`KNOWN_BLOCKS` and no single
            ModuleList looks like its blocks. The message says how to pass ``blocks=``.
    """
    if blocks is not None:
        return blocks, _resolve(model, blocks)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    paths = []
    if model_type in KNOWN_BLOCKS:
        paths += _with_prefix(model, KNOWN_BLOCKS[model_type])
    known = len(paths)
    paths += [p for p in _COMMON_PATHS if p not in paths]
    for i, path in enumerate(paths):
        found = _get(model, path)
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            continue
        if i >= known and not _looks_like_blocks(found):
            continue
        log.debug("find_blocks: %s (%s): %d blocks at %r", type(model).__name__, model_type, len(found), path)
        return path, found

    candidates = _candidates(model)
    longest = max((len(m) for _, m in candidates), default=0)
    best = [(n, m) for n, m in candidates if len(m) == longest]
    where = f"{type(model).__name__}" + (f" (model_type {model_type!r})" if model_type else "")
    if len(best) == 1:
        name, found = best[0]
        log.info("find_blocks: %s is not a known architecture; using the %d %s blocks at %r "
                 "(pass blocks= to choose others)", where, len(found), type(found[0]).__name__, name)
        return name, found
    if best:
        raise ValueError(
            f"find_blocks: cannot tell which nn.ModuleList holds the transformer blocks of {where}: "
            f"{_describe(best)} are equally long; {_HOW}")
    lists = _module_lists(model)
    seen = f"; its ModuleLists: {_describe(lists)}" if lists else "; it has no nn.ModuleList"
    raise ValueError(
        f"find_blocks: found no transformer blocks in {where} (looked for an nn.ModuleList of same-class "
        f"modules that contain linear layers{seen}); {_HOW}")


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _with_prefix(model: nn.Module, path: str) -> list[str]:
    """``path`` under the base model's attribute (``model.layers``), then as it is."""
    prefix = getattr(model, "base_model_prefix", "")
    if isinstance(prefix, str) and prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return [f"{prefix}.{path}", path]
    return [path]


def _resolve(model: nn.Module, path: str) -> nn.ModuleList:
    if not isinstance(path, str):
        raise TypeError(f"find_blocks: blocks must be a dotted path string such as 'model.layers', "
                        f"got {type(path).__name__}")
    found = _get(model, path)
    lists = _module_lists(model)
    hint = f" (its ModuleLists: {_describe(lists)})" if lists else ""
    if found is None:
        raise ValueError(f"find_blocks: blocks={path!r} names no submodule of {type(model).__name__}{hint}; "
                         f"{_HOW}")
    if not isinstance(found, nn.ModuleList):
        raise ValueError(f"find_blocks: blocks={path!r} is a {type(found).__name__}, not an nn.ModuleList"
                         f"{hint}; {_HOW}")
    if len(found) == 0:
        raise ValueError(f"find_blocks: blocks={path!r} is an empty nn.ModuleList; {_HOW}")
    return found


def _looks_like_blocks(lst: nn.ModuleList) -> bool:
    """Non-empty, one class throughout, each element containing a linear layer below it."""
    if len(lst) == 0 or len({type(m) for m in lst}) != 1:
        return False
    return all(any(is_linear_like(sub) for sub in block.modules() if sub is not block) for block in lst)


def _module_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


def _candidates(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """ModuleLists that look like blocks, not nested inside another one that does."""
    found = [(n, m) for n, m in _module_lists(model) if _looks_like_blocks(m)]
    return [(n, m) for n, m in found
            if not any(o != n and (o == "" or n.startswith(o + ".")) for o, _ in found)]


def _describe(lists: list[tuple[str, nn.ModuleList]], limit: int = 8) -> str:
    parts = [f"{n!r} ({len(m)} x {type(m[0]).__name__})" for n, m in lists[:limit]]
    return ", ".join(parts) + (f" and {len(lists) - limit} more" if len(lists) > limit else "")


# -- scaling groups (AWQ, SmoothQuant) ---------------------------------------------------

@dataclass(frozen=True)
class ScaleGroup:
    """Linear layers of one block that read the same input, and the module that produces
    that input, into which per-input-channel scales are folded (``prev``'s output divided
    by ``s``, the linears' input columns multiplied by ``s``: the block computes the same
    function). Names are relative to the block.

    ``prev`` is a norm (its weight, and bias if any, divided by ``s``) or a linear layer
    (its output rows divided by ``s``): the latter only where everything between the two
    commutes with a positive per-channel scale (attention's ``softmax(QK^T) V`` for
    v_proj -> o_proj, ``act(gate) * up`` for up_proj -> down_proj, ReLU for OPT's fc1 -> fc2).
    """

    prev: str
    linears: tuple[str, ...]


_LLAMA_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
)
_OPT_GROUPS = (
    ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",)),
    ScaleGroup("final_layer_norm", ("fc1",)),
    ScaleGroup("fc1", ("fc2",)),
)
# GPT-2: c_attn's q/k/v are one Conv1D, and c_fc -> GELU -> c_proj does not commute with
# a scale: only the two norm-fed groups.
_GPT2_GROUPS = (
    ScaleGroup("ln_1", ("attn.c_attn",)),
    ScaleGroup("ln_2", ("mlp.c_fc",)),
)
# BERT-family blocks are post-norm: the LayerNorm output that feeds q/k/v and the MLP is
# also the residual, so a scale folded into it would change the residual stream. Only
# value -> attention output commutes.
_BERT_GROUPS = (ScaleGroup("attention.self.value", ("attention.output.dense",)),)
_DISTILBERT_GROUPS = (ScaleGroup("attention.v_lin", ("attention.out_lin",)),)

#: ``model_type`` -> the scaling groups of one block (AWQ, SmoothQuant).
SCALE_GROUPS: dict[str, tuple[ScaleGroup, ...]] = {
    **{t: _LLAMA_GROUPS for t in ("llama", "mistral", "qwen2", "qwen3", "granite", "smollm3", "gemma")},
    "opt": _OPT_GROUPS,
    "gpt2": _GPT2_GROUPS,
    **{t: _BERT_GROUPS for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
    "distilbert": _DISTILBERT_GROUPS,
}


def scale_groups(model: nn.Module, groups=None) -> tuple[ScaleGroup, ...]:
    """The scaling groups of ``model``'s blocks: ``groups`` if given (a sequence of
    :class:`ScaleGroup` or ``(prev, [linears])`` pairs), else :data:`SCALE_GROUPS` by
    ``model.config.model_type``, adjusted to the config (OPT: only pre-norm blocks fold into
    their norms, only ReLU lets fc1 absorb fc2's scales).

    Raises:
        ValueError: an unknown architecture without ``groups`` (the message shows how to
            pass them).
    """
    if groups is not None:
        out = []
        for g in groups:
            if isinstance(g, ScaleGroup):
                out.append(g)
            else:
                prev, linears = g
                out.append(ScaleGroup(str(prev), tuple(linears)))
        return tuple(out)
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SCALE_GROUPS:
        raise ValueError(
            f"lowbit: no scaling groups are known for {type(model).__name__} (model_type {model_type!r}; known: "
            f"{', '.join(sorted(SCALE_GROUPS))}); pass them, relative to a block, e.g. groups=[('input_layernorm', "
            "['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj']), ('post_attention_layernorm', "
            "['mlp.gate_proj', 'mlp.up_proj'])], or groups=[] to quantize without scaling")
    found = SCALE_GROUPS[model_type]
    if model_type == "opt":
        keep = []
        for g in found:
            if g.prev.endswith("layer_norm") and not getattr(cfg, "do_layer_norm_before", True):
                continue    # post-norm OPT (350m): the norm output is the residual too
            if g.prev == "fc1" and getattr(cfg, "activation_function", "relu") != "relu":
                continue
            keep.append(g)
        found = tuple(keep)
    return found
