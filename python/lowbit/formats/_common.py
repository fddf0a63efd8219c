"""Pieces shared by the GPTQ and AWQ formats (:mod:`.gptq`, :mod:`.awq`): walking a
model's layers, the config.json of a transformers model, the unquantized tensors,
filling a skeleton back, and AutoAWQ-style packing along the output dimension.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..api import _set_submodule as set_submodule  # noqa: F401  (re-exported to the formats)
from ._io import CheckpointError

__all__ = ["quant_layers", "float_linears", "check_options", "hf_config", "plain_tensors", "fp16_scales",
           "skeleton", "layer_shape", "take", "module_device", "set_submodule", "load_plain", "pack_cols",
           "unpack_cols", "output_embedding_name", "first_match"]


def quant_layers(model: nn.Module, fmt: str) -> dict[str, nn.Module]:
    """``{name: QuantLinear}`` of ``model``; ValueError naming the first W8A8 / FP8 layer
    (``fmt`` holds weight-only integer layers only)."""
    from ..nn import FP8Linear, QuantLinear, W8A8Linear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (W8A8Linear, FP8Linear)):
            raise ValueError(f"layer {name!r} is a {type(m).__name__} (activations quantized too); the {fmt} "
                             "format holds weight-only integer layers (QuantLinear) only: save this model with "
                             "format='lowbit' or format='compressed-tensors'")
        if isinstance(m, QuantLinear):
            out[name] = m
    return out


def float_linears(model: nn.Module) -> list[str]:
    """Names of the linear-like layers (``nn.Linear``, GPT-2 ``Conv1D``) left unquantized."""
    from ..nn import is_linear_like

    return [name for name, m in model.named_modules() if name and is_linear_like(m)]


def output_embedding_name(model: nn.Module) -> str | None:
    """The qualified name of the model's output projection (``lm_head``), if it has one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return "lm_head" if isinstance(getattr(model, "lm_head", None), nn.Module) else None
    return next((n for n, m in model.named_modules() if m is head), None)


def check_options(options: dict[str, Any], known: dict[str, Any], fmt: str) -> dict[str, Any]:
    """``known`` (option -> default) updated from ``options``; ValueError for an unknown
    option. ``None`` values mean "the default"."""
    bad = sorted(set(options) - set(known))
    if bad:
        raise ValueError(f"save_quantized(format={fmt!r}): unknown options {bad}; it takes {sorted(known)}")
    return {k: (options[k] if options.get(k) is not None else v) for k, v in known.items()}


def hf_config(model: nn.Module) -> dict[str, Any]:
    """The model's transformers config as a dict (what ``save_pretrained`` writes to
    config.json), or ``{}`` for a model without one: :func:`lowbit.checkpoint.hf_config_dict`,
    shared by every format."""
    from ..checkpoint import hf_config_dict

    return hf_config_dict(model)


def plain_tensors(model: nn.Module, skip: set[str]) -> dict[str, Tensor]:
    """The model's state dict without the tensors of the modules in ``skip`` (the quantized
    layers, written in the format's own tensors). A tensor tied to an earlier one (GPT-2 /
    Llama ``lm_head.weight`` sharing ``embed_tokens.weight``) is stored once, under the
    earlier name, as transformers does; another view of a shared storage is copied."""
    out: dict[str, Tensor] = {}
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in skip:
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        ident = storage + (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:
            continue
        seen[ident] = key
        out[key] = t.clone() if storage in storages else t
        storages.add(storage)
    return out


def fp16_scales(scales: Tensor, name: str, fmt: str) -> Tensor:
    """``scales`` as float16 (the formats' dtype); ValueError naming the layer when that
    conversion would change a value."""
    if scales.dtype == torch.float16:
        return scales
    half = scales.to(torch.float16)
    if not torch.equal(half.to(scales.dtype), scales):
        raise ValueError(f"layer {name!r}: its {scales.dtype} scales do not fit float16 exactly, and the {fmt} "
                         "format stores float16 scales; quantize with scale_dtype=torch.float16 (the default) "
                         "or save with format='lowbit'")
    return half


def skeleton(config: dict, model: nn.Module | None, options: dict[str, Any]) -> nn.Module:
    """The model to fill: ``model`` (cast to ``options["dtype"]`` when given) or an empty
    one built from ``config`` (:func:`lowbit.checkpoint.model_from_config`)."""
    dtype = options.get("dtype")
    if model is None:
        from ..checkpoint import model_from_config

        return model_from_config(config, dtype=dtype)
    return model.to(dtype) if dtype is not None else model


def layer_shape(model: nn.Module, name: str, file: Path) -> tuple[int, int, nn.Module]:
    """``(in_features, out_features, module)`` of the skeleton's layer ``name``: a
    linear-like module or a QuantLinear; CheckpointError otherwise."""
    from ..nn import QuantLinear, is_linear_like, linear_weight

    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{file}: the checkpoint quantizes {name!r}, but the model has no module of that "
                              "name (is this the right architecture / skeleton?)") from None
    if isinstance(m, QuantLinear):
        return m.in_features, m.out_features, m
    if is_linear_like(m):
        n, k = linear_weight(m).shape
        return k, n, m
    raise CheckpointError(f"{file}: the checkpoint quantizes {name!r}, but in the model it is a "
                          f"{type(m).__name__}, not a linear layer")


