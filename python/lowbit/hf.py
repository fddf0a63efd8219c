"""transformers integration: ``from_pretrained`` / ``save_pretrained`` of lowbit checkpoints.

After ``import lowbit``, ``AutoModelForCausalLM.from_pretrained(dir)`` loads a folder whose
config.json has ``quantization_config.quant_method == "lowbit"`` (written by
:func:`lowbit.save_quantized` or by ``save_pretrained``) into lowbit's layers, and a
transformers model quantized with :func:`lowbit.quantize` saves itself with
``model.save_pretrained(dir)`` in the same layout.

Two classes, registered with transformers' public ``register_quantization_config("lowbit")``
and ``register_quantizer("lowbit")``:

* ``LowbitConfig`` (a ``QuantizationConfigMixin``): the ``quantization_config`` of
  :func:`lowbit.checkpoint.quantization_config_of` (``layers``: module name -> what rebuilds
  the empty lowbit layer; ``modules_not_converted``; ``tied_weights``).
* ``LowbitHfQuantizer`` (an ``HfQuantizer``): before the weights load, replaces each
  recorded linear of the (meta-device) model with an empty lowbit layer of the recorded
  kind and shape, so transformers fills the layers' buffers from the shards; serializable;
  no calibration, no quantization at load (a checkpoint must already be quantized).

transformers is not imported by ``import lowbit``: :func:`install` registers the classes at
once when ``transformers.quantizers.auto`` is already imported, and otherwise installs an
import hook that registers them right after transformers imports that module (which
``from_pretrained`` and ``AutoQuantizationConfig`` always do). ``lowbit.hf.LowbitConfig``
and ``lowbit.hf.LowbitHfQuantizer`` import transformers on first access.
"""
from __future__ import annotations

import importlib.abc
import logging
import sys
from typing import Any

from torch import nn

__all__ = ["install", "attach", "LowbitConfig", "LowbitHfQuantizer"]

log = logging.getLogger(__name__)

_TARGET = "transformers.quantizers.auto"
_classes: dict[str, type] = {}


