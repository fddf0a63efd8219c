"""``lowbit.quantize``: swap a model's ``nn.Linear`` layers for :class:`lowbit.nn.QuantLinear`."""
from __future__ import annotations

import logging
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._report import format_table, ratio_db
from .config import QuantConfig, QuantScheme
from .algorithms.awq import AWQ
from .algorithms.gptq import GPTQ
from .algorithms.smoothquant import SmoothQuant
from .nn import QuantLinear, is_linear_like, linear_weight
from .nn.w8a8 import make_w8a8

__all__ = ["quantize", "QuantReport", "LayerReport", "model_bytes", "METHODS"]

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "awq", "smoothquant")
_METHOD_CLASSES = {"gptq": GPTQ, "awq": AWQ, "smoothquant": SmoothQuant}


@dataclass
class LayerReport:
    """One quantized layer, measured against its full-precision original.

    ``weight_sqnr_db`` is ``10 log10(|W|^2 / |W - W_hat|^2)``; ``output_sqnr_db`` the same
    for the layer's outputs on calibration inputs (None when no calibration was given:
    on isotropic random inputs it would only repeat the weight figure).
    """

    name: str
    out_features: int
    in_features: int
    scheme: str
    weight_sqnr_db: float
    output_sqnr_db: float | None
    bytes_before: int
    bytes_after: int
    gptq_loss: float | None = None
    damp: float | None = None


@dataclass
class QuantReport:
    """What :func:`quantize` did: per-layer SQNR and bytes, and whole-model bytes."""

    method: str
    layers: list[LayerReport] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    seconds: float = 0.0

    @property
    def min_weight_sqnr_db(self) -> float:
        return min((r.weight_sqnr_db for r in self.layers), default=math.inf)

    @property
    def compression(self) -> float:
        """Model bytes before / after."""
        return self.model_bytes_before / max(self.model_bytes_after, 1)

    def table(self) -> str:
        """Per-layer table (plain text)."""
        rows = [[r.name, f"{r.out_features}x{r.in_features}", r.scheme, f"{r.weight_sqnr_db:.2f}",
                 "-" if r.output_sqnr_db is None else f"{r.output_sqnr_db:.2f}",
                 r.bytes_before, r.bytes_after] for r in self.layers]
        return format_table(["layer", "shape", "scheme", "W SQNR dB", "out SQNR dB", "bytes before",
                             "bytes after"], rows, right={3, 4, 5, 6})

    def summary(self) -> str:
        """One line: layers, SQNR range, model bytes."""
        if not self.layers:
            return f"{self.method}: no layer quantized"
        w = [r.weight_sqnr_db for r in self.layers]
        o = [r.output_sqnr_db for r in self.layers if r.output_sqnr_db is not None]
        out = f", output SQNR min {min(o):.2f} dB" if o else ""
        return (f"{self.method}: {len(self.layers)} layers in {self.seconds:.1f} s, weight SQNR min "
                f"{min(w):.2f} / mean {sum(w) / len(w):.2f} dB{out}; model {_mib(self.model_bytes_before)} -> "
                f"{_mib(self.model_bytes_after)} ({self.compression:.2f}x smaller)")

    def to_dict(self) -> dict:
        return {"method": self.method, "model_bytes_before": self.model_bytes_before,
                "model_bytes_after": self.model_bytes_after, "seconds": self.seconds,
                "layers": [asdict(r) for r in self.layers]}

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, counting shared (tied) storage once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _sqnr_db(ref: Tensor, out: Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ratio_db(ref.pow(2).sum().item(), (ref - out).pow(2).sum().item())


def _validate(name: str, module: nn.Module, scheme: QuantScheme) -> None:
    w = linear_weight(module)
    k = w.shape[1]
    scheme.check_in_features(k, f"lowbit.quantize: layer '{name}' (for this layer alone, "
                                f"QuantConfig(overrides={{{re.escape(name)!r}: {{'group_size': None}}}}))")
    if w.device.type == "meta":
        raise ValueError(f"lowbit.quantize: layer '{name}' has its weight on the meta device; "
                         "load the weights before quantizing")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"lowbit.quantize: layer '{name}' has a {w.dtype} weight; "
                        "quantize a float32/float16/bfloat16 model (model.to(torch.float32))")
    if not torch.isfinite(w).all():
        raise ValueError(f"lowbit.quantize: layer '{name}' has NaN or Inf in its weight; "
                         "the model is left unmodified")


