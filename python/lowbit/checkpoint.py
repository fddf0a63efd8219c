"""Saving and loading quantized models: :func:`save_quantized`, :func:`load_quantized`,
and lowbit's own checkpoint format (``format="lowbit"``).

A checkpoint is a folder (see :mod:`lowbit.formats._io`): safetensors shards, ``config.json``
with a ``quantization_config``, and a sha256 manifest. :func:`save_quantized` writes any
format of :mod:`lowbit.formats`; :func:`load_quantized` reads any of them, picking the
format from ``quantization_config.quant_method``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .formats import get_format, format_of_config
from .formats._io import CheckpointError, load_folder

__all__ = ["save_quantized", "load_quantized", "model_from_config", "CheckpointError"]


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
