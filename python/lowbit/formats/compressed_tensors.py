"""The compressed-tensors format: what llm-compressor writes and vLLM and transformers load.

A checkpoint is a transformers model folder whose ``config.json`` has a
``quantization_config`` with ``quant_method: "compressed-tensors"``: ``config_groups``
(each a ``QuantizationScheme``: ``targets``, ``weights`` / ``input_activations``
``QuantizationArgs``, ``format``), ``ignore`` (layers left in full precision),
``format`` (the model's, ``"mixed-precision"`` when the groups differ),
``quantization_status: "compressed"``, ``version``. Per quantized layer ``<name>``:

``pack-quantized`` (int weights, 1..8 bits, activations not quantized):
    ``<name>.weight_packed`` int32 ``[N, ceil(K * bits / 32)]`` (codes ``q + 2**(bits-1)``
    packed along K as one little-endian bit stream per row: the bit layout of
    :mod:`lowbit.reference.packing`, so it is ``QuantLinear.qweight.t()``),
    ``<name>.weight_scale`` ``[N, G]`` (group), ``[N, 1]`` (channel) or ``[1]`` (tensor),
    ``<name>.weight_zero_point`` int32 ``[ceil(N * bits / 32), G]`` (asymmetric only:
    signed zero points plus ``2**(bits-1)`` packed along N), ``<name>.weight_shape`` int64
    ``[2]`` = ``(N, K)``; older checkpoints with ``actorder: "group"`` also have
    ``<name>.weight_g_idx`` int32 ``[K]``.
``int-quantized`` / ``float-quantized`` / ``naive-quantized`` (8-bit weights):
    ``<name>.weight`` int8 or float8_e4m3fn ``[N, K]``, ``<name>.weight_scale`` ``[N, 1]``
    or ``[1]``, ``<name>.input_scale`` ``[1]`` for static activation scales.

``W = (q - zero_point) * scale`` with signed codes ``q`` (``[-2**(bits-1), 2**(bits-1) - 1]``;
zero point 0 when symmetric). Biases and unquantized tensors keep their transformers names.

Mapping to lowbit's layers:

* :class:`~lowbit.nn.QuantLinear` <-> ``pack-quantized``: ``int`` weights, ``strategy``
  ``group`` (``group_size``) or ``channel``, ``symmetric`` (zeros all ``2**(bits-1)``) or
  not; no activation quantization. Import also takes ``tensor`` (one scale, repeated per
  channel), 8-bit ``naive-quantized`` / ``int-quantized`` weight-only layers and legacy
  ``actorder: "group"`` (``weight_g_idx``, held as ``QuantLinear.perm``). Export needs
  groups that divide ``in_features`` and no ``perm``: compressed-tensors 0.19 removed
  ``actorder="group"`` (save act-order models as ``format="gptq"``).
* :class:`~lowbit.nn.W8A8Linear` <-> ``int-quantized``: int8 symmetric per-channel weights;
  activations int8 symmetric ``token`` + ``dynamic: true`` (dynamic) or ``tensor`` +
  ``dynamic: false`` with ``input_scale`` (static). Not the LLM.int8 outlier split.
* :class:`~lowbit.nn.FP8Linear` <-> ``float-quantized``: float8 e4m3 weights (``channel`` or
  ``tensor`` scales), float8 activations (``token`` dynamic, or ``tensor`` static).

Export builds each layer's state dict (the dequantized weight with its scales and zero
points) and lets compressed-tensors' own compressors (``PackedQuantizationCompressor``,
``IntQuantizationCompressor``, ``FloatQuantizationCompressor``) quantize and pack it, then
checks that their output holds exactly the layer's codes; the ``quantization_config`` is
the one ``ModelCompressor.update_config`` writes for a model whose layers carry those
schemes (``QuantizationConfig.from_pretrained``: one config group per distinct scheme,
unquantized linears in ``ignore``). Export needs the ``compressed-tensors`` package;
import reads the files itself and does not.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import hf_config_dict
from . import Format, register
from ._io import CheckpointError, save_folder

__all__ = ["save", "load", "QUANT_METHOD"]

QUANT_METHOD = "compressed-tensors"
_FP8 = torch.float8_e4m3fn
# formats lowbit reads: pack-quantized (packed int codes) and the three that store 8-bit
# weights as such (int8 / float8 tensors)
_PACKED = "pack-quantized"
_UNPACKED = ("int-quantized", "float-quantized", "naive-quantized")


# -- export -------------------------------------------------------------------------------


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:
        raise ImportError("format='compressed-tensors' needs the compressed-tensors package to write checkpoints "
                          "(pip install compressed-tensors); loading them does not") from e
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus

    return BaseCompressor, ModelCompressor, QuantizationScheme, QuantizationStatus


def _model_dtype(model: nn.Module, quantized: set[str]) -> torch.dtype:
    """The float dtype of the model's unquantized parameters (what loaders hold scales in)."""
    for name, p in model.named_parameters():
        if p.dtype.is_floating_point and name.rpartition(".")[0] not in quantized:
            return p.dtype
    return torch.float32


