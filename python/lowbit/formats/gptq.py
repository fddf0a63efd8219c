"""The GPTQ checkpoint format (AutoGPTQ / GPTQModel; what vLLM's ``gptq`` /
``gptq_marlin`` and transformers' GPTQ integration load): ``format="gptq"``.

Each quantized linear layer ``<name>`` (``K`` inputs, ``N`` outputs, ``G`` groups) is
stored as

* ``<name>.qweight``: int32 ``[K * bits / 32, N]``: the codes packed along K in the input
  order (the layout of :mod:`lowbit.reference.packing`, AutoGPTQ's: code ``k`` in stream
  bits ``k * bits ..``, lowest first; 3-bit codes straddle words).
* ``<name>.qzeros``: int32 ``[G, N * bits / 32]``: zero points packed along N the same
  way. ``checkpoint_format="gptq"`` (v1, the default) stores ``z - 1`` in each field
  (vLLM's and ExLlama's kernels add 1 back); ``"gptq_v2"`` (GPTQModel) stores ``z``.
* ``<name>.scales``: float16 ``[G, N]``.
* ``<name>.g_idx``: int32 ``[K]``: the group of each input feature. ``arange(K) //
  group_size`` without act-order; with it (``desc_act``) input feature ``perm[j]`` is in
  group ``j // group_size``, and loaders sort the rows by ``g_idx`` (vLLM:
  ``argsort(g_idx)``). lowbit's ``perm`` is that sort, so each group has ``group_size``
  features.
* ``<name>.bias`` when the layer has one.

The weight is ``W[n, k] = (q[n, k] - z[g_idx[k], n]) * scales[g_idx[k], n]``. Every other
tensor of the model is stored under its own name (tied weights once).

``quantization_config``: ``quant_method "gptq"``, ``bits``, ``group_size`` (-1:
per-channel), ``desc_act``, ``sym`` (loaders then assume ``z = 2**(bits-1)``), ``lm_head``,
``checkpoint_format``, ``true_sequential``, ``damp_percent``, ``static_groups``,
``pack_dtype``, ``meta``, and GPTQModel's ``dynamic``: ``{regex: {...}}`` rules matched
(``re.match``) against module names, first match winning, which vLLM also reads: a layer
whose bits / group size / sym / desc_act differ from the global values gets a
``"+:^name$"`` rule, a linear layer left unquantized a ``"-:^name$"`` one. (transformers'
``GPTQConfig`` drops ``dynamic``, so a model with one scheme for every layer is the
portable case; vLLM applies the rules to its own module names, e.g. fused ``qkv_proj``.)
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from . import Format, register
from ._common import (check_options, first_match, float_linears, fp16_scales, hf_config, layer_shape, load_plain,
                      module_device, output_embedding_name, plain_tensors, quant_layers, set_submodule, skeleton, take)
from ._io import CheckpointError, save_folder

__all__ = ["save", "load", "BITS", "CHECKPOINT_FORMATS"]

BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")

_OPTIONS = {"checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True, "static_groups": False,
            "max_shard_bytes": None}
_SPEC_KEYS = ("bits", "group_size", "sym", "desc_act")


def _layer_tensors(name: str, layer, v1: bool) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The GPTQ tensors of one QuantLinear and its spec (bits, group_size, sym, desc_act)."""
    bits, k, n = layer.bits, layer.in_features, layer.out_features
    if bits not in BITS:
        raise ValueError(f"layer {name!r} has {bits}-bit codes; the GPTQ format holds {BITS} bits: save with "
                         "format='lowbit'")
    if (k * bits) % 32 or (n * bits) % 32:
        raise ValueError(f"layer {name!r} ({k} inputs, {n} outputs) cannot be packed in GPTQ's int32 words at "
                         f"{bits} bits: in_features * bits and out_features * bits must be multiples of 32 "
                         "(save with format='lowbit')")
    qweight, scales, zeros = layer._gptq_tensors()   # the stored (possibly permuted) order
    g_idx = layer.g_idx
    trivial = torch.div(torch.arange(k, device=g_idx.device), layer.group_size, rounding_mode="floor")
    desc_act = not torch.equal(g_idx.long(), trivial)
    if layer.perm is not None:   # GPTQ stores the input order; g_idx says where each row's group is
        qweight = ops.pack_int32(layer.codes().t().contiguous(), bits)
    mid = 2 ** (bits - 1)
    sym = bool(layer.symmetric and bool((zeros == mid).all()))
    z = zeros.to(torch.int64)
    if v1:
        if zeros.numel() and int(zeros.min()) == 0:
            raise ValueError(f"layer {name!r} has zero points equal to 0, which the v1 GPTQ format cannot hold "
                             "(it stores z - 1; vLLM's kernels would read 2**bits): save with "
                             "checkpoint_format='gptq_v2', or format='lowbit'")
        z = z - 1
    qzeros = ops.pack_int32(z.t().contiguous().to(torch.uint8), bits).t().contiguous()
    out = {f"{name}.qweight": qweight, f"{name}.qzeros": qzeros,
           f"{name}.scales": fp16_scales(scales, name, "GPTQ"), f"{name}.g_idx": g_idx.to(torch.int32)}
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach()
    spec = {"bits": bits, "group_size": -1 if layer.per_channel else layer.group_size, "sym": sym,
            "desc_act": desc_act}
    return out, spec


