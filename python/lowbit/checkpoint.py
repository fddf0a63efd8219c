"""Saving and loading quantized models: :func:`save_quantized`, :func:`load_quantized`,
and lowbit's own checkpoint format (``format="lowbit"``).

A checkpoint is a folder (see :mod:`lowbit.formats._io`): safetensors shards, ``config.json``
with a ``quantization_config``, and a sha256 manifest. :func:`save_quantized` writes any
format of :mod:`lowbit.formats`; :func:`load_quantized` reads any of them, picking the
format from ``quantization_config.quant_method``.

The ``"lowbit"`` format holds every lowbit layer kind. Its shards are the model's
``state_dict`` (``QuantLinear``: ``qweight`` / ``scales`` / ``zeros`` / ``bias`` / ``perm`` in
the GPTQ layout, also after ``pack_mma``; ``W8A8Linear`` / ``FP8Linear``: ``weight`` /
``weight_scale`` / ``input_scale`` / ``bias``; everything else as it is), with tied weights
written once. ``config.json`` is the transformers config (``architectures``, ``dtype``; ``{}``
for a plain ``nn.Module``) plus::

    "quantization_config": {
        "quant_method": "lowbit", "format_version": 1, "lowbit_version": "0.1.0",
        "layers": {"model.layers.0.mlp.up_proj": {"kind": "weight_only", "in_features": 576,
                   "out_features": 1536, "bias": false, "bias_dtype": null, "bits": 4,
                   "group_size": 128, "symmetric": true, "scale_dtype": "float16",
                   "act_order": false}, ...},   # "w8a8": static, outlier_threshold;
                                                # "fp8": static, per_tensor_weight
        "modules_not_converted": ["lm_head"],
        "tied_weights": {"lm_head.weight": "model.embed_tokens.weight"}}

transformers' ``save_pretrained`` writes the same folder (without the manifest) for a model
:func:`lowbit.quantize` quantized, and ``from_pretrained`` reads it (:mod:`lowbit.hf`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .formats import get_format, format_of_config
from .formats._io import CheckpointError, load_folder

__all__ = ["save_quantized", "load_quantized", "model_from_config", "quantization_config_of", "layer_spec",
           "empty_layer", "CheckpointError"]


def save_quantized(model: nn.Module, directory: str | os.PathLike, format: str = "lowbit",  # noqa: A002
                   **options: Any) -> Path:
    """Write a quantized ``model`` (after :func:`lowbit.quantize`) as a checkpoint folder.

    Args:
        model: the model, with its quantized layers (``QuantLinear`` / ``W8A8Linear`` /
            ``FP8Linear``) in place.
        directory: the folder (created if needed). Files are written atomically; an
            earlier checkpoint there is replaced file by file.
        format: ``"lowbit"`` (every lowbit layer kind; what ``from_pretrained`` reads after
            ``import lowbit``), ``"gptq"``, ``"awq"`` or ``"compressed-tensors"`` (see
            :mod:`lowbit.formats`). A format that cannot hold one of the model's layers
            raises ValueError naming it.
        **options: format options, e.g. ``max_shard_bytes`` (bytes per safetensors shard).

    Returns:
        The folder, as a ``Path``.
    """
    d = Path(directory)
    get_format(format).save(model, d, dict(options))
    return d


def load_quantized(directory: str | os.PathLike, model: nn.Module | None = None, *,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   verify: bool = True) -> nn.Module:
    """Load a quantized checkpoint folder (any format lowbit reads) into lowbit modules.

    Args:
        directory: the folder :func:`save_quantized` or ``save_pretrained`` wrote (or a
            GPTQ / AWQ / compressed-tensors checkpoint).
        model: a skeleton to fill: the unquantized architecture (its targeted linears are
            replaced by empty lowbit layers), e.g. a model built with ``from_config``.
            None: built from ``config.json`` with :func:`model_from_config` (transformers).
        device: where the loaded model lives (default: CPU).
        dtype: the float dtype of the model's unquantized parameters (embeddings, norms,
            biases); default: the checkpoint's.
        verify: check every file against the manifest's sha256 first (when there is one).

    Returns:
        The model in eval mode. A missing, truncated or modified file, or a tensor that
        does not fit the model, raises :class:`CheckpointError` naming it.
    """
    config, tensors = load_folder(directory, verify=verify)
    try:
        fmt = format_of_config(config)
    except ValueError as e:
        raise CheckpointError(f"{Path(directory) / 'config.json'}: {e}") from e
    options = {"device": device, "dtype": dtype}
    return fmt.load(Path(directory), config, tensors, model, options)


# -- the "lowbit" format --------------------------------------------------------------------

FORMAT_VERSION = 1
QUANT_METHOD = "lowbit"
_KINDS = ("weight_only", "w8a8", "fp8")


def _lowbit_version() -> str:
    import lowbit

    return getattr(lowbit, "__version__", "unknown")


def _is_hf_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (found by class name: nothing is imported)."""
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__) and hasattr(model, "config")