def _scale_dtype(dtype: torch.dtype, model_dtype: torch.dtype) -> str | None:
    # Loaders allocate scales in the model's dtype unless the args name one: name it when it
    # differs, so float16 scales in a bfloat16 model load without rounding.
    return None if dtype == model_dtype else str(dtype)


def _weight_only_args(name: str, layer, model_dtype: torch.dtype) -> dict:
    """QuantizationArgs (as a dict) and the state dict compressed-tensors compresses, for a
    QuantLinear."""
    from ..nn import QuantLinear

    assert isinstance(layer, QuantLinear)
    if layer.perm is not None:
        raise ValueError(f"save_quantized(format='compressed-tensors'): layer {name!r} has act-order (perm): "
                         "compressed-tensors 0.19 removed actorder='group' (g_idx), so it cannot hold permuted "
                         "groups; save this model with format='gptq' (desc_act), or quantize without act_order")
    k = layer.in_features
    if not layer.per_channel and k % layer.group_size != 0:
        raise ValueError(f"save_quantized(format='compressed-tensors'): layer {name!r} has in_features {k}, not a "
                         f"multiple of its group_size {layer.group_size}; compressed-tensors (and vLLM) need whole "
                         "groups: quantize it with a group size that divides in_features, or per-channel "
                         "(an override such as {'down_proj': {'group_size': None}})")
    qweight, scales, zeros = layer._gptq_tensors()
    mid = 2 ** (layer.bits - 1)
    symmetric = bool(layer.symmetric and bool((zeros == mid).all()))
    args = {"num_bits": layer.bits, "type": "int", "symmetric": symmetric, "dynamic": False,
            "strategy": "channel" if layer.per_channel else "group",
            "group_size": None if layer.per_channel else layer.group_size,
            "scale_dtype": _scale_dtype(scales.dtype, model_dtype)}
    state = {"weight": layer.dequantize(torch.float32), "weight_scale": scales.t().contiguous()}
    if not symmetric:
        state["weight_zero_point"] = (zeros.t().to(torch.int16) - mid).to(torch.int8).contiguous()
    expected = {"weight_packed": qweight.t().contiguous()}
    return {"weights": args, "input_activations": None, "format": _PACKED}, state, expected