def save(model: nn.Module, directory: Path, options: dict[str, Any]) -> None:
    """Write ``model`` in the GPTQ format (see the module docstring).

    Options: ``checkpoint_format`` (``"gptq"``, v1, default; ``"gptq_v2"``),
    ``damp_percent`` / ``true_sequential`` / ``static_groups`` (recorded in the config;
    they describe how the weights were made), ``max_shard_bytes``.

    Raises ValueError naming the layer for one the format cannot hold: a W8A8 / FP8
    layer, a bit width outside 2/3/4/8, widths that do not pack into int32 words, zero
    points of 0 in v1, scales that do not fit float16.
    """
    from .. import __version__

    opts = check_options(options, _OPTIONS, "gptq")
    fmt = opts["checkpoint_format"]
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"save_quantized(format='gptq'): checkpoint_format must be one of {CHECKPOINT_FORMATS}, "
                         f"got {fmt!r}")
    layers = quant_layers(model, "GPTQ")
    if not layers:
        raise ValueError("save_quantized(format='gptq'): the model has no QuantLinear layer; quantize it first "
                         "(lowbit.quantize with a weight-only scheme)")
    tensors: dict[str, Tensor] = {}
    specs: dict[str, dict] = {}
    for name, layer in layers.items():
        t, specs[name] = _layer_tensors(name, layer, fmt == "gptq")
        tensors.update(t)
    # The most common spec is the global one; the others become GPTQModel "dynamic" rules.
    base = dict(zip(_SPEC_KEYS, Counter(tuple(s[k] for k in _SPEC_KEYS) for s in specs.values())
                    .most_common(1)[0][0]))
    head = output_embedding_name(model)
    dynamic: dict[str, dict] = {}
    for name in float_linears(model):
        if name != head:
            dynamic[f"-:^{re.escape(name)}$"] = {}
    for name, spec in specs.items():
        diff = {k: v for k, v in spec.items() if v != base[k]}
        if diff:
            dynamic[f"+:^{re.escape(name)}$"] = diff
    qc: dict[str, Any] = {"quant_method": "gptq", **base, "lm_head": head in layers, "checkpoint_format": fmt,
                          "true_sequential": bool(opts["true_sequential"]),
                          "damp_percent": float(opts["damp_percent"]), "static_groups": bool(opts["static_groups"]),
                          "pack_dtype": "int32", "meta": {"quantizer": [f"lowbit:{__version__}"]}}
    if dynamic:
        qc["dynamic"] = dynamic
    tensors.update(plain_tensors(model, set(layers)))
    config = {**hf_config(model), "quantization_config": qc}
    kwargs = {} if opts["max_shard_bytes"] is None else {"max_shard_bytes": int(opts["max_shard_bytes"])}
    save_folder(directory, tensors, config, **kwargs)