def layer_spec(module: nn.Module) -> dict[str, Any] | None:
    """What rebuilds an empty copy of a lowbit layer (the ``layers`` entries of a lowbit
    ``quantization_config``), or None for a module that is not one."""
    from .formats._io import dtype_name
    from .nn import FP8Linear, QuantLinear, W8A8Linear

    if isinstance(module, QuantLinear):
        spec = {"kind": "weight_only", "bits": module.bits,
                "group_size": None if module.per_channel else module.group_size,
                "symmetric": bool(module.symmetric), "scale_dtype": dtype_name(module.scales.dtype),
                "act_order": module.perm is not None}
    elif isinstance(module, W8A8Linear):
        spec = {"kind": "w8a8", "bits": 8, "static": module.input_scale is not None,
                "outlier_threshold": module.outlier_threshold}
    elif isinstance(module, FP8Linear):
        spec = {"kind": "fp8", "bits": 8, "static": module.input_scale is not None,
                "per_tensor_weight": module.weight_scale.dim() == 0}
    else:
        return None
    bias = module.bias
    return {**spec, "in_features": module.in_features, "out_features": module.out_features,
            "bias": bias is not None, "bias_dtype": None if bias is None else dtype_name(bias.dtype)}


def empty_layer(spec: dict[str, Any], name: str = "?", device=None) -> nn.Module:
    """An empty lowbit layer (zeros, on ``device``) for a :func:`layer_spec` entry; its
    ``state_dict`` has the keys, shapes and dtypes of the saved layer's. CheckpointError
    naming the layer for an entry that does not describe one."""
    from .formats._io import dtype_of
    from .nn import FP8Linear, QuantLinear, W8A8Linear

    try:
        kind = spec["kind"]
        if kind not in _KINDS:
            raise ValueError(f"unknown kind {kind!r} (known: {', '.join(_KINDS)})")
        k, n, bias = int(spec["in_features"]), int(spec["out_features"]), bool(spec["bias"])
        bias_dtype = dtype_of(spec["bias_dtype"]) if bias and spec.get("bias_dtype") else None
        if kind == "weight_only":
            layer = QuantLinear(k, n, bias=bias, bits=int(spec["bits"]), group_size=spec["group_size"],
                                symmetric=bool(spec["symmetric"]), scale_dtype=dtype_of(spec["scale_dtype"]),
                                device=device, dtype=bias_dtype)
            if spec.get("act_order"):
                layer.perm = torch.arange(k, dtype=torch.int64, device=device)
            return layer
        if int(spec.get("bits", 8)) != 8:
            raise ValueError(f"bits must be 8 for kind {kind!r}, got {spec['bits']}")
        if kind == "w8a8":
            return W8A8Linear(k, n, bias=bias, static=bool(spec["static"]),
                              outlier_threshold=spec.get("outlier_threshold"), device=device, dtype=bias_dtype)
        return FP8Linear(k, n, bias=bias, static=bool(spec["static"]),
                         per_tensor_weight=bool(spec.get("per_tensor_weight", False)), device=device, dtype=bias_dtype)
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"quantization_config.layers[{name!r}] does not describe a lowbit layer: {what}; "
                              "the checkpoint's config.json is corrupt or from another tool") from e