def _scaled8_args(name: str, layer, model_dtype: torch.dtype):
    from ..nn import FP8Linear, W8A8Linear

    fp8 = isinstance(layer, FP8Linear)
    if isinstance(layer, W8A8Linear) and layer.outlier_threshold is not None:
        raise ValueError(f"save_quantized(format='compressed-tensors'): layer {name!r} is LLM.int8 (outlier_threshold "
                         f"{layer.outlier_threshold:g}); compressed-tensors has no outlier split: quantize with the "
                         "W8A8 preset, or save with format='lowbit'")
    per_tensor = layer.weight_scale.dim() == 0
    static = layer.input_scale is not None
    kind = "float" if fp8 else "int"
    weights = {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": False,
               "strategy": "tensor" if per_tensor else "channel", "group_size": None,
               "scale_dtype": _scale_dtype(layer.weight_scale.dtype, model_dtype)}
    acts = {"num_bits": 8, "type": kind, "symmetric": True, "group_size": None,
            "strategy": "tensor" if static else "token", "dynamic": not static,
            "scale_dtype": _scale_dtype(layer.input_scale.dtype, model_dtype) if static else None}
    scale = layer.weight_scale.reshape(1) if per_tensor else layer.weight_scale.reshape(-1, 1)
    state = {"weight": layer.dequantize(torch.float32), "weight_scale": scale.contiguous()}
    if static:
        state["input_scale"] = layer.input_scale.reshape(1).contiguous()
    expected = {"weight": layer.weight}
    return ({"weights": weights, "input_activations": acts, "format": "float-quantized" if fp8 else "int-quantized"},
            state, expected)


def _targets(groups: list[list[str]]) -> list[list[str]]:
    """Targets per config group: ``["Linear"]`` for one group; otherwise a regex of the
    layers' last name parts (``re:.*\\.(q_proj|k_proj)$``) when those tell the groups
    apart, else the layers' full names."""
    if len(groups) == 1:
        return [["Linear"]]
    leaves = [{n.rpartition(".")[2] for n in names} for names in groups]
    out = []
    for i, (names, leaf) in enumerate(zip(groups, leaves)):
        others = set().union(*(leaves[:i] + leaves[i + 1:]))
        if leaf & others:
            out.append(list(names))
        else:
            alt = "|".join(re.escape(x) for x in sorted(leaf))
            out.append([f"re:(.*\\.)?({alt})$"])
    return out


def _shadow(model: nn.Module, layers: dict[str, dict], QuantizationScheme, status) -> nn.Module:
    """A module tree with the model's linear-like layer names, each an empty (meta)
    ``nn.Linear``, the quantized ones carrying ``quantization_scheme`` as llm-compressor
    attaches it: what compressed-tensors' ``QuantizationConfig.from_pretrained`` reads."""
    from ..nn import is_linear_like

    root = nn.Module()

    def put(name: str, module: nn.Module):
        parent = root
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], module)

    for name, module in model.named_modules():
        if name in layers:
            lin = nn.Linear(1, 1, bias=False, device="meta")
            lin.quantization_scheme = QuantizationScheme(**layers[name]["scheme"])
            lin.quantization_status = status
            put(name, lin)
        elif name and is_linear_like(module):
            put(name, nn.Linear(1, 1, bias=False, device="meta"))
    return root