def _read_layer(name: str, k: int, n: int, tensors: dict[str, Tensor], spec: dict, v1: bool, file: Path,
                consumed: set[str], bias_dtype: torch.dtype | None):
    from ..nn import QuantLinear

    bits, group_size = int(spec["bits"]), int(spec["group_size"])
    if bits not in BITS:
        raise CheckpointError(f"{file}: layer {name!r} has bits={bits}; GPTQ checkpoints have {BITS}")
    if (k * bits) % 32 or (n * bits) % 32:
        raise CheckpointError(f"{file}: layer {name!r} ({k} inputs, {n} outputs) does not pack into int32 words "
                              f"at {bits} bits")
    if group_size == 0 or group_size < -1:
        raise CheckpointError(f"{file}: layer {name!r}: group_size {group_size} is not -1 or a positive number")
    per_channel = group_size == -1 or group_size > k   # one group either way
    gs = k if per_channel else group_size
    g = -(-k // gs)
    qweight = take(tensors, f"{name}.qweight", (k * bits // 32, n), "int32", file, consumed)
    qzeros = take(tensors, f"{name}.qzeros", (g, n * bits // 32), "int32", file, consumed)
    scales = take(tensors, f"{name}.scales", (g, n), "float", file, consumed)
    g_idx = take(tensors, f"{name}.g_idx", (k,), "int", file, consumed, required=False)
    bias = take(tensors, f"{name}.bias", (n,), "float", file, consumed, required=False)
    codes = ops.unpack_int32(qweight, bits, k).t()                         # [N, K], input order
    zeros = ops.unpack_int32(qzeros.t().contiguous(), bits, n).to(torch.int32)   # [N, G]
    if v1:
        zeros = (zeros + 1) % 2**bits   # per field, as GPTQModel's v1 -> v2 decoding
    trivial = torch.div(torch.arange(k), gs, rounding_mode="floor")
    perm = None
    if g_idx is not None and not torch.equal(g_idx.long(), trivial):
        g_idx = g_idx.long()
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= g:
            raise CheckpointError(f"{file}: tensor {name + '.g_idx'!r} has groups outside 0..{g - 1}")
        perm = torch.sort(g_idx, stable=True).indices
        if not torch.equal(g_idx[perm], trivial):
            counts = torch.bincount(g_idx, minlength=g).tolist()
            raise CheckpointError(f"{file}: tensor {name + '.g_idx'!r} does not give every group {gs} input "
                                  f"features (counts {counts[:8]}{' ...' if g > 8 else ''}); lowbit's act-order "
                                  "layers need groups of group_size consecutive features after sorting")
        codes = codes[:, perm]
    mid = 2 ** (bits - 1)
    symmetric = bool(spec.get("sym", True)) and bool((zeros == mid).all())
    if bias is not None and bias_dtype is not None:
        bias = bias.to(bias_dtype)
    return QuantLinear.from_codes(codes.contiguous(), scales.t(), zeros, bits, None if per_channel else gs,
                                  symmetric=symmetric, bias=bias, perm=perm)


def load(directory: Path, config: dict, tensors: dict[str, Tensor], model: nn.Module | None,
         options: dict[str, Any]) -> nn.Module:
    """Read a GPTQ checkpoint (``checkpoint_format`` ``"gptq"`` or ``"gptq_v2"``, with
    ``dynamic`` per-module rules) into QuantLinear layers on ``model`` (or a skeleton
    built from ``config``). Every ``<name>.qweight`` becomes a QuantLinear; act-order
    layers get ``perm`` from ``g_idx``. CheckpointError names a missing tensor or one of
    the wrong shape or dtype."""
    file = Path(directory)
    qc = config["quantization_config"]
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"{file / 'config.json'}: GPTQ checkpoint_format {fmt!r}; lowbit reads "
                              f"{CHECKPOINT_FORMATS} (re-save it with GPTQModel in one of those)")
    try:
        base = {"bits": int(qc["bits"]), "group_size": int(qc.get("group_size", 128)), "sym": bool(qc.get("sym", True))}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file / 'config.json'}: quantization_config needs integer 'bits' and "
                              f"'group_size' ({e})") from e
    dynamic = qc.get("dynamic") or {}
    model = skeleton(config, model, options)
    names = [key[: -len(".qweight")] for key in tensors if key.endswith(".qweight")]
    consumed: set[str] = set()
    for name in names:
        rule = first_match(dynamic, name)
        if rule is False:
            raise CheckpointError(f"{file}: tensor {name + '.qweight'!r} is present but the config's dynamic rules "
                                  "leave that layer unquantized")
        spec = {**base, **{k: v for k, v in (rule or {}).items() if k in base}}
        k, n, old = layer_shape(model, name, file)
        bias_dtype = old.bias.dtype if getattr(old, "bias", None) is not None else None
        new = _read_layer(name, k, n, tensors, spec, fmt == "gptq", file, consumed, bias_dtype)
        set_submodule(model, name, new.to(module_device(old)))
    load_plain(model, tensors, consumed, set(names), file)
    if options.get("device") is not None:
        model = model.to(options["device"])
    return model.eval()


register(Format("gptq", ("gptq",), save, load))
