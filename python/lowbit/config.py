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
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Mapping

import torch
from torch import nn

__all__ = ["QuantScheme", "QuantConfig", "PRESETS", "SUPPORTED_BITS"]

# Bit widths that lowbit's weight-only matmul kernels run (2..8; 4 and 8 have packed fast paths).
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.float16
    clip_ratio: float = 1.0

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

    def check_in_features(self, in_features: int, where: str) -> None:
        """Raise ValueError, prefixed with ``where``, if a group is wider than the layer."""
        if self.group_size is not None and self.group_size > in_features:
            raise ValueError(
                f"{where}: group_size {self.group_size} is larger than in_features {in_features}; use a "
                f"group size <= {in_features} (a preset suffix such as -g32) or per-channel "
                "(group_size=None, preset suffix -pc)")

    @property
    def name(self) -> str:
        """Short label, e.g. ``"W4A16-g128-sym"`` or ``"W8A16-pc-sym"``."""
        g = "pc" if self.group_size is None else f"g{self.group_size}"
        return f"W{self.bits}A16-{g}-{'sym' if self.symmetric else 'asym'}"


PRESETS: dict[str, QuantScheme] = {
    "W8A16": QuantScheme(bits=8, group_size=None, symmetric=True),
    "W4A16": QuantScheme(bits=4, group_size=128, symmetric=True),
    "W3A16": QuantScheme(bits=3, group_size=128, symmetric=False),
    "W2A16": QuantScheme(bits=2, group_size=64, symmetric=False),
}

Target = "str | type[nn.Module]"


def _parse_preset(name: str) -> QuantScheme:
    parts = name.strip().upper().replace("_", "-").split("-")
    base = PRESETS.get(parts[0])
    if base is None:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} "
                         "(optionally with -g32/-g64/-g128/-pc and -sym/-asym suffixes)")
    changes: dict[str, Any] = {}
    for p in parts[1:]:
        if p == "PC":
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