def _tied_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{dropped: kept}`` for state-dict entries that alias another one (tied weights):
    same storage, offset, shape, stride and dtype. For a transformers model the kept name
    is the one it ties *from* (``model.embed_tokens.weight``, not ``lm_head.weight``), as
    ``save_pretrained`` does."""
    targets = set()
    tied_keys = getattr(model, "all_tied_weights_keys", None) if _is_hf_model(model) else None
    if isinstance(tied_keys, dict):
        targets = set(tied_keys)
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if t.device.type == "meta":
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups.setdefault(key, []).append(name)
    tied = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        kept = next((x for x in names if x not in targets), names[0])
        tied.update({x: kept for x in names if x != kept})
    return tied


def breaks_ties(model: nn.Module) -> bool:
    """Whether a lowbit layer of a transformers ``model`` replaced one side of a weight tie
    it declares (a quantized ``lm_head`` of a model with ``tie_word_embeddings``): its
    config must then say ``tie_word_embeddings=False``, or loading would tie the float
    embedding over the quantized layer."""
    if not _is_hf_model(model) or not getattr(model.config, "tie_word_embeddings", False):
        return False
    try:
        tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    except (AttributeError, ValueError):
        tied = getattr(model, "all_tied_weights_keys", None) or {}
    for name in [*tied.keys(), *tied.values()]:
        owner = name.rpartition(".")[0]
        try:
            if layer_spec(model.get_submodule(owner)) is not None:
                return True
        except AttributeError:
            continue
    return False


def quantization_config_of(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The lowbit ``quantization_config`` of a quantized ``model`` (what config.json
    holds): ``quant_method``, ``format_version``, ``lowbit_version``, ``layers`` (module
    name -> :func:`layer_spec`), ``modules_not_converted`` (linear-like modules left in
    float) and ``tied_weights`` (``{dropped: kept}`` state-dict names not written)."""
    from .nn import is_linear_like

    layers, plain = {}, []
    for name, m in model.named_modules():
        spec = layer_spec(m)
        if spec is not None:
            layers[name] = spec
        elif is_linear_like(m):
            plain.append(name)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no lowbit layer (QuantLinear / W8A8Linear / FP8Linear); "
                         "run lowbit.quantize(model, ...) first")
    state = model.state_dict() if state is None else state
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "lowbit_version": _lowbit_version(),
            "layers": layers, "modules_not_converted": plain, "tied_weights": _tied_names(model, state)}


def hf_config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's config as saved by ``save_pretrained`` (architectures, dtype; no
    quantization_config; ``tie_word_embeddings=False`` when a quantized lm_head broke the tie),
    or {} for a model without a transformers config. Every format writes this."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return {}
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    if _is_hf_model(model):
        d["architectures"] = [type(model).__name__]
        if breaks_ties(model):
            d["tie_word_embeddings"] = False
        floats = [p.dtype for p in model.parameters() if p.dtype.is_floating_point]
        if floats:
            d["dtype"] = str(floats[0]).removeprefix("torch.")
    return d


def _save(model: nn.Module, directory: Path, options: dict[str, Any]) -> None:
    from .formats._io import DEFAULT_SHARD_BYTES, save_folder

    max_shard_bytes = options.pop("max_shard_bytes", DEFAULT_SHARD_BYTES)
    if options:
        raise TypeError(f"save_quantized(format='lowbit'): unknown options {sorted(options)}; "
                        "it takes max_shard_bytes")
    state = model.state_dict()
    qc = quantization_config_of(model, state)
    tensors = {k: v for k, v in state.items() if k not in qc["tied_weights"]}
    # safetensors refuses tensors that share memory without being the same tensor.
    seen: set = set()
    for k, v in tensors.items():
        ptr = (v.device, v.untyped_storage().data_ptr())
        if ptr in seen and v.numel():
            tensors[k] = v.clone()
        seen.add(ptr)
    config = {**hf_config_dict(model), "quantization_config": qc}
    extra = {}
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "to_json_string"):
        extra["generation_config.json"] = generation.to_json_string()   # as save_pretrained writes it
    save_folder(directory, tensors, config, max_shard_bytes=max_shard_bytes,
                metadata={"lowbit_format_version": str(FORMAT_VERSION)}, extra_files=extra)