def take(tensors: dict[str, Tensor], key: str, shape: tuple[int, ...] | None, kind: str, file: Path,
         consumed: set[str], required: bool = True) -> Tensor | None:
    """``tensors[key]`` checked against ``shape`` and ``kind`` (``"int32"``, ``"int"``,
    ``"float"``); CheckpointError naming the tensor otherwise (or when missing and required)."""
    t = tensors.get(key)
    if t is None:
        if required:
            raise CheckpointError(f"{file}: tensor {key!r} is missing")
        return None
    ok = {"int32": t.dtype == torch.int32,
          "int": not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool,
          "float": t.dtype.is_floating_point}[kind]
    if not ok:
        raise CheckpointError(f"{file}: tensor {key!r} has dtype {t.dtype}, expected {kind}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{file}: tensor {key!r} has shape {list(t.shape)}, expected {list(shape)} for "
                              "this layer")
    consumed.add(key)
    return t


def module_device(m: nn.Module) -> torch.device:
    """The device of ``m``'s first parameter or buffer (CPU when it has none)."""
    t = next(iter(list(m.parameters()) + list(m.buffers())), None)
    return torch.device("cpu") if t is None else t.device


def load_plain(model: nn.Module, tensors: dict[str, Tensor], consumed: set[str], quantized: set[str],
               file: Path) -> None:
    """Load every tensor not in ``consumed`` into ``model`` (whose quantized layers are
    already in place); CheckpointError naming a tensor the model has no place for, one of
    the wrong shape, or a model tensor the checkpoint lacks (tied weights excepted)."""
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()
                if k.rpartition(".")[0] not in quantized}
    rest = {k: v for k, v in tensors.items() if k not in consumed}
    extra = sorted(set(rest) - set(expected))
    if extra:
        raise CheckpointError(f"{file}: tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} have no place in "
                              "the model (a different architecture, or a layer the model does not quantize?)")
    for k, t in rest.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{file}: tensor {k!r} has shape {list(t.shape)}, the model's is "
                                  f"{list(expected[k].shape)}")
    with torch.no_grad():
        for k, t in rest.items():
            expected[k].copy_(t)
    loaded = {expected[k].untyped_storage().data_ptr() for k in rest}
    missing = sorted(k for k, v in expected.items() if k not in rest and v.untyped_storage().data_ptr() not in loaded)
    if missing:
        raise CheckpointError(f"{file}: no tensor for the model's {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                              "(an incomplete checkpoint, or one of another architecture)")


def first_match(dynamic: dict[str, Any], name: str) -> dict | bool | None:
    """GPTQModel's ``dynamic`` rules for module ``name``: the first pattern that matches
    (``re.match``) wins; a ``"-:"`` pattern gives False (left unquantized), a ``"+:"`` or
    plain one its override dict; None when none matches (vLLM's ``get_dynamic_override``)."""
    for pattern, override in (dynamic or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return False
        elif re.match(pattern.removeprefix("+:"), name):
            return dict(override or {})
    return None


def _to_int32(words: Tensor) -> Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_cols(q: Tensor, bits: int, order: tuple[int, ...] | None = None) -> Tensor:
    """Integer codes ``[R, C]`` -> int32 ``[R, C * bits / 32]`` packed along dim 1: word
    ``w`` holds columns ``w * P .. w * P + P - 1`` (``P = 32 / bits``), field ``i``
    (bits ``i * bits ..``) holding column ``w * P + order[i]`` (default ``order[i] = i``).
    ``bits`` divides 32; ``C`` is a multiple of ``P``."""
    r, c = q.shape
    p = 32 // bits
    v = q.to(torch.int64).reshape(r, c // p, p)
    if order is not None:
        v = v[:, :, list(order)]
    shifts = torch.arange(0, 32, bits, device=q.device, dtype=torch.int64)
    return _to_int32((v << shifts).sum(-1))


def unpack_cols(packed: Tensor, bits: int, order: tuple[int, ...] | None = None) -> Tensor:
    """Inverse of :func:`pack_cols`: int32 ``[R, W]`` -> uint8 ``[R, W * 32 / bits]``."""
    r, w = packed.shape
    p = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int64)
    v = ((packed.to(torch.int64) & 0xFFFFFFFF)[:, :, None] >> shifts) & (2**bits - 1)
    if order is not None:
        inverse = [0] * p
        for i, col in enumerate(order):
            inverse[col] = i
        v = v[:, :, inverse]
    return v.reshape(r, w * p).to(torch.uint8)
