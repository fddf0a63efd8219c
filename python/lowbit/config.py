"""What to quantize and how: :class:`QuantScheme` (one layer's grid) and :class:`QuantConfig`
(which layers get which scheme).

A scheme is a weight-only integer grid of :mod:`lowbit.reference.quant`: ``bits`` per
weight, groups of ``group_size`` input columns (``None`` is per-channel: one group per
output row), symmetric (absmax) or asymmetric (zero-point), and the dtype the scales
are stored in. Activations stay in the model's float dtype ("A16").

Presets (``QuantConfig.preset(name, **changes)``; names are case-insensitive):

========  =====  ==========  =========  =============================================
preset    bits   group       symmetric  notes
========  =====  ==========  =========  =============================================
W8A16     8      per-channel yes        near-lossless; half the bytes of fp16
W4A16     4      128         yes        the GPTQ / AWQ / vLLM standard grid
W3A16     3      128         no         zero points matter below 4 bits
W2A16     2      64          no         research territory: expect large losses
========  =====  ==========  =========  =============================================

A preset name may carry changes as suffixes: ``"W4A16-g32"``, ``"W4A16-g64-asym"``,
``"W4A16-pc"`` (per-channel), ``"W8A16-sym"``.

Weight-and-activation presets (``activations`` set; the layer quantizes its input on
every call and multiplies in 8 bits; see :mod:`lowbit.nn.w8a8`):

============  ==============================  ===========================================
preset        weights                         activations
============  ==============================  ===========================================
W8A8          int8, per-channel absmax        int8, dynamic per-token absmax
W8A8-static   int8, per-channel absmax        int8, one static scale from calibration
LLM.int8      int8, per-channel absmax        int8 per-token; input columns with any
                                              ``|x| > 6`` multiply in 16-bit (Dettmers
                                              et al., 2022); ``-t<T>`` sets the threshold
FP8           float8 e4m3, per-channel        float8 e4m3, dynamic per-token
FP8-static    float8 e4m3, per-tensor         float8 e4m3, one static scale
============  ==============================  ===========================================

``-static`` / ``-dynamic`` switch the activation scales of W8A8 and FP8; ``-pt`` / ``-pc``
the FP8 weight scales (per-tensor / per-channel).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Mapping

import torch
from torch import nn

__all__ = ["QuantScheme", "QuantConfig", "PRESETS", "SUPPORTED_BITS", "ACTIVATIONS"]

# Bit widths that lowbit's weight-only matmul kernels run (2..8; 4 and 8 have packed fast paths).
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Activation quantization of weight-and-activation schemes (None: weight-only, "A16").
ACTIVATIONS = (None, "int8", "int8-static", "fp8", "fp8-static")
WEIGHT_FORMATS = ("int", "fp8")


@dataclass(frozen=True)
class QuantScheme:
    """One layer's weight grid.

    Attributes:
        bits: bits per weight code, 2..8.
        group_size: input columns per group (positive); ``None`` for per-channel.
        symmetric: absmax grid (zero point fixed at ``2**(bits-1)``) if True, else
            min/max grid with a per-group zero point.
        scale_dtype: dtype the layer stores its scales in. float16 (the GPTQ/AWQ
            checkpoint convention) halves their bytes; codes are computed against the
            stored (rounded) scales, so nothing is lost beyond the grid itself.
        clip_ratio: in (0, 1]; shrinks each group's range before its scale is taken.
        activations: None (weight-only, activations stay 16/32-bit), ``"int8"`` (dynamic
            per-token int8), ``"int8-static"`` (one calibrated per-tensor scale), ``"fp8"``
            (dynamic per-token float8 e4m3) or ``"fp8-static"``. Set, the scheme must be
            8-bit, symmetric and per-channel (or per-tensor FP8).
        weight_format: ``"int"`` (an integer grid) or ``"fp8"`` (float8 e4m3 weights with
            absmax scales; needs ``activations`` ``"fp8"``/``"fp8-static"``).
        weight_per_tensor: FP8 weights with one scale for the whole tensor instead of one per
            output channel.
        outlier_threshold: LLM.int8 mode (``activations="int8"`` only): input columns where
            any ``|x|`` exceeds it multiply in 16-bit, the rest in int8 (Dettmers et al., 2022
            use 6.0).
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.float16
    clip_ratio: float = 1.0
    activations: str | None = None
    weight_format: str = "int"
    weight_per_tensor: bool = False
    outlier_threshold: float | None = None

    def __post_init__(self):
        if not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"QuantScheme: bits must be one of {SUPPORTED_BITS} (the bit widths lowbit's "
                f"kernels run), got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(
                f"QuantScheme: group_size must be a positive int, or None for per-channel, "
                f"got {self.group_size!r}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(
                f"QuantScheme: scale_dtype must be torch.float16, torch.bfloat16 or torch.float32, "
                f"got {self.scale_dtype!r}")
        if not 0.0 < float(self.clip_ratio) <= 1.0:
            raise ValueError(f"QuantScheme: clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"QuantScheme: activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"QuantScheme: weight_format must be one of {WEIGHT_FORMATS}, got {self.weight_format!r}")
        if self.activations is not None:
            if self.bits != 8 or not self.symmetric or self.group_size is not None:
                raise ValueError(
                    f"QuantScheme: activations={self.activations!r} needs 8-bit symmetric per-channel weights "
                    f"(bits=8, symmetric=True, group_size=None), got bits={self.bits}, symmetric={self.symmetric}, "
                    f"group_size={self.group_size}; use the W8A8 / FP8 presets")
            if self.scale_dtype != torch.float32:
                object.__setattr__(self, "scale_dtype", torch.float32)   # W8A8 kernels read float32 scales
        if self.weight_format == "fp8" and self.activations not in ("fp8", "fp8-static"):
            raise ValueError("QuantScheme: weight_format='fp8' needs activations='fp8' or 'fp8-static' "
                             "(FP8 weights multiply FP8 activations); use the FP8 presets")
        if self.activations in ("fp8", "fp8-static") and self.weight_format != "fp8":
            raise ValueError(f"QuantScheme: activations={self.activations!r} needs weight_format='fp8'")
        if self.weight_per_tensor and self.weight_format != "fp8":
            raise ValueError("QuantScheme: weight_per_tensor applies to FP8 weights only (weight_format='fp8')")
        if self.outlier_threshold is not None:
            if self.activations != "int8":
                raise ValueError("QuantScheme: outlier_threshold (LLM.int8) needs activations='int8' (dynamic "
                                 f"per-token), got {self.activations!r}")
            if not float(self.outlier_threshold) > 0:
                raise ValueError(f"QuantScheme: outlier_threshold must be positive, got {self.outlier_threshold!r}")

    def check_in_features(self, in_features: int, where: str) -> None:
        """Raise ValueError, prefixed with ``where``, if a group is wider than the layer."""
        if self.group_size is not None and self.group_size > in_features:
            raise ValueError(
                f"{where}: group_size {self.group_size} is larger than in_features {in_features}; use a "
                f"group size <= {in_features} (a preset suffix such as -g32) or per-channel "
                "(group_size=None, preset suffix -pc)")

    @property
    def weight_only(self) -> bool:
        """True for W*A16 schemes (activations not quantized)."""
        return self.activations is None

    @property
    def static_activations(self) -> bool:
        """Whether the layer needs a calibrated activation scale."""
        return self.activations is not None and self.activations.endswith("-static")

    @property
    def name(self) -> str:
        """Short label, e.g. ``"W4A16-g128-sym"``, ``"W8A16-pc-sym"``, ``"W8A8-int8-dynamic"``,
        ``"LLM.int8-t6"`` or ``"FP8-pc-static"``."""
        if self.activations is None:
            g = "pc" if self.group_size is None else f"g{self.group_size}"
            return f"W{self.bits}A16-{g}-{'sym' if self.symmetric else 'asym'}"
        kind = "static" if self.static_activations else "dynamic"
        if self.weight_format == "fp8":
            return f"FP8-{'pt' if self.weight_per_tensor else 'pc'}-{kind}"
        if self.outlier_threshold is not None:
            return f"LLM.int8-t{self.outlier_threshold:g}"
        return f"W8A8-int8-{kind}"


