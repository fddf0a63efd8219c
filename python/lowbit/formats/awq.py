"""AutoAWQ's GEMM checkpoint format (what vLLM's ``awq`` / ``awq_marlin`` and
transformers' AWQ integration load): ``format="awq"``.

Each quantized linear layer ``<name>`` (``K`` inputs, ``N`` outputs, ``G = K /
group_size`` groups; 4-bit codes only) is stored as

* ``<name>.qweight``: int32 ``[K, N / 8]``: codes packed along N, eight per word in
  AutoAWQ's interleaved order: field ``i`` (bits ``4i .. 4i+3``) of word ``w`` holds
  output column ``8w + AWQ_ORDER[i]``, ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``
  (AutoAWQ ``awq/utils/packing_utils.py``; unpacking reorders by
  ``AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)``).
* ``<name>.qzeros``: int32 ``[G, N / 8]``: zero points, packed the same way and stored as
  they are (no ``- 1``).
* ``<name>.scales``: float16 ``[G, N]``.
* ``<name>.bias`` when the layer has one.

``W[n, k] = (q[k, n] - z[k // group_size, n]) * scales[k // group_size, n]``; there is no
``g_idx``, so act-order layers cannot be written. Every other tensor is stored under its
own name (tied weights once).

``quantization_config``: ``{"quant_method": "awq", "bits": 4, "group_size", "zero_point":
true, "version": "gemm", "modules_to_not_convert": [...]}``; ``modules_to_not_convert``
lists the linear layers left in float (loaders skip a module whose name contains an
entry). One group size for the whole model (-1: per-channel, AutoAWQ's meaning).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import Format, register
from ._common import (check_options, float_linears, fp16_scales, hf_config, layer_shape, load_plain, module_device,
                      pack_cols, plain_tensors, quant_layers, set_submodule, skeleton, take, unpack_cols)
from ._io import CheckpointError, save_folder

__all__ = ["save", "load", "AWQ_ORDER", "AWQ_REVERSE_ORDER"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
BITS = 4

_OPTIONS = {"max_shard_bytes": None}


def _layer_tensors(name: str, layer) -> dict[str, Tensor]:
    k, n = layer.in_features, layer.out_features
    if layer.bits != BITS:
        raise ValueError(f"layer {name!r} has {layer.bits}-bit codes; the AWQ GEMM format holds 4-bit codes only: "
                         "save with format='gptq' or format='lowbit'")
    if n % 8:
        raise ValueError(f"layer {name!r} has {n} outputs; the AWQ format packs 8 outputs per int32 word, so "
                         "out_features must be a multiple of 8 (save with format='lowbit')")
    g_idx = layer.g_idx
    if not torch.equal(g_idx.long(), torch.div(torch.arange(k, device=g_idx.device), layer.group_size,
                                               rounding_mode="floor")):
        raise ValueError(f"layer {name!r} is act-order (GPTQ desc_act: groups of permuted input features); the "
                         "AWQ format has no g_idx to hold that: save with format='gptq' (desc_act) or "
                         "format='lowbit'")
    _, scales, zeros = layer._gptq_tensors()
    codes = layer.codes().t()                                    # [K, N], input order
    out = {f"{name}.qweight": pack_cols(codes, BITS, AWQ_ORDER),
           f"{name}.qzeros": pack_cols(zeros, BITS, AWQ_ORDER),
           f"{name}.scales": fp16_scales(scales, name, "AWQ")}
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach()
    return out


def save(model: nn.Module, directory: Path, options: dict[str, Any]) -> None:
    """Write ``model`` in AutoAWQ's GEMM format (see the module docstring). Option:
    ``max_shard_bytes``.

    Raises ValueError naming the layer for one the format cannot hold: a W8A8 / FP8
    layer, codes other than 4-bit, an act-order layer, out_features not a multiple of 8,
    scales that do not fit float16, or group sizes that differ between layers.
    """
    opts = check_options(options, _OPTIONS, "awq")
    layers = quant_layers(model, "AWQ")
    if not layers:
        raise ValueError("save_quantized(format='awq'): the model has no QuantLinear layer; quantize it first "
                         "(lowbit.quantize with a 4-bit weight-only scheme)")
    sizes = {name: -1 if m.per_channel else m.group_size for name, m in layers.items()}
    first = next(iter(sizes))
    for name, gs in sizes.items():
        if gs != sizes[first]:
            raise ValueError(f"layer {name!r} has group size {gs} but {first!r} has {sizes[first]} (-1: "
                             "per-channel); the AWQ config has one group_size for the model: save with "
                             "format='gptq' (per-layer 'dynamic' rules) or format='lowbit'")
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        tensors.update(_layer_tensors(name, layer))
    skipped = float_linears(model)
    for name in layers:
        clash = [s for s in skipped if s in name]
        if clash:
            raise ValueError(f"layer {name!r} is quantized but its name contains {clash[0]!r}, a layer left in "
                             "float that modules_to_not_convert must list (loaders match names by substring): "
                             "save with format='gptq' or format='lowbit'")
    qc = {"quant_method": "awq", "bits": BITS, "group_size": sizes[first], "zero_point": True, "version": "gemm",
          "modules_to_not_convert": skipped or None}
    tensors.update(plain_tensors(model, set(layers)))
    config = {**hf_config(model), "quantization_config": qc}
    kwargs = {} if opts["max_shard_bytes"] is None else {"max_shard_bytes": int(opts["max_shard_bytes"])}
    save_folder(directory, tensors, config, **kwargs)


def _read_layer(name: str, k: int, n: int, tensors: dict[str, Tensor], group_size: int, file: Path,
                consumed: set[str], bias_dtype: torch.dtype | None):
    from ..nn import QuantLinear

    if n % 8:
        raise CheckpointError(f"{file}: layer {name!r} has {n} outputs, not a multiple of 8 (AWQ packs 8 per word)")
    per_channel = group_size == -1 or group_size > k
    gs = k if per_channel else group_size
    g = -(-k // gs)
    qweight = take(tensors, f"{name}.qweight", (k, n // 8), "int32", file, consumed)
    qzeros = take(tensors, f"{name}.qzeros", (g, n // 8), "int32", file, consumed)
    scales = take(tensors, f"{name}.scales", (g, n), "float", file, consumed)
    bias = take(tensors, f"{name}.bias", (n,), "float", file, consumed, required=False)
    codes = unpack_cols(qweight, BITS, AWQ_ORDER).t().contiguous()   # [N, K]
    zeros = unpack_cols(qzeros, BITS, AWQ_ORDER).t()                 # [N, G]
    if bias is not None and bias_dtype is not None:
        bias = bias.to(bias_dtype)
    symmetric = bool((zeros == 2 ** (BITS - 1)).all())
    return QuantLinear.from_codes(codes, scales.t(), zeros, BITS, None if per_channel else gs,
                                  symmetric=symmetric, bias=bias)


def load(directory: Path, config: dict, tensors: dict[str, Tensor], model: nn.Module | None,
         options: dict[str, Any]) -> nn.Module:
    """Read an AutoAWQ GEMM checkpoint into QuantLinear layers on ``model`` (or a skeleton
    built from ``config``): every ``<name>.qweight`` becomes a QuantLinear. CheckpointError
    names a missing tensor or one of the wrong shape or dtype, and a config lowbit cannot
    read (another version than GEMM, bits other than 4, no zero points)."""
    file = Path(directory)
    qc = config["quantization_config"]
    where = file / "config.json"
    version = str(qc.get("version") or qc.get("format") or "gemm").lower()
    if version != "gemm":
        raise CheckpointError(f"{where}: AWQ version {version!r}; lowbit reads AutoAWQ's GEMM layout only")
    try:
        bits = int(qc.get("bits", qc.get("w_bit", BITS)))
        group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: quantization_config has a non-integer bits / group_size ({e})") from e
    if bits != BITS:
        raise CheckpointError(f"{where}: AWQ bits={bits}; the GEMM layout lowbit reads is 4-bit")
    if group_size == 0 or group_size < -1:
        raise CheckpointError(f"{where}: AWQ group_size {group_size} is not -1 or a positive number")
    if qc.get("zero_point", True) is False:
        raise CheckpointError(f"{where}: AWQ zero_point=false checkpoints are not supported (AutoAWQ's GEMM layout "
                              "always stores qzeros)")
    model = skeleton(config, model, options)
    names = [key[: -len(".qweight")] for key in tensors if key.endswith(".qweight")]
    consumed: set[str] = set()
    for name in names:
        k, n, old = layer_shape(model, name, file)
        bias_dtype = old.bias.dtype if getattr(old, "bias", None) is not None else None
        new = _read_layer(name, k, n, tensors, group_size, file, consumed, bias_dtype)
        set_submodule(model, name, new.to(module_device(old)))
    load_plain(model, tensors, consumed, set(names), file)
    if options.get("device") is not None:
        model = model.to(options["device"])
    return model.eval()


register(Format("awq", ("awq",), save, load))
