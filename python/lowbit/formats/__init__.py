"""Checkpoint formats: lowbit's own and the ones other tools load.

Each format is a :class:`Format` in :data:`FORMATS`, keyed by the name users pass to
:func:`lowbit.save_quantized` (``format=``) and the CLI's ``--format``:

* ``"lowbit"``: every lowbit layer kind, as ``QuantLinear`` / ``W8A8Linear`` / ``FP8Linear``
  state dicts (:mod:`lowbit.checkpoint`).
* ``"gptq"``: GPTQ's ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` (:mod:`.gptq`).
* ``"awq"``: AutoAWQ's GEMM layout (:mod:`.awq`).
* ``"compressed-tensors"``: llm-compressor's format, what vLLM loads (:mod:`.compressed_tensors`).

All of them are folders of safetensors shards plus ``config.json`` (with a
``quantization_config``) written through :mod:`._io`: atomic writes, a sha256 manifest,
nothing pickled.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

__all__ = ["Format", "FORMATS", "register", "get_format", "format_of_config"]


@dataclass(frozen=True)
class Format:
    """A checkpoint format.

    Attributes:
        name: what users pass as ``format=`` (``"gptq"``).
        quant_methods: the ``quantization_config.quant_method`` values it reads (the first
            is the one it writes).
        save: ``save(model, directory, options) -> None``; raises ValueError (naming the
            layer and what to do) for a layer the format cannot hold.
        load: ``load(directory, config, tensors, model, options) -> nn.Module``: ``config``
            the parsed config.json, ``tensors`` the checkpoint's tensors (name -> CPU
            tensor), ``model`` a skeleton to fill or None (then the format builds one).
    """

    name: str
    quant_methods: tuple[str, ...]
    save: Callable[[nn.Module, Path, dict[str, Any]], None]
    load: Callable[..., nn.Module]


FORMATS: dict[str, Format] = {}

# Modules that register a format when imported (lazily: compressed-tensors is optional).
_MODULES = {"lowbit": "lowbit.checkpoint", "gptq": "lowbit.formats.gptq", "awq": "lowbit.formats.awq",
            "compressed-tensors": "lowbit.formats.compressed_tensors"}


def register(fmt: Format) -> Format:
    """Add ``fmt`` to :data:`FORMATS` (called by each format's module at import)."""
    FORMATS[fmt.name] = fmt
    return fmt


def _load_all() -> None:
    for name, module in _MODULES.items():
        if name not in FORMATS:
            try:
                importlib.import_module(module)
            except ImportError:
                pass   # an optional dependency is missing; get_format says which


def get_format(name: str) -> Format:
    """The :class:`Format` called ``name``; ValueError listing the known ones otherwise."""
    if name not in FORMATS and name in _MODULES:
        importlib.import_module(_MODULES[name])   # surfaces a missing optional dependency
    if name not in FORMATS:
        _load_all()
        raise ValueError(f"unknown checkpoint format {name!r}; known: {', '.join(sorted(_MODULES))}")
    return FORMATS[name]


def format_of_config(config: dict) -> Format:
    """The format that reads a checkpoint with this config.json (by its
    ``quantization_config.quant_method``)."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or "quant_method" not in qc:
        raise ValueError("config.json has no quantization_config with a quant_method: not a quantized "
                         "checkpoint (load the model with transformers, then lowbit.quantize it)")
    method = qc["quant_method"]
    _load_all()
    for fmt in FORMATS.values():
        if method in fmt.quant_methods:
            return fmt
    raise ValueError(f"quantization_config.quant_method {method!r} is not a format lowbit reads; "
                     f"it reads {', '.join(sorted(m for f in FORMATS.values() for m in f.quant_methods))}")