PRESETS: dict[str, QuantScheme] = {
    "W8A16": QuantScheme(bits=8, group_size=None, symmetric=True),
    "W4A16": QuantScheme(bits=4, group_size=128, symmetric=True),
    "W3A16": QuantScheme(bits=3, group_size=128, symmetric=False),
    "W2A16": QuantScheme(bits=2, group_size=64, symmetric=False),
    "W8A8": QuantScheme(bits=8, group_size=None, symmetric=True, activations="int8"),
    "LLM.INT8": QuantScheme(bits=8, group_size=None, symmetric=True, activations="int8", outlier_threshold=6.0),
    "FP8": QuantScheme(bits=8, group_size=None, symmetric=True, activations="fp8", weight_format="fp8"),
}

Target = "str | type[nn.Module]"


def _parse_preset(name: str) -> QuantScheme:
    parts = name.strip().upper().replace("_", "-").split("-")
    base = PRESETS.get(parts[0])
    if base is None:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} "
                         "(optionally with -g32/-g64/-g128/-pc and -sym/-asym suffixes)")
    changes: dict[str, Any] = {}
    act = base.activations
    for p in parts[1:]:
        if act is not None and p in ("STATIC", "DYNAMIC") and base.outlier_threshold is None:
            changes["activations"] = act.split("-")[0] + ("-static" if p == "STATIC" else "")
            if p == "STATIC" and base.weight_format == "fp8" and "weight_per_tensor" not in changes:
                changes["weight_per_tensor"] = True
        elif base.weight_format == "fp8" and p in ("PT", "PC"):
            changes["weight_per_tensor"] = p == "PT"
        elif base.outlier_threshold is not None and re.fullmatch(r"T\d+(\.\d+)?", p):
            changes["outlier_threshold"] = float(p[1:])
        elif act is not None:
            raise ValueError(f"preset {name!r}: unknown suffix {p.lower()!r} (W8A8 takes -static/-dynamic, "
                             "FP8 -static/-dynamic/-pt/-pc, LLM.int8 -t<threshold>)")
        elif p == "PC":
            changes["group_size"] = None
        elif re.fullmatch(r"G\d+", p):
            changes["group_size"] = int(p[1:])
        elif p == "SYM":
            changes["symmetric"] = True
        elif p == "ASYM":
            changes["symmetric"] = False
        else:
            raise ValueError(f"preset {name!r}: unknown suffix {p.lower()!r} "
                             "(use -g<N>, -pc, -sym or -asym)")
    return replace(base, **changes)