def _check_tensors(directory: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                   layers: dict[str, dict], cast_ok: set[str]) -> None:
    """CheckpointError naming the first tensor that does not fit the skeleton."""
    where = f"{directory}: "
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{where}tensor {missing[0]!r} is missing from the checkpoint's shards "
                              f"({len(missing)} missing in all); the folder is incomplete or not for this model")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise CheckpointError(f"{where}tensor {unexpected[0]!r} in the checkpoint has no place in the model "
                              f"({len(unexpected)} such in all); the config and the shards do not match")
    for k, t in tensors.items():
        e = expected[k]
        layer = k.rpartition(".")[0]
        spec = f" (quantization_config.layers[{layer!r}] = {layers[layer]})" if layer in layers else ""
        if tuple(t.shape) != tuple(e.shape):
            raise CheckpointError(f"{where}tensor {k!r} has shape {list(t.shape)}, the model expects "
                                  f"{list(e.shape)}{spec}; the shards and config.json do not match")
        if t.dtype != e.dtype and not (k in cast_ok and t.dtype.is_floating_point and e.dtype.is_floating_point):
            raise CheckpointError(f"{where}tensor {k!r} is {t.dtype}, the model expects {e.dtype}{spec}; "
                                  "the shards and config.json do not match")


def _check_values(directory: Path, name: str, module: nn.Module) -> None:
    """Values the shapes cannot catch: zero points beyond the recorded bits, a perm that
    is not a permutation, non-finite or non-positive scales."""
    from .nn import QuantLinear

    if isinstance(module, QuantLinear):
        if module.zeros.numel() and int(module.zeros.max()) >= 2 ** module.bits:
            raise CheckpointError(f"{directory}: tensor {name + '.zeros'!r} has zero points up to "
                                  f"{int(module.zeros.max())}, beyond bits={module.bits} in config.json")
        if module.perm is not None and not torch.equal(module.perm.sort().values,
                                                       torch.arange(module.in_features, device=module.perm.device)):
            raise CheckpointError(f"{directory}: tensor {name + '.perm'!r} is not a permutation of "
                                  f"0..{module.in_features - 1}")
        scales = module.scales
    else:
        scales = module.weight_scale
    if scales.numel() and not bool(torch.isfinite(scales.float()).all()):
        raise CheckpointError(f"{directory}: the scales of layer {name!r} are not all finite; the shard is corrupt")


def _load(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module | None,
          options: dict[str, Any]) -> nn.Module:
    from .api import _set_submodule
    from .formats._io import dtype_of
    from .nn import is_linear_like

    qc = config["quantization_config"]
    version = qc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{directory / 'config.json'}: lowbit checkpoint format_version {version!r}; this "
                              f"lowbit ({_lowbit_version()}) reads versions up to {FORMAT_VERSION}: upgrade lowbit")
    layers = qc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{directory / 'config.json'}: quantization_config.layers is missing or empty")
    tied = dict(qc.get("tied_weights") or {})
    given = model is not None
    if model is None:
        try:
            model = model_from_config(config)
        except ValueError as e:
            raise CheckpointError(f"{directory / 'config.json'}: {e}") from e
    for name, spec in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"{directory / 'config.json'}: quantized layer {name!r} is not a module of "
                                  f"{type(model).__name__}; the checkpoint is for another architecture") from e
        new = empty_layer(spec, name)
        if layer_spec(old) is None and is_linear_like(old):
            from .nn import linear_weight
            shape = tuple(linear_weight(old).shape)
            if shape != (new.out_features, new.in_features):
                raise CheckpointError(f"{directory / 'config.json'}: layer {name!r} is {shape[0]}x{shape[1]} in the "
                                      f"model but {new.out_features}x{new.in_features} in the checkpoint")
        elif layer_spec(old) is None:
            raise CheckpointError(f"{directory / 'config.json'}: {name!r} is a {type(old).__name__} in the model, "
                                  "not a linear layer lowbit can replace")
        _set_submodule(model, name, new)
    # Tied weights were written once: re-tie those the skeleton does not tie already.
    expected = model.state_dict()
    for dropped, kept in tied.items():
        if dropped not in expected or kept not in expected or kept not in tensors or dropped in tensors:
            continue   # _check_tensors names what is missing or unexpected
        if expected[dropped].data_ptr() != expected[kept].data_ptr():
            parent, _, attr = dropped.rpartition(".")
            kparent, _, kattr = kept.rpartition(".")
            setattr(model.get_submodule(parent), attr, getattr(model.get_submodule(kparent), kattr))
        tensors = {**tensors, dropped: tensors[kept]}
    expected = model.state_dict()
    lowbit_keys = {f"{n}.{k}" for n in layers for k in model.get_submodule(n).state_dict()}
    cast_ok = set(expected) - lowbit_keys if given else set()
    _check_tensors(directory, tensors, expected, layers, cast_ok)
    model.load_state_dict(tensors, strict=True)
    for name in layers:
        _check_values(directory, name, model.get_submodule(name))
    dtype = options.get("dtype")
    if dtype is not None:
        if isinstance(dtype, str):
            dtype = dtype_of(dtype)
        _cast_unquantized(model, set(layers), dtype)
    if options.get("device") is not None:
        model.to(options["device"])
    return model.eval()