@torch.no_grad()
def _capture_inputs(model: nn.Module, layers: dict[str, nn.Linear], calibration, rows: int) -> dict[str, Tensor]:
    """Up to ``rows`` input rows ``[rows, K]`` (float32, on the layer's device) per layer,
    from one forward pass of ``calibration``, evenly spaced over the tokens seen."""
    got: dict[str, Tensor] = {}
    handles = []

    def hook(name):
        def fn(mod, args):
            if name in got:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            step = max(1, x.shape[0] // rows)
            got[name] = x[::step][:rows].float().clone()
        return fn

    for name, mod in layers.items():
        handles.append(mod.register_forward_pre_hook(hook(name)))
    try:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        if isinstance(calibration, dict):
            model(**{k: v.to(dev) if torch.is_tensor(v) else v for k, v in calibration.items()})
        else:
            model(calibration.to(dev))
    finally:
        for h in handles:
            h.remove()
    return got


def _check_method(method: str, schemes: dict[str, QuantScheme]) -> None:
    """Methods and schemes that go together: GPTQ and AWQ produce weight-only grids,
    SmoothQuant prepares activations for W8A8 / FP8."""
    act = sorted({s.name for s in schemes.values() if not s.weight_only})
    weight_only = sorted({s.name for s in schemes.values() if s.weight_only})
    if method in ("gptq", "awq") and act:
        raise ValueError(f"lowbit.quantize: method {method!r} computes weight-only grids, but the config asks for "
                         f"{act}; use method='smoothquant' (or 'rtn') for W8A8 / FP8 schemes")
    if method == "smoothquant" and weight_only:
        raise ValueError(f"lowbit.quantize: SmoothQuant migrates activation outliers for W8A8 / FP8 schemes, but the "
                         f"config asks for weight-only {weight_only}; use 'W8A8' / 'FP8' presets, or method='awq' "
                         "for weight-only schemes")


def _linear_bytes(m: nn.Module) -> int:
    bias = getattr(m, "bias", None)
    return m.weight.numel() * m.weight.element_size() + (0 if bias is None else bias.numel() * bias.element_size())


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(
    model: nn.Module,
    config: QuantConfig | str = "W4A16",
    method: str | GPTQ | AWQ | SmoothQuant = "rtn",
    *,
    calibration: Tensor | dict | None = None,
    report_rows: int = 256,
    progress: bool = True,
    device: torch.device | str | None = None,
    blocks: str | None = None,
    batch_size: int = 8,
) -> QuantReport:
    """Quantize ``model``'s targeted ``nn.Linear`` layers in place.

    Every layer ``config`` selects is replaced by a :class:`lowbit.nn.QuantLinear` (weight-only
    schemes) or a :class:`lowbit.nn.W8A8Linear` / :class:`lowbit.nn.FP8Linear` (W8A8, LLM.int8,
    FP8 schemes) on the same device. AWQ and SmoothQuant also rescale the norms (or linears)
    that feed the quantized layers, so the model computes the same function before rounding. All layers are checked first (group size vs in_features, weight dtype,
    NaN/Inf) and all are quantized before any is swapped in, so an error leaves the
    model unmodified.

    Args:
        model: any ``nn.Module`` (a Hugging Face model, a plain stack of Linear layers...).
        config: a :class:`QuantConfig` or a preset name (``"W4A16"``, ``"W8A16"``,
            ``"W4A16-g32-asym"``; see :mod:`lowbit.config`).
        method: ``"rtn"`` (round-to-nearest), ``"gptq"`` or a :class:`lowbit.GPTQ` with
            options (act-order, static groups, dampening, true-sequential...), ``"awq"`` or
            a :class:`lowbit.AWQ` (weight-only schemes; ``AWQ(gptq=GPTQ())`` runs GPTQ on the
            scaled weights), ``"smoothquant"`` or a :class:`lowbit.SmoothQuant` (W8A8 / FP8
            schemes). The calibrated methods run block by block (:mod:`lowbit.calibration`);
            targeted layers outside the transformer blocks get RTN. RTN with a static
            activation scheme (``"W8A8-static"``, ``"FP8-static"``) also calibrates, block by
            block, to measure each layer's input range.
        calibration: inputs of the unquantized model (int64 ``input_ids`` ``[B, L]``, or a
            dict of keyword arguments with ``input_ids``). Required by GPTQ, AWQ, SmoothQuant
            and static activation schemes (e.g.
            ``lowbit.data.calibration_samples(tokenizer, texts, n=128, seqlen=2048)``). For
            RTN it is optional and only measures each layer's output SQNR on up to
            ``report_rows`` of its real inputs; GPTQ reports the exact output SQNR on all
            calibration rows (from the Hessian).
        progress: show a tqdm bar over layers (RTN) or blocks (GPTQ).
        device: GPTQ's calibration device (default: CUDA when available, else the model's);
            one block at a time is copied there, the model stays where it is.
        blocks: dotted path of the model's ``nn.ModuleList`` of transformer blocks, for an
            architecture :func:`lowbit.architectures.find_blocks` does not know.
        batch_size: calibration sequences per forward call (GPTQ).

    Returns:
        A :class:`QuantReport` (``print(report)`` shows the per-layer table).
    """
    with torch.no_grad():
        return _quantize(model, config, method, calibration, report_rows, progress, device, blocks, batch_size)


def _quantize(model, config, method, calibration, report_rows, progress, device, blocks, batch_size) -> QuantReport:
    if isinstance(config, str):
        config = QuantConfig.preset(config)
    if isinstance(method, str) and method in _METHOD_CLASSES:
        method = _METHOD_CLASSES[method]()
    if isinstance(method, str) and method != "rtn":
        raise ValueError(f"lowbit.quantize: unknown method {method!r}; available: {', '.join(METHODS)} "
                         "or a lowbit.GPTQ(...) / lowbit.AWQ(...) / lowbit.SmoothQuant(...)")
    if not isinstance(method, (str, GPTQ, AWQ, SmoothQuant)):
        raise TypeError(f"lowbit.quantize: method must be a name ({', '.join(METHODS)}) or a lowbit.GPTQ / AWQ / "
                        f"SmoothQuant, got {type(method).__name__}")
    options = None if isinstance(method, str) else method
    gptq = options if isinstance(options, GPTQ) else None
    method = "rtn" if options is None else options.name
    start = time.perf_counter()
    linears = {n: m for n, m in model.named_modules() if is_linear_like(m)}
    for p in config.unmatched_patterns(linears):
        msg = f"lowbit.quantize: pattern {p!r} matches no nn.Linear or GPT-2 Conv1D layer of the model"
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
    chosen = {n: m for n, m in linears.items() if config.is_target(n, m)}
    if not chosen:
        msg = "lowbit.quantize: no layer selected; the model is unchanged"
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
    schemes = {n: config.scheme_for(n) for n in chosen}
    for n, m in chosen.items():
        _validate(n, m, schemes[n])
    _check_method(method, schemes)
    calibrated = options is not None and not isinstance(options, GPTQ)
    if options is None and any(s.static_activations for s in schemes.values()):
        calibrated = True      # static activation scales: measured block by block

    before = model_bytes(model)
    report = QuantReport(method=method, model_bytes_before=before)
    new: dict[str, QuantLinear] = {}
    rtn = chosen
    if gptq is not None and chosen:
        from .calibration import gptq_model

        results, outside = gptq_model(model, schemes, gptq, calibration, device=device, blocks=blocks,
                                      batch_size=batch_size, progress=progress)
        for n, r in results.items():
            m = chosen[n]
            report.layers.append(LayerReport(
                name=n, out_features=r.layer.out_features, in_features=r.layer.in_features, scheme=schemes[n].name,
                weight_sqnr_db=r.weight_sqnr_db, output_sqnr_db=r.output_sqnr_db,
                bytes_before=_linear_bytes(m), bytes_after=r.layer.nbytes, gptq_loss=r.loss, damp=r.damp))
            new[n] = r.layer
        rtn = {n: chosen[n] for n in outside}
        if rtn:
            log.info("GPTQ: %d targeted layers outside the transformer blocks get RTN: %s", len(rtn), list(rtn))
        calibration = None   # RTN layers outside the blocks: no output SQNR pass
    folds: dict = {}
    static_absmax: dict[str, float] = {}
    if calibrated and chosen:
        from .calibration import scale_model

        results, outside, folds = scale_model(model, schemes, options, calibration, device=device, blocks=blocks,
                                              batch_size=batch_size, progress=progress)
        for n, r in results.items():
            report.layers.append(LayerReport(
                name=n, out_features=r.layer.out_features, in_features=r.layer.in_features, scheme=schemes[n].name,
                weight_sqnr_db=r.weight_sqnr_db, output_sqnr_db=r.output_sqnr_db,
                bytes_before=_linear_bytes(chosen[n]), bytes_after=r.layer.nbytes, gptq_loss=r.loss, damp=r.damp))
            new[n] = r.layer
        rtn = {n: chosen[n] for n in outside}
        static = [n for n in rtn if schemes[n].static_activations]
        if static:    # outside the blocks (a BERT MLM head): measured on the unquantized model
            from .calibration import input_absmax

            static_absmax = input_absmax(model, static, calibration, batch_size)
            never = [n for n in static if static_absmax[n] == 0.0]
            if never:
                raise ValueError(f"lowbit.quantize: layers {never} never saw a nonzero input on the calibration "
                                 "data, so their static activation scale cannot be calibrated; give them a dynamic "
                                 "scheme (QuantConfig(overrides=...)) or ignore them")
        if rtn:
            log.info("%s: %d targeted layers outside the transformer blocks get RTN: %s", method, len(rtn), list(rtn))
        calibration = None
    inputs = _capture_inputs(model, rtn, calibration, report_rows) if calibration is not None and rtn else {}

    for n, m in tqdm(rtn.items(), desc="lowbit rtn", disable=not progress or not rtn or options is not None,
                     unit="layer"):
        s = schemes[n]
        w = linear_weight(m).detach().float()
        if s.weight_only:
            q = QuantLinear.from_linear(m, scheme=s)
        else:
            bias = getattr(m, "bias", None)
            q = make_w8a8(w, None if bias is None else bias.detach(), s, input_absmax=static_absmax.get(n))
        w_hat = q.dequantize(torch.float32)
        out_sqnr = None
        if n in inputs:
            x = inputs[n]
            out_sqnr = _sqnr_db(x @ w.t(), x @ w_hat.t())
        report.layers.append(LayerReport(
            name=n, out_features=w.shape[0], in_features=w.shape[1], scheme=s.name,
            weight_sqnr_db=_sqnr_db(w, w_hat), output_sqnr_db=out_sqnr,
            bytes_before=_linear_bytes(m), bytes_after=q.nbytes))
        new[n] = q
        log.debug("%s %s: weight SQNR %.2f dB", n, s.name, report.layers[-1].weight_sqnr_db)
    for n, params in folds.items():
        mod = model.get_submodule(n)
        for pn, t in params.items():
            p = getattr(mod, pn)
            p.data.copy_(t.to(device=p.device, dtype=p.dtype))
    for n, q in new.items():
        _set_submodule(model, n, q)
    report.model_bytes_after = model_bytes(model)
    report.seconds = time.perf_counter() - start
    from .hf import attach   # a transformers model: save_pretrained writes a lowbit checkpoint

    attach(model)
    log.info("%s", report.summary())
    return report