def _as_scheme(value: QuantScheme | Mapping[str, Any] | str, base: QuantScheme) -> QuantScheme:
    if isinstance(value, QuantScheme):
        return value
    if isinstance(value, str):
        return _parse_preset(value)
    if isinstance(value, Mapping):
        known = {f.name for f in fields(QuantScheme)}
        bad = set(value) - known
        if bad:
            raise ValueError(f"override fields {sorted(bad)} are not QuantScheme fields {sorted(known)}")
        return replace(base, **value)
    raise TypeError(f"an override must be a QuantScheme, a preset name or a dict of fields, got {type(value)}")


@dataclass
class QuantConfig:
    """Which linear layers to quantize, and with which :class:`QuantScheme`.

    Linear layers are the "linear-like" modules of :func:`lowbit.nn.is_linear_like`:
    ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored ``[in, out]``).

    Attributes:
        scheme: the default scheme (``QuantConfig.preset("W4A16")`` builds one from a preset).
        targets: modules to quantize: module types and/or regular expressions searched
            (``re.search``) in the module's qualified name (``"model.layers.3.mlp.down_proj"``).
            A type matches its instances; ``nn.Linear`` itself (the default) stands for every
            linear-like layer, so it also matches GPT-2 ``Conv1D`` layers (a subclass of
            ``nn.Linear``, or the ``Conv1D`` class, matches only its own instances). Only
            linear-like modules are ever quantized; a regex that matches none of the model's
            linear layers is a warning.
        ignore: regular expressions of layers to leave in full precision (searched like
            ``targets``); default ``["lm_head"]``: the output projection is small relative
            to its error's effect on every logit.
        overrides: ``{regex: scheme}``: layers whose name matches use that scheme instead;
            a scheme may be a :class:`QuantScheme`, a preset name or a dict of fields that
            change the default scheme (``{"down_proj": {"bits": 8}}``). When several match,
            the last one wins.
    """

    scheme: QuantScheme = field(default_factory=lambda: PRESETS["W4A16"])
    targets: list = field(default_factory=lambda: [nn.Linear])
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.scheme, (str, Mapping)):
            self.scheme = _as_scheme(self.scheme, QuantScheme())
        if not isinstance(self.scheme, QuantScheme):
            raise TypeError(f"QuantConfig: scheme must be a QuantScheme or a preset name, got {type(self.scheme)}")
        if isinstance(self.targets, (str, type)):
            self.targets = [self.targets]
        if isinstance(self.ignore, str):
            self.ignore = [self.ignore]
        for t in self.targets:
            if isinstance(t, type):
                if not issubclass(t, nn.Module):
                    raise TypeError(f"QuantConfig: target type {t} is not an nn.Module")
            elif isinstance(t, str):
                _compile(t, "targets")
            else:
                raise TypeError(f"QuantConfig: a target must be a module type or a regex string, got {t!r}")
        for p in self.ignore:
            _compile(p, "ignore")
        self.overrides = {p: _as_scheme(s, self.scheme) for p, s in dict(self.overrides).items()}
        for p in self.overrides:
            _compile(p, "overrides")

    @classmethod
    def preset(cls, name: str, **changes) -> "QuantConfig":
        """A config from a preset name (see the module docstring) with optional changes.

        ``changes`` may set scheme fields (``bits``, ``group_size``, ``symmetric``,
        ``scale_dtype``, ``clip_ratio``) and config fields (``targets``, ``ignore``,
        ``overrides``): ``QuantConfig.preset("W4A16", group_size=32, ignore=[])``.
        """
        scheme_fields = {f.name for f in fields(QuantScheme)}
        scheme = replace(_parse_preset(name), **{k: v for k, v in changes.items() if k in scheme_fields})
        rest = {k: v for k, v in changes.items() if k not in scheme_fields}
        bad = set(rest) - {"targets", "ignore", "overrides"}
        if bad:
            raise TypeError(f"QuantConfig.preset: unknown arguments {sorted(bad)}")
        return cls(scheme=scheme, **rest)

    # -- layer selection -----------------------------------------------------------

    def is_target(self, name: str, module: nn.Module) -> bool:
        """Whether ``module`` (named ``name`` in its model) is quantized under this config:
        a linear-like module (:func:`lowbit.nn.is_linear_like`) that no ``ignore`` pattern
        matches and some target does (``nn.Linear`` matching every linear-like module)."""
        from .nn import is_linear_like   # lowbit.nn imports this module

        if not is_linear_like(module):
            return False
        if any(re.search(p, name) for p in self.ignore):
            return False
        return any((isinstance(module, t) or t is nn.Linear) if isinstance(t, type)
                   else re.search(t, name) is not None for t in self.targets)

    def scheme_for(self, name: str) -> QuantScheme:
        """The scheme of the layer ``name``: the last matching override, else the default."""
        chosen = self.scheme
        for p, s in self.overrides.items():
            if re.search(p, name):
                chosen = s
        return chosen

    def unmatched_patterns(self, linear_names: Iterable[str]) -> list[str]:
        """Target and override regexes that match none of ``linear_names`` (the qualified
        names of the model's linear-like layers)."""
        names = list(linear_names)
        pats = [t for t in self.targets if isinstance(t, str)] + list(self.overrides)
        return [p for p in pats if not any(re.search(p, n) for n in names)]


def _compile(pattern: str, what: str):
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"QuantConfig: {what} pattern {pattern!r} is not a valid regex: {e}") from None