def _define() -> dict[str, type]:
    """Define (once) and register the two classes; imports transformers."""
    if _classes:
        return _classes
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from .checkpoint import (FORMAT_VERSION, QUANT_METHOD, _check_values, _lowbit_version, empty_layer,
                             quantization_config_of)
    from .formats._io import CheckpointError

    class LowbitConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a lowbit checkpoint (see
        :func:`lowbit.checkpoint.quantization_config_of`); built from config.json by
        transformers, or from a quantized model with :meth:`from_model`."""

        def __init__(self, layers: dict | None = None, modules_not_converted: list | None = None,
                     tied_weights: dict | None = None, format_version: int = FORMAT_VERSION,
                     lowbit_version: str | None = None, **kwargs: Any):
            kwargs.pop("quant_method", None)
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.lowbit_version = lowbit_version or _lowbit_version()
            self.layers = dict(layers or {})
            self.modules_not_converted = list(modules_not_converted or [])
            self.tied_weights = dict(tied_weights or {})
            for k, v in kwargs.items():   # fields of later versions survive a load / save
                setattr(self, k, v)

        @classmethod
        def from_model(cls, model: nn.Module) -> "LowbitConfig":
            """The config of a model quantized by :func:`lowbit.quantize`."""
            return cls(**quantization_config_of(model))

        def to_dict(self) -> dict[str, Any]:
            return {k: v for k, v in super().to_dict().items() if not k.startswith("_")}

    class LowbitHfQuantizer(HfQuantizer):
        """Loads lowbit checkpoints into :class:`lowbit.nn.QuantLinear` / ``W8A8Linear`` /
        ``FP8Linear`` layers (see the module docstring)."""

        requires_calibration = False
        quantization_config: LowbitConfig

        def validate_environment(self, *args, **kwargs):
            if not self.pre_quantized:
                raise ValueError("LowbitConfig loads checkpoints lowbit already quantized; to quantize a model, "
                                 "load it unquantized and call lowbit.quantize(model, ...), then save_pretrained")
            version = self.quantization_config.format_version
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise ValueError(f"this lowbit checkpoint has format_version {version!r}; lowbit "
                                 f"{_lowbit_version()} reads versions up to {FORMAT_VERSION}: upgrade lowbit")

        def _process_model_before_weight_loading(self, model, **kwargs):
            from .api import _set_submodule

            layers = self.quantization_config.layers
            if not layers:
                raise CheckpointError("quantization_config.layers is missing or empty: not a lowbit checkpoint")
            for name, spec in layers.items():
                try:
                    model.get_submodule(name)
                except AttributeError as e:
                    raise CheckpointError(f"quantized layer {name!r} of the checkpoint is not a module of "
                                          f"{type(model).__name__}; the checkpoint is for another architecture") from e
                _set_submodule(model, name, empty_layer(spec, name))
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            for name in self.quantization_config.layers:
                m = model.get_submodule(name)
                if getattr(m, "bias", None) is not None:
                    m.bias.requires_grad_(False)
                if not any(t.device.type == "meta" for t in m.buffers()):
                    _check_values(getattr(model.config, "name_or_path", "?"), name, m)
            return model

        def get_state_dict_and_metadata(self, model):
            # save_pretrained: the layers are whatever the model holds now.
            fresh = quantization_config_of(model)
            for k, v in fresh.items():
                setattr(self.quantization_config, k, v)
            return None, {"lowbit_format_version": str(FORMAT_VERSION)}

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    for c in (LowbitConfig, LowbitHfQuantizer):
        c.__qualname__ = c.__name__   # lowbit.hf.LowbitConfig, not lowbit.hf._define.<locals>.LowbitConfig
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
        register_quantization_config(QUANT_METHOD)(LowbitConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
        register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)
    _classes.update(LowbitConfig=LowbitConfig, LowbitHfQuantizer=LowbitHfQuantizer)
    return _classes


def __getattr__(name: str):
    if name in ("LowbitConfig", "LowbitHfQuantizer"):
        return _define()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Loader(importlib.abc.Loader):
    """Runs the real loader of ``transformers.quantizers.auto``, then registers lowbit."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _uninstall_hook()
        try:
            _define()
        except Exception as e:   # never break transformers' own import
            log.warning("lowbit could not register its transformers quantizer: %s", e)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``transformers.quantizers.auto`` (and nothing else)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_hook = _Finder()


def _uninstall_hook() -> None:
    while _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def install() -> None:
    """Register lowbit's quantization config and quantizer with transformers: now if
    transformers' quantizer registry is already imported, else as soon as it is (without
    importing transformers). Called by ``import lowbit``."""
    if _TARGET in sys.modules:
        _define()
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def attach(model: nn.Module) -> None:
    """Mark a transformers model that :func:`lowbit.quantize` just quantized as a lowbit
    model: ``model.config.quantization_config`` a ``LowbitConfig`` and ``model.hf_quantizer``
    a ``LowbitHfQuantizer``, so ``model.save_pretrained(dir)`` writes a checkpoint that
    ``from_pretrained`` (and :func:`lowbit.load_quantized`) read back. Other models, and
    models without a lowbit layer, are left as they are."""
    from .checkpoint import _is_hf_model, breaks_ties, layer_spec

    if not _is_hf_model(model) or "transformers" not in sys.modules:
        return
    if not any(layer_spec(m) is not None for m in model.modules()):
        return
    if breaks_ties(model):   # a quantized lm_head is no longer the embedding: don't tie it on load
        model.config.tie_word_embeddings = False
    classes = _define()
    config = classes["LowbitConfig"].from_model(model)
    model.config.quantization_config = config
    model.hf_quantizer = classes["LowbitHfQuantizer"](config, pre_quantized=True)
    model.quantization_method = config.quant_method