def _cast_unquantized(model: nn.Module, layers: set[str], dtype: torch.dtype) -> None:
    """Cast the float parameters and buffers outside lowbit layers, and those layers'
    biases, to ``dtype`` (the lowbit layers keep their scales' dtypes)."""
    if not dtype.is_floating_point:
        raise TypeError(f"load_quantized: dtype must be a floating-point dtype, got {dtype}")
    for name, m in model.named_modules():
        if name in layers:
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
            continue
        if any(name.startswith(q + ".") for q in layers):
            continue
        for pn, p in m.named_parameters(recurse=False):
            if p.dtype.is_floating_point:
                p.data = p.data.to(dtype)
        for bn, b in m.named_buffers(recurse=False):
            # non-persistent buffers (rotary frequencies) keep the precision they were built in
            if b is not None and b.dtype.is_floating_point and bn not in m._non_persistent_buffers_set:
                setattr(m, bn, b.to(dtype))


def model_from_config(config: dict, dtype: torch.dtype | None = None) -> nn.Module:
    """An empty transformers model for an HF ``config`` dict (a parsed config.json).

    The class is the config's ``architectures[0]`` when transformers has it, else
    ``AutoModelForCausalLM``, else ``AutoModel`` (encoders). Parameters are allocated on
    the CPU without their random initialisation (their values are whatever memory held:
    load a state dict into them); buffers computed at construction (rotary frequencies)
    are valid. ``quantization_config`` is ignored.

    Args:
        config: the config dict; needs ``model_type``.
        dtype: float dtype of the parameters; default the config's ``dtype`` /
            ``torch_dtype``, else float32.

    Returns:
        The model in eval mode, weights tied as its config says.
    """
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ValueError("model_from_config: the config has no 'model_type', so lowbit cannot tell which "
                         "transformers architecture to build; pass the unquantized model as model= "
                         "(e.g. AutoModelForCausalLM.from_config(...)) to load_quantized")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers.initialization import no_init_weights

    from .formats._io import dtype_of

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type")}
    if dtype is None:
        name = config.get("dtype") or config.get("torch_dtype")
        dtype = dtype_of(name) if isinstance(name, str) else torch.float32
    try:
        hf_config = transformers.AutoConfig.for_model(config["model_type"], **cfg)
    except (ValueError, KeyError) as e:
        raise ValueError(f"model_from_config: transformers {transformers.__version__} does not know "
                         f"model_type {config['model_type']!r} ({e}); pass model= to load_quantized") from e
    classes = [getattr(transformers, a, None) for a in (config.get("architectures") or [])]
    classes = [c for c in classes if isinstance(c, type) and issubclass(c, transformers.PreTrainedModel)]
    with no_init_weights():
        if classes:
            model = classes[0]._from_config(hf_config, dtype=dtype)
        else:
            try:
                model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
            except ValueError:
                model = transformers.AutoModel.from_config(hf_config, dtype=dtype)
    model.tie_weights()   # no_init_weights skips init_weights, which ties them
    return model.eval()


from .formats import Format, register  # noqa: E402

register(Format("lowbit", (QUANT_METHOD,), _save, _load))