def _dedupe_tied(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop tensors that share storage with an earlier one (tied embeddings), as
    ``save_pretrained`` does; the loader ties them again."""
    seen, out = set(), {}
    for k, v in tensors.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) \
            if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[k] = v
    return out


@torch.no_grad()
def save(model: nn.Module, directory: Path, options: dict[str, Any]) -> None:
    """Write ``model`` (with lowbit layers) as a compressed-tensors checkpoint folder.

    Options: ``max_shard_bytes``. Raises ValueError naming the layer for one the format
    cannot hold (act-order, groups that do not divide in_features, LLM.int8), and when the
    model has no lowbit layer.
    """
    from ..nn import FP8Linear, QuantLinear, W8A8Linear

    BaseCompressor, ModelCompressor, QuantizationScheme, QuantizationStatus = _ct()
    unknown = set(options) - {"max_shard_bytes"}
    if unknown:
        raise TypeError(f"save_quantized(format='compressed-tensors'): unknown options {sorted(unknown)}; "
                        "it takes max_shard_bytes")
    qnames = {n for n, m in model.named_modules() if isinstance(m, (QuantLinear, W8A8Linear, FP8Linear))}
    if not qnames:
        raise ValueError("save_quantized(format='compressed-tensors'): the model has no lowbit quantized layer "
                         "(QuantLinear / W8A8Linear / FP8Linear); run lowbit.quantize first")
    model_dtype = _model_dtype(model, qnames)
    layers: dict[str, dict] = {}
    for name, m in model.named_modules():
        if name not in qnames:
            continue
        if isinstance(m, QuantLinear):
            scheme, state, expected = _weight_only_args(name, m, model_dtype)
        else:
            scheme, state, expected = _scaled8_args(name, m, model_dtype)
        layers[name] = {"scheme": scheme, "state": state, "expected": expected, "bias": m.bias}

    # one config group per distinct scheme, in model order
    keys: list[str] = []
    members: list[list[str]] = []
    for name, entry in layers.items():
        key = json.dumps(entry["scheme"], sort_keys=True)
        if key not in keys:
            keys.append(key)
            members.append([])
        members[keys.index(key)].append(name)
    for key, names, targets in zip(keys, members, _targets(members)):
        for n in names:
            layers[n]["scheme"] = {**json.loads(key), "targets": targets}

    status = QuantizationStatus.COMPRESSED
    shadow = _shadow(model, layers, QuantizationScheme, status)
    compressor = ModelCompressor.from_pretrained_model(shadow)

    tensors: dict[str, Tensor] = {}
    prefixes = tuple(n + "." for n in qnames)
    for k, v in model.state_dict().items():
        if not k.startswith(prefixes):
            tensors[k] = v
    tensors = _dedupe_tied(tensors)
    shadow_modules = dict(shadow.named_modules())
    for name, entry in layers.items():
        scheme = shadow_modules[name].quantization_scheme
        comp = BaseCompressor.get_value_from_registry(scheme.format)
        out = comp.compress({k: v.detach().cpu() for k, v in entry["state"].items()}, scheme)
        for k, want in entry["expected"].items():
            got = out.get(k)
            if got is None or got.dtype != want.dtype or not torch.equal(got.view(torch.uint8),
                                                                          want.detach().cpu().view(torch.uint8)):
                raise RuntimeError(f"save_quantized(format='compressed-tensors'): compressed-tensors' {scheme.format} "
                                   f"compressor did not reproduce layer {name!r}'s codes in {k}; please report this "
                                   "(lowbit and compressed-tensors disagree on the grid)")
        for k, v in out.items():
            tensors[f"{name}.{k}"] = v
        if entry["bias"] is not None:
            tensors[f"{name}.bias"] = entry["bias"]

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text("{}")
        compressor.update_config(tmp)
        qconfig = json.loads((Path(tmp) / "config.json").read_text())["quantization_config"]
    config = {**hf_config_dict(model), "quantization_config": qconfig}
    kwargs = {"max_shard_bytes": options["max_shard_bytes"]} if "max_shard_bytes" in options else {}
    save_folder(directory, tensors, config, **kwargs)


# -- import -------------------------------------------------------------------------------


def _err(where: str, msg: str) -> CheckpointError:
    return CheckpointError(f"compressed-tensors checkpoint {where}: {msg}")


def _args(d: dict | None, where: str) -> dict | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise _err(where, f"expected QuantizationArgs (a dict), got {d!r}")
    a = dict(d)
    a.setdefault("num_bits", 8)
    a.setdefault("type", "int")
    a.setdefault("symmetric", True)
    a.setdefault("dynamic", False)
    a["type"] = str(a["type"]).lower()
    strategy = a.get("strategy")
    if strategy is None:   # what QuantizationArgs infers
        g = a.get("group_size")
        strategy = "tensor" if g is None else ("channel" if g == -1 else "group")
    a["strategy"] = str(strategy).lower()
    return a


def _groups(qc: dict, where: str) -> tuple[list[dict], list[str]]:
    """(schemes, ignore) of a quantization_config, checked for what lowbit can hold."""
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise _err(where, f"quantization_status is {status!r}; lowbit reads compressed checkpoints "
                          "(save_pretrained(..., save_compressed=True))")
    if qc.get("sparsity_config"):
        raise _err(where, "has a sparsity_config (2:4 / bitmask sparsity); lowbit holds dense quantized weights "
                          "only")
    if qc.get("transform_config"):
        raise _err(where, "has a transform_config (rotations such as SpinQuant / QuIP); lowbit cannot apply them")
    if qc.get("kv_cache_scheme"):
        raise _err(where, "quantizes the KV cache (kv_cache_scheme); lowbit does not")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _err(where, "has no config_groups")
    schemes = []
    for gname, g in groups.items():
        w = f"{where} config group {gname!r}"
        if isinstance(g, list):
            raise _err(w, f"is a preset name with targets {g}; lowbit needs the full scheme")
        fmt = g.get("format") or qc.get("format")
        schemes.append({"name": gname, "targets": list(g.get("targets") or []), "format": fmt,
                        "weights": _args(g.get("weights"), w), "input": _args(g.get("input_activations"), w),
                        "output": g.get("output_activations"), "where": w})
    ignore = list(qc.get("ignore") or [])
    return schemes, ignore


def _match_name(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def _match(name: str, module: nn.Module, target: str) -> bool:
    """compressed-tensors' ``is_match`` for one target: a name (exact, or ``re:`` regex,
    ``re.match``) or a class name in the module's MRO (lowbit's linear-like layers count as
    ``Linear``)."""
    from ..nn import is_linear_like

    if _match_name(name, target):
        return True
    if any(c.__name__ == target for c in type(module).__mro__):
        return True
    return target == "Linear" and is_linear_like(module)


def _scheme_of(name: str, module: nn.Module, schemes: list[dict], ignore: list[str]) -> dict | None:
    if any(_match(name, module, t) for t in ignore):
        return None
    for s in schemes:   # the first group that targets it, as compressed-tensors applies them
        if any(_match(name, module, t) for t in s["targets"]):
            return s
    return None


def _take(tensors: dict[str, Tensor], key: str, used: set[str], directory: Path, required: bool = True):
    t = tensors.get(key)
    if t is None:
        if required:
            raise CheckpointError(f"{directory}: tensor {key!r} is missing from the checkpoint's safetensors "
                                  "(incomplete or not saved compressed)")
        return None
    used.add(key)
    return t


def _check_shape(t: Tensor, shape: tuple, key: str, directory: Path) -> None:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{directory}: tensor {key!r} has shape {list(t.shape)}, expected {list(shape)} for "
                              "this layer and scheme")


def _scales(scale: Tensor, n: int, args: dict, k: int, key: str, directory: Path) -> tuple[Tensor, int | None]:
    """weight_scale as ``[N, G]`` and the group size (None per-channel)."""
    strategy = args["strategy"]
    if strategy == "group":
        g = int(args.get("group_size") or 0)
        if g <= 0 or k % g != 0:
            raise CheckpointError(f"{directory}: layer {key!r}: group_size {g} does not divide in_features {k}")
        _check_shape(scale, (n, k // g), key + ".weight_scale", directory)
        return scale, g
    if strategy == "channel":
        _check_shape(scale, (n, 1), key + ".weight_scale", directory)
        return scale, None
    if strategy == "tensor":
        if scale.numel() != 1:
            raise CheckpointError(f"{directory}: tensor {key + '.weight_scale'!r} has {scale.numel()} elements, "
                                  "expected 1 (strategy tensor)")
        return scale.reshape(1, 1).expand(n, 1).contiguous(), None
    raise _err(f"layer {key!r}", f"weight strategy {strategy!r} is not one lowbit holds (group, channel, tensor)")


def _quant_linear(key: str, s: dict, lin: nn.Module, tensors, used, directory: Path):
    """A QuantLinear from pack-quantized (or 8-bit-stored weight-only int) tensors."""
    from .. import ops
    from ..config import SUPPORTED_BITS
    from ..nn import QuantLinear, linear_weight

    w = s["weights"]
    bits = int(w["num_bits"])
    if bits not in SUPPORTED_BITS:
        raise _err(s["where"], f"{bits}-bit weights; lowbit's kernels run {SUPPORTED_BITS}")
    n, k = linear_weight(lin).shape
    mid = 2 ** (bits - 1)
    if s["format"] == _PACKED:
        packed = _take(tensors, key + ".weight_packed", used, directory)
        shape = _take(tensors, key + ".weight_shape", used, directory, required=False)
        if shape is not None and [int(x) for x in shape.reshape(-1)] != [n, k]:
            raise CheckpointError(f"{directory}: {key}.weight_shape is {shape.tolist()}, but the model's layer is "
                                  f"[{n}, {k}] (a checkpoint of another model?)")
        _check_shape(packed, (n, (k * bits + 31) // 32), key + ".weight_packed", directory)
        if packed.dtype != torch.int32:
            raise CheckpointError(f"{directory}: {key}.weight_packed is {packed.dtype}, expected torch.int32")
        codes = ops.unpack_int32(packed.t().contiguous(), bits, k).t().contiguous()
    else:
        q = _take(tensors, key + ".weight", used, directory)
        _check_shape(q, (n, k), key + ".weight", directory)
        if q.dtype != torch.int8:
            raise CheckpointError(f"{directory}: {key}.weight is {q.dtype}, expected torch.int8 ({s['format']})")
        codes = q.to(torch.int16) + mid
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits):
            raise CheckpointError(f"{directory}: {key}.weight has values outside the {bits}-bit range "
                                  f"[{-mid}, {mid - 1}] of its scheme")
        codes = codes.to(torch.uint8)
    scale = _take(tensors, key + ".weight_scale", used, directory)
    scales, group = _scales(scale, n, w, k, key, directory)
    if not scales.dtype.is_floating_point:
        raise CheckpointError(f"{directory}: {key}.weight_scale is {scales.dtype}; expected a float dtype")
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        scales = scales.float()
    if w["symmetric"]:
        zeros = torch.full(scales.shape, mid, dtype=torch.uint8)
    else:
        zp = _take(tensors, key + ".weight_zero_point", used, directory)
        if s["format"] == _PACKED and w["strategy"] in ("group", "channel"):
            _check_shape(zp, ((n * bits + 31) // 32, scales.shape[1]), key + ".weight_zero_point", directory)
            zeros = ops.unpack_int32(zp.to(torch.int32).contiguous(), bits, n)
        else:
            zeros = (zp.reshape(-1, 1).expand(n, 1) if w["strategy"] == "tensor" else zp).to(torch.int16) + mid
            _check_shape(zeros, tuple(scales.shape), key + ".weight_zero_point", directory)
            if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) >= 2 ** bits):
                raise CheckpointError(f"{directory}: {key}.weight_zero_point has values outside the {bits}-bit "
                                      f"range [{-mid}, {mid - 1}]")
            zeros = zeros.to(torch.uint8)
    perm = None
    g_idx = tensors.get(key + ".weight_g_idx")
    if g_idx is not None:
        used.add(key + ".weight_g_idx")
        if group is None:
            raise CheckpointError(f"{directory}: {key}.weight_g_idx needs a group strategy")
        g_idx = g_idx.to(torch.int64).reshape(-1)
        _check_shape(g_idx, (k,), key + ".weight_g_idx", directory)
        perm = torch.sort(g_idx, stable=True).indices
        if not torch.equal(g_idx[perm], torch.arange(k) // group):
            raise CheckpointError(f"{directory}: {key}.weight_g_idx does not put exactly group_size={group} input "
                                  "features in each group; lowbit's act-order layers need full groups")
        if torch.equal(perm, torch.arange(k)):
            perm = None
        else:
            codes = codes.index_select(1, perm)
    bias = tensors.get(key + ".bias")
    if bias is not None:
        used.add(key + ".bias")
    return QuantLinear.from_codes(codes, scales, zeros, bits, group, symmetric=bool(w["symmetric"]), bias=bias,
                                  perm=perm)


def _scaled8(key: str, s: dict, lin: nn.Module, tensors, used, directory: Path):
    """A W8A8Linear (int8) or FP8Linear (float8 e4m3) with its activation scheme."""
    from ..nn import FP8Linear, W8A8Linear, linear_weight

    w, a = s["weights"], s["input"]
    n, k = linear_weight(lin).shape
    fp8 = w["type"] == "float"
    what = "float8 e4m3" if fp8 else "int8"
    if int(w["num_bits"]) != 8 or not w["symmetric"] or w["strategy"] not in ("channel", "tensor"):
        raise _err(s["where"], f"weights {w['type']}{w['num_bits']} {w['strategy']} "
                               f"{'symmetric' if w['symmetric'] else 'asymmetric'} with activation quantization; "
                               "lowbit's W8A8 / FP8 layers hold 8-bit symmetric per-channel or per-tensor weights")
    if a["type"] != w["type"] or int(a["num_bits"]) != 8 or not a["symmetric"]:
        raise _err(s["where"], f"activations {a['type']}{a['num_bits']} "
                               f"{'symmetric' if a['symmetric'] else 'asymmetric'} with {w['type']}8 weights; lowbit "
                               "quantizes activations to the weights' 8-bit type, symmetric")
    static = a["dynamic"] is False or a["dynamic"] == "false"
    if (static and a["strategy"] != "tensor") or (not static and a["strategy"] not in ("token",)):
        raise _err(s["where"], f"activation strategy {a['strategy']!r} ({'static' if static else 'dynamic'}); lowbit "
                               "has dynamic per-token and static per-tensor activation scales")
    q = _take(tensors, key + ".weight", used, directory)
    _check_shape(q, (n, k), key + ".weight", directory)
    want = _FP8 if fp8 else torch.int8
    if q.dtype != want:
        raise CheckpointError(f"{directory}: {key}.weight is {q.dtype}, expected {want} ({what} weights)")
    scale = _take(tensors, key + ".weight_scale", used, directory).float()
    per_tensor = w["strategy"] == "tensor"
    if per_tensor:
        if scale.numel() != 1:
            raise CheckpointError(f"{directory}: {key}.weight_scale has {scale.numel()} elements, expected 1")
    else:
        _check_shape(scale, (n, 1), key + ".weight_scale", directory)
    input_scale = None
    if static:
        input_scale = _take(tensors, key + ".input_scale", used, directory).float()
        if input_scale.numel() != 1:
            raise CheckpointError(f"{directory}: {key}.input_scale has {input_scale.numel()} elements, expected 1 "
                                  "(static per-tensor)")
        input_scale = input_scale.reshape(())
    bias = tensors.get(key + ".bias")
    if bias is not None:
        used.add(key + ".bias")
    if not fp8:
        return W8A8Linear.from_codes(q, scale.reshape(n) if not per_tensor else scale.reshape(1).expand(n),
                                     bias, input_scale=input_scale)
    layer = FP8Linear(k, n, bias=bias is not None, static=static, per_tensor_weight=per_tensor,
                      dtype=None if bias is None else bias.dtype)
    return layer._fill(q, scale, input_scale, bias)


def _build(key: str, s: dict, lin: nn.Module, tensors, used, directory: Path) -> nn.Module:
    fmt, w, a = s["format"], s["weights"], s["input"]
    if s["output"]:
        raise _err(s["where"], "quantizes output activations; lowbit does not")
    if w is None:
        raise _err(s["where"], "quantizes activations only (no weights); lowbit's layers quantize weights")
    if fmt not in (_PACKED,) + _UNPACKED:
        raise _err(s["where"], f"format {fmt!r} is not one lowbit reads (pack-quantized, int-quantized, "
                               "float-quantized, naive-quantized); NVFP4 / MXFP4 / 2:4 sparse / marlin-24 "
                               "layouts have no lowbit layer")
    if w.get("dynamic") not in (False, None, "false"):
        raise _err(s["where"], "has dynamic weight scales; lowbit reads static weight scales")
    if w.get("actorder") in ("group", "dynamic") and s["format"] != _PACKED:
        raise _err(s["where"], "actorder 'group' outside pack-quantized")
    if a is None:
        if w["type"] != "int":
            raise _err(s["where"], f"{w['type']}{w['num_bits']} weights without activation quantization (e.g. "
                                   "FP8 weight-only); lowbit's weight-only layers hold int weights")
        return _quant_linear(key, s, lin, tensors, used, directory)
    if fmt == _PACKED:
        raise _err(s["where"], f"int{w['num_bits']} weights with {a['type']}{a['num_bits']} activations (e.g. W4A8, "
                               "W4AFP8); lowbit holds weight-only int layers (W*A16) and 8-bit W8A8 / FP8 layers")
    return _scaled8(key, s, lin, tensors, used, directory)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def load(directory: Path, config: dict, tensors: dict[str, Tensor], model: nn.Module | None,
         options: dict[str, Any]) -> nn.Module:
    """Build lowbit layers from a compressed-tensors checkpoint (see the module docstring)
    on ``model`` (a skeleton) or one built from ``config`` with
    :func:`lowbit.checkpoint.model_from_config`; options ``device``, ``dtype``."""
    from ..nn import is_linear_like

    directory = Path(directory)
    where = f"{directory / 'config.json'} quantization_config"
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise _err(where, f"quant_method is {qc.get('quant_method')!r}, not {QUANT_METHOD!r}")
    schemes, ignore = _groups(qc, where)
    dtype = options.get("dtype")
    if model is None:
        from ..checkpoint import model_from_config

        model = model_from_config(config, dtype=dtype)
    elif dtype is not None:
        model.to(dtype)

    used: set[str] = set()
    replaced: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if not name or not is_linear_like(module):
            continue
        s = _scheme_of(name, module, schemes, ignore)
        if s is None:
            continue
        layer = _build(name, s, module, tensors, used, directory)
        if layer.bias is not None and dtype is not None:
            layer.bias.data = layer.bias.data.to(dtype)
        replaced[name] = layer
    if not replaced:
        raise CheckpointError(f"{directory}: no layer of the model matches the quantization_config's targets "
                              f"({[t for s in schemes for t in s['targets']]}); is this the checkpoint of this model?")
    for name, layer in replaced.items():
        _set_module(model, name, layer)

    prefixes = tuple(n + "." for n in replaced)
    rest = {k: v for k, v in tensors.items() if k not in used}
    stray = [k for k in rest if k.startswith(prefixes)]
    if stray:
        raise CheckpointError(f"{directory}: tensors {stray[:5]} of quantized layers were not used (a scheme that "
                              "does not match them?)")
    own = model.state_dict()
    unexpected = [k for k in rest if k not in own]
    if unexpected:
        hint = " (quantized tensors of a layer the config's targets/ignore leave unquantized?)" \
            if any(k.rpartition(".")[2].startswith(("weight_", "input_")) for k in unexpected) else ""
        raise CheckpointError(f"{directory}: tensors {unexpected[:5]} match no parameter of the model{hint}")
    for k, v in rest.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{directory}: tensor {k!r} has shape {list(v.shape)}, the model's is "
                                  f"{list(own[k].shape)}")
    # tied parameters: the checkpoint holds one name of each tied set
    params = dict(model.named_parameters(remove_duplicate=False))
    by_ptr: dict[tuple, list[str]] = {}
    for k, p in params.items():
        by_ptr.setdefault((p.data_ptr(), tuple(p.shape)), []).append(k)
    missing = []
    for k, p in params.items():   # buffers the checkpoint lacks keep their constructed values
        if k.startswith(prefixes) or k in rest:
            continue
        if any(t in rest for t in by_ptr[(p.data_ptr(), tuple(p.shape))]):
            continue
        missing.append(k)
    if missing:
        raise CheckpointError(f"{directory}: the checkpoint has no tensor for {missing[:5]}; the model needs them "
                              "(a checkpoint of another model, or an incomplete one)")
    model.load_state_dict(rest, strict=False)
    if options.get("device") is not None:
        model.to(options["device"])
    return model.eval()


register(Format("compressed-tensors", (QUANT_METHOD,), save, load))
