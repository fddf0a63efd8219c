"""Block-by-block calibration: GPTQ on a model one transformer block at a time.

The inputs of the first block are captured once (the model runs up to it and stops);
then, per block: a copy of the block goes to the calibration device, the calibration
inputs run through it with hooks that accumulate each targeted linear layer's Hessian
(:func:`lowbit.ops.accumulate_hessian`), its layers are solved
(:func:`lowbit.algorithms.gptq.gptq_quantize_weight`), and the block's outputs, recomputed
with the quantized weights, become the next block's inputs (Frantar et al., 2022, sec. 4,
"sequential" quantization). With ``true_sequential`` the layers of a block are solved in
the order the block calls them, each group's inputs recomputed after the previous groups
are quantized.

The model itself is never written to: blocks are processed as copies (on the device) and
the quantized layers are swapped in only after every block succeeded, so an error leaves
the model as it was. Peak device memory is one block plus the calibration activations
(``[samples, seqlen, hidden]`` twice); the rest of the model stays where it is (the CPU, for
a model larger than the device).
"""
from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import ops
from ._report import ratio_db
from .algorithms.gptq import GPTQ, GPTQResult, gptq_quantize_weight
from .architectures import find_blocks
from .config import QuantScheme
from .eval import model_context
from .nn import QuantLinear, is_linear_like, linear_weight

__all__ = ["CalibrationError", "gptq_model", "scale_model", "LayerResult", "check_calibration"]

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """Calibration data that cannot be used (no samples, too long for the model...)."""


class _Stop(Exception):
    pass


@dataclass
class LayerResult:
    """One layer's calibrated result: the quantized layer (on the original layer's device,
    not yet swapped in) and the statistics behind its report."""

    name: str
    layer: nn.Module        # QuantLinear, or W8A8Linear / FP8Linear
    weight_sqnr_db: float
    output_sqnr_db: float   # 10 log10(tr(W H W^T) / tr(D H D^T)), D = W - W_hat: exact on the calibration rows
    loss: float | None      # GPTQ's objective
    damp: float | None      # the dampening that succeeded
    samples: int            # rows (tokens) in the Hessian


def check_calibration(model: nn.Module, calibration) -> tuple[dict, int]:
    """Validated calibration as keyword arguments (``input_ids`` int64 ``[B, L]`` plus any
    other tensors) and the sample count ``B``. Errors say what to pass instead."""
    if calibration is None:
        raise CalibrationError("lowbit.quantize: this method needs calibration data: pass calibration=input_ids "
                               "(int64 [samples, seqlen], e.g. lowbit.data.calibration_samples(tokenizer, "
                               "texts, n=128, seqlen=2048))")
    kwargs = dict(calibration) if isinstance(calibration, dict) else {"input_ids": calibration}
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = next((v for v in kwargs.values() if torch.is_tensor(v)), None)
    if ids is None or not torch.is_tensor(ids):
        raise CalibrationError("lowbit.quantize: calibration must be an int64 input_ids tensor [samples, seqlen] "
                               "or a dict of model inputs holding one")
    if ids.dim() != 2:
        raise CalibrationError(f"lowbit.quantize: calibration input_ids must be 2-D [samples, seqlen], got shape "
                               f"{list(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise CalibrationError(f"lowbit.quantize: calibration has zero samples (shape {list(ids.shape)}); GPTQ "
                               "needs at least one sequence (128 x 2048 tokens is the paper's setting)")
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if isinstance(types, (list, tuple)) and len(set(types)) > 1:
        raise CalibrationError(
            f"lowbit.quantize: this model's blocks take different attention inputs per layer type "
            f"({sorted(set(map(str, types)))}: e.g. sliding-window and full attention); block-by-block "
            "calibration replays the first block's attention inputs to every block and does not support it yet")
    ctx = model_context(model)
    if ctx is not None and ids.shape[1] > ctx:
        raise CalibrationError(f"lowbit.quantize: calibration sequences have {ids.shape[1]} tokens but the model's "
                               f"context is {ctx}; cut them to at most {ctx} (calibration_samples(..., seqlen={ctx}))")
    return kwargs, int(ids.shape[0])


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def _capture_first_block(model: nn.Module, first: nn.Module, kwargs: dict, n: int, batch_size: int,
                         device: torch.device) -> tuple[list[tuple[tuple, dict]], list[Tensor | None]]:
    """(args, kwargs) of the first block's call per calibration batch, on ``device``, and
    each batch's 2-D attention mask (bool ``[b, L]``; None without one): padding tokens
    are left out of the Hessians."""
    got: list[tuple[tuple, dict]] = []
    masks: list[Tensor | None] = []
    current: list[Tensor | None] = [None]

    def hook(_mod, args, kw):
        got.append((_to(args, device), _to(kw, device)))
        masks.append(current[0])
        raise _Stop

    h = first.register_forward_pre_hook(hook, with_kwargs=True)
    mdev = _model_device(model)
    params = inspect.signature(model.forward).parameters
    extra = {"use_cache": False} if "use_cache" in params else {}
    try:
        for b0 in range(0, n, batch_size):
            batch = {k: (v[b0:b0 + batch_size] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v)
                     for k, v in kwargs.items()}
            mask = batch.get("attention_mask")
            current[0] = mask.to(device).bool() if torch.is_tensor(mask) and mask.dim() == 2 else None
            try:
                model(**_to(batch, mdev), **extra)
            except _Stop:
                continue
            raise CalibrationError("lowbit.quantize: the model's forward never called its first block; pass "
                                   "blocks='<dotted path of the nn.ModuleList of blocks>'")
    finally:
        h.remove()
    return got, masks


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(args: tuple, kw: dict, h: Tensor) -> tuple[tuple, dict]:
    if args:
        return (h,) + tuple(args[1:]), kw
    return args, {**kw, "hidden_states": h}


@torch.no_grad()
def _call_order(block: nn.Module, names: list[str], inputs: list[tuple[tuple, dict]]) -> list[list[str]]:
    """The targeted linears of ``block`` grouped as the block calls them: consecutive layers
    that read the same input tensor (the same object) form one group (q/k/v, then o, then
    gate/up, down). Batches are run until every layer has been called once."""
    order: list[tuple[str, Tensor]] = []     # the inputs are kept alive: no address reuse
    handles = []
    for nm in names:
        mod = block.get_submodule(nm)

        def hook(_m, args, nm=nm):
            if all(o[0] != nm for o in order):
                order.append((nm, args[0]))
            if len(order) == len(names):
                raise _Stop
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        for args, kw in inputs:
            try:
                block(*args, **kw)
            except _Stop:
                break
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for nm, x in order:
        if groups and x is last:
            groups[-1].append(nm)
        else:
            groups.append([nm])
        last = x
    missing = [nm for nm in names if all(nm != o[0] for o in order)]
    if missing:
        log.warning("GPTQ: layers %s were not called by their block on any calibration batch; "
                    "they get round-to-nearest", missing)
    return groups


@torch.no_grad()
def _hessians(block: nn.Module, names: list[str], inputs, masks, dtype: torch.dtype, device,
              stop_early: bool) -> tuple[dict, dict]:
    """Hessians ``2 X^T X / n`` of the layers ``names`` of ``block`` over every calibration
    batch (rows under a 0 of the attention mask left out). With ``stop_early`` the block's
    forward stops once all of them have seen their input: later layers' outputs are not
    needed for these Hessians (true-sequential groups)."""
    hs: dict[str, Tensor] = {}
    seen: dict[str, int] = {}
    called: set[str] = set()
    current: list[Tensor | None] = [None]
    handles = []
    for nm in names:
        mod = block.get_submodule(nm)
        k = linear_weight(mod).shape[1]
        hs[nm] = torch.zeros(k, k, dtype=dtype, device=device)
        seen[nm] = 0

        def hook(_m, args, nm=nm):
            x = args[0].detach()
            mask = current[0]
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask]
            rows = x.numel() // x.shape[-1]
            ops.accumulate_hessian(hs[nm], x, seen[nm])
            seen[nm] += rows
            called.add(nm)
            if stop_early and len(called) == len(names):
                raise _Stop
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        for (args, kw), mask in zip(inputs, masks):
            current[0] = mask
            called.clear()
            try:
                block(*args, **kw)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return hs, seen


def _trace(w: Tensor, h: Tensor) -> float:
    return float(((w @ h) * w).sum())


def _prepare(model: nn.Module, schemes: dict, calibration, device, blocks, batch_size: int):
    """What every block-by-block method starts from: the blocks, the calibration device,
    the targeted layers per block (names relative to it) and outside any block, and the
    first block's captured inputs and attention masks."""
    kwargs, n = check_calibration(model, calibration)
    prefix, layers = find_blocks(model, blocks)
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else _model_device(model)
    device = torch.device(device)
    per_block: list[list[str]] = [[] for _ in layers]
    outside = []
    for name in schemes:
        rel = name[len(prefix) + 1:] if name.startswith(prefix + ".") else None
        idx, _, sub = rel.partition(".") if rel else ("", "", "")
        if rel and idx.isdigit() and int(idx) < len(layers) and sub:
            per_block[int(idx)].append(sub)
        else:
            outside.append(name)

    flags = [(m, m.training) for m in model.modules()]
    model.eval()        # no dropout in the capture pass; the flags are put back after it
    try:
        inputs, masks = _capture_first_block(model, layers[0], kwargs, n, max(1, batch_size), device)
    finally:
        for m, t in flags:
            m.training = t
    return prefix, layers, device, per_block, outside, inputs, masks


@torch.no_grad()
def gptq_model(
    model: nn.Module,
    schemes: dict[str, QuantScheme],
    options: GPTQ,
    calibration,
    *,
    device: torch.device | str | None = None,
    blocks: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[dict[str, LayerResult], list[str]]:
    """GPTQ every layer in ``schemes`` (qualified name -> scheme) that lives in a
    transformer block; returns the results by name and the names outside any block (the
    caller quantizes those with RTN). The model is not modified."""
    prefix, layers, device, per_block, outside, inputs, masks = _prepare(
        model, schemes, calibration, device, blocks, batch_size)
    results: dict[str, LayerResult] = {}
    bar = tqdm(range(len(layers)), desc="lowbit gptq", unit="block", disable=not progress)
    for i in bar:
        block = copy.deepcopy(layers[i]).to(device).eval()
        names = per_block[i]
        if names:
            groups = _call_order(block, names, inputs) if options.true_sequential else [names]
            for group in groups:
                # A true-sequential group reads one tensor: one Hessian serves all its layers.
                lead = group[:1] if options.true_sequential else group
                hs, seen = _hessians(block, lead, inputs, masks, options.hessian_dtype, device,
                                     stop_early=options.true_sequential)
                for nm in group[1:] if options.true_sequential else []:
                    hs[nm], seen[nm] = hs[group[0]], seen[group[0]]
                for nm in group:
                    full = f"{prefix}.{i}.{nm}"
                    if seen[nm] == 0:      # never called on this data: no Hessian, RTN below
                        continue
                    mod = block.get_submodule(nm)
                    w_view = linear_weight(mod)
                    w = w_view.detach().float()
                    res = gptq_quantize_weight(w, hs[nm], schemes[full], options, full)
                    w_hat = res.dequantize(torch.float32)
                    h = hs[nm].float()
                    out_db = ratio_db(_trace(w, h), _trace(w - w_hat, h))
                    w_db = ratio_db(float(w.pow(2).sum()), float((w - w_hat).pow(2).sum()))
                    w_view.copy_(w_hat.to(w_view.dtype))
                    orig = model.get_submodule(full)
                    results[full] = LayerResult(full, _to_layer(res, schemes[full], orig), w_db, out_db,
                                                res.loss, res.damp, seen[nm])
                    log.info("GPTQ %s (%s): loss %.4g, output SQNR %.2f dB, damp %g", full, schemes[full].name,
                             res.loss, out_db, res.damp)
                del hs
            missing = [nm for nm in names if f"{prefix}.{i}.{nm}" not in results]
            outside.extend(f"{prefix}.{i}.{nm}" for nm in missing)
        inputs = [_with_hidden(args, kw, _first_output(block(*args, **kw))) for args, kw in inputs]
        del block
    return results, outside


def _to_layer(r: GPTQResult, scheme: QuantScheme, orig: nn.Module) -> QuantLinear:
    """The QuantLinear of a GPTQ result, on ``orig``'s device (with its bias)."""
    w = linear_weight(orig)
    dev = w.device
    codes, scales, zeros = r.codes, r.scales, r.zeros
    perm = r.perm
    if perm is not None:
        codes = codes.index_select(1, perm)
    bias = getattr(orig, "bias", None)
    return QuantLinear.from_codes(
        codes.to(dev), scales.to(dev), zeros.to(dev), scheme.bits, scheme.group_size, symmetric=scheme.symmetric,
        bias=None if bias is None else bias.detach(), scale_dtype=scheme.scale_dtype,
        perm=None if perm is None else perm.to(dev))


# -- AWQ / SmoothQuant / calibrated RTN: scale, then quantize, block by block -----------------

@dataclass
class _Stats:
    """Statistics of one input tensor over the calibration rows."""

    gram: Tensor        # float32 [K, K], 2 X^T X / n (accumulate_hessian)
    absmax: Tensor      # float32 [K]
    abssum: Tensor      # float64 [K]
    rows: int = 0

    def scale(self, s: Tensor) -> None:
        """The statistics of ``x / s`` (after ``s`` is folded into the producer)."""
        inv = 1.0 / s.to(self.gram)
        self.gram.mul_(inv[:, None]).mul_(inv[None, :])
        self.absmax.mul_(inv)
        self.abssum.mul_(inv.double())

    @property
    def mean(self) -> Tensor:
        return (self.abssum / max(self.rows, 1)).float()


@torch.no_grad()
def _input_stats(block: nn.Module, leads: list[str], inputs, masks, device, where: str) -> dict[str, _Stats]:
    """Gram matrix, max |x| and sum |x| of the inputs of the layers ``leads`` over every
    calibration batch (padding rows left out). NaN/Inf activations are an error naming
    the layer."""
    stats: dict[str, _Stats] = {}
    current: list[Tensor | None] = [None]
    handles = []
    for nm in leads:
        k = linear_weight(block.get_submodule(nm)).shape[1]
        stats[nm] = _Stats(torch.zeros(k, k, dtype=torch.float32, device=device),
                           torch.zeros(k, dtype=torch.float32, device=device),
                           torch.zeros(k, dtype=torch.float64, device=device))

        def hook(_m, args, nm=nm):
            x = args[0].detach()
            mask = current[0]
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask]
            st = stats[nm]
            try:
                ops.activation_stats(st.absmax, st.abssum, x)
            except ValueError as e:
                raise ValueError(f"lowbit.quantize: the calibration activations of layer '{where}.{nm}' are not "
                                 f"finite ({e}); check the model in full precision on this data first; the model "
                                 "is left unmodified") from None
            ops.accumulate_hessian(st.gram, x, st.rows)
            st.rows += x.numel() // x.shape[-1]
        handles.append(block.get_submodule(nm).register_forward_pre_hook(hook))
    try:
        for (args, kw), mask in zip(inputs, masks):
            current[0] = mask
            block(*args, **kw)
    finally:
        for h in handles:
            h.remove()
    return stats


def _usable_groups(block: nn.Module, groups, names: list[str], where: str, method: str) -> list:
    """The scaling groups that apply to this block: every linear targeted and present, the
    producer present with a matching width (grouped-query attention's v_proj is narrower
    than o_proj's input: no fold). A producer that cannot absorb scales is an error."""
    out = []
    for g in groups:
        if not all(nm in names for nm in g.linears):
            log.debug("%s: group %s -> %s skipped in %s: not all of its linears are targeted", method, g.prev,
                      list(g.linears), where)
            continue
        try:
            prev = block.get_submodule(g.prev)
        except AttributeError:
            log.debug("%s: %s has no module %r; group skipped", method, where, g.prev)
            continue
        k = linear_weight(block.get_submodule(g.linears[0])).shape[1]
        if any(linear_weight(block.get_submodule(nm)).shape[1] != k for nm in g.linears):
            raise ValueError(f"lowbit {method}: the layers {list(g.linears)} of '{where}' do not share an input "
                             "width; they cannot form one scaling group (fix groups=)")
        if is_linear_like(prev):
            if linear_weight(prev).shape[0] != k:
                log.debug("%s: %s.%s has %d outputs, %s reads %d: no fold (grouped-query attention)", method,
                          where, g.prev, linear_weight(prev).shape[0], g.linears[0], k)
                continue
        else:
            weight = getattr(prev, "weight", None)
            if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.shape[0] != k:
                raise ValueError(
                    f"lowbit {method}: '{where}.{g.prev}' ({type(prev).__name__}) cannot absorb the scales of "
                    f"{list(g.linears)}: it has no per-channel weight of length {k} (a norm without affine "
                    "weights?); the model is left unmodified. Pass groups= without this group (or [] for none)")
        out.append(g)
    return out


def _fold(block: nn.Module, g, s: Tensor, where: str, method: str) -> None:
    """Divide the producer's output channels by ``s`` and multiply the linears' input
    columns by it (float32 math, stored back in each tensor's dtype)."""
    prev = block.get_submodule(g.prev)
    if is_linear_like(prev):
        w = linear_weight(prev)
        w.copy_((w.float() / s.to(w.device)[:, None]).to(w.dtype))
    elif type(prev).__name__.startswith("Gemma"):
        # Gemma's RMSNorm multiplies by (1 + weight).
        prev.weight.copy_(((1.0 + prev.weight.float()) / s.to(prev.weight.device) - 1.0).to(prev.weight.dtype))
    else:
        prev.weight.copy_((prev.weight.float() / s.to(prev.weight.device)).to(prev.weight.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, Tensor):
        bias.copy_((bias.float() / s.to(bias.device)).to(bias.dtype))
    for p in prev.parameters(recurse=False):
        if not torch.isfinite(p).all():
            raise ValueError(f"lowbit {method}: folding the scales of {list(g.linears)} into '{where}.{g.prev}' "
                             f"overflows its {p.dtype} weights (scales {float(s.min()):.3g} .. {float(s.max()):.3g}); "
                             "quantize the model in float32 or bfloat16; the model is left unmodified")
    for nm in g.linears:
        w = linear_weight(block.get_submodule(nm))
        w.copy_((w.float() * s.to(w.device)[None, :]).to(w.dtype))
        if not torch.isfinite(w).all():
            raise ValueError(f"lowbit {method}: the scaled weight of '{where}.{nm}' overflows {w.dtype}; quantize "
                             "the model in float32 or bfloat16; the model is left unmodified")


def _quantize_layer(mod: nn.Module, full: str, scheme: QuantScheme, st: _Stats, options, orig: nn.Module):
    """The quantized layer (on ``orig``'s device) of the block-copy layer ``mod`` and its
    dequantized weight (float32, on ``mod``'s device), with GPTQ's loss and damp."""
    from .algorithms.awq import AWQ, awq_clip
    from .nn.w8a8 import make_w8a8

    w = linear_weight(mod).detach().float()
    bias = getattr(mod, "bias", None)
    bias = None if bias is None else bias.detach()
    dev = linear_weight(orig).device
    loss = damp = None
    if not scheme.weight_only:
        layer = make_w8a8(w, bias, scheme, input_absmax=float(st.absmax.max()) if st.absmax.numel() else 0.0)
        w_hat = layer.dequantize(torch.float32)
    elif isinstance(options, AWQ) and options.gptq is not None:
        res = gptq_quantize_weight(w, st.gram, scheme, options.gptq, full)
        layer = _to_layer(res, scheme, mod)
        w_hat = res.dequantize(torch.float32)
        loss, damp = res.loss, res.damp
    elif isinstance(options, AWQ) and options.clips(full):
        scales, zeros, codes = awq_clip(w, st.gram, scheme, options, full)
        layer = QuantLinear.from_codes(codes, scales.to(scheme.scale_dtype), zeros, scheme.bits, scheme.group_size,
                                       symmetric=scheme.symmetric, bias=bias, scale_dtype=scheme.scale_dtype)
        w_hat = layer.dequantize(torch.float32)
    else:
        layer = QuantLinear.from_linear(mod, scheme=scheme)
        w_hat = layer.dequantize(torch.float32)
    return layer.to(dev), w_hat, loss, damp


@torch.no_grad()
def scale_model(
    model: nn.Module,
    schemes: dict[str, QuantScheme],
    options,
    calibration,
    *,
    device: torch.device | str | None = None,
    blocks: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[dict[str, LayerResult], list[str], dict[str, dict[str, Tensor]]]:
    """AWQ (``options`` an :class:`lowbit.algorithms.awq.AWQ`), SmoothQuant (a
    :class:`lowbit.algorithms.smoothquant.SmoothQuant`) or calibrated RTN (None: static
    activation scales only), block by block.

    Per block (a copy on ``device``): one pass collects each scaling group's input
    statistics (Gram matrix, max and mean ``|x|``); each group's scales are chosen and
    folded into the producer and the linears; every targeted layer is quantized (AWQ: clip
    search or GPTQ on the scaled weight; W8A8/FP8: RTN with the calibrated input scale),
    its dequantized weight written into the copy, and the block's outputs recomputed for
    the next block.

    Returns:
        ``(results by name, names outside the blocks (the caller uses RTN), folds)``:
        ``folds`` maps a non-targeted module (a norm) to the parameters it must take (its
        weight and bias divided by the scales). The model is not modified.
    """
    from .algorithms.awq import AWQ, awq_scales
    from .algorithms.smoothquant import SmoothQuant, smooth_scales
    from .architectures import scale_groups

    method = getattr(options, "name", "rtn")
    groups = scale_groups(model, options.groups) if options is not None else ()
    prefix, layers, device, per_block, outside, inputs, masks = _prepare(
        model, schemes, calibration, device, blocks, batch_size)
    results: dict[str, LayerResult] = {}
    folds: dict[str, dict[str, Tensor]] = {}
    bar = tqdm(range(len(layers)), desc=f"lowbit {method}", unit="block", disable=not progress)
    for i in bar:
        where = f"{prefix}.{i}"
        block = copy.deepcopy(layers[i]).to(device).eval()
        names = per_block[i]
        if names:
            used = _usable_groups(block, groups, names, where, method)
            lead_of = {nm: nm for nm in names}
            for g in used:
                for nm in g.linears:
                    lead_of[nm] = g.linears[0]
            leads = list(dict.fromkeys(lead_of.values()))
            stats = _input_stats(block, leads, inputs, masks, device, where)
            for g in used:
                st = stats[g.linears[0]]
                if st.rows == 0:
                    continue
                mods = [block.get_submodule(nm) for nm in g.linears]
                w = torch.cat([linear_weight(m).detach().float() for m in mods])
                scheme = schemes[f"{where}.{g.linears[0]}"]
                if isinstance(options, AWQ):
                    dtype = linear_weight(mods[0]).dtype
                    s, losses = awq_scales(w, st.gram, st.mean, scheme, options, float(torch.finfo(dtype).max))
                    best = int(torch.argmin(losses))
                    log.info("AWQ %s.%s -> %s: alpha %.2f, output error %.4g (RTN %.4g)", where, g.prev,
                             list(g.linears), best / options.n_grid, float(losses[best]), float(losses[0]))
                elif isinstance(options, SmoothQuant):
                    s = smooth_scales(st.absmax, w.abs().amax(dim=0), options.alpha)
                else:
                    continue
                _fold(block, g, s, where, method)
                st.scale(s)
                prev = block.get_submodule(g.prev)
                if f"{where}.{g.prev}" not in schemes:
                    folds[f"{where}.{g.prev}"] = {pn: p.detach().clone()
                                                  for pn, p in prev.named_parameters(recurse=False)}
            for nm in names:
                full = f"{where}.{nm}"
                st = stats[lead_of[nm]]
                if st.rows == 0:
                    continue    # never called on this data: RTN below
                mod = block.get_submodule(nm)
                w = linear_weight(mod).detach().float()
                layer, w_hat, loss, damp = _quantize_layer(mod, full, schemes[full], st, options,
                                                           model.get_submodule(full))
                out_db = ratio_db(_trace(w, st.gram), _trace(w - w_hat, st.gram))
                w_db = ratio_db(float(w.pow(2).sum()), float((w - w_hat).pow(2).sum()))
                w_view = linear_weight(mod)
                w_view.copy_(w_hat.to(w_view.dtype))
                results[full] = LayerResult(full, layer, w_db, out_db, loss, damp, st.rows)
                log.info("%s %s (%s): output SQNR %.2f dB", method, full, schemes[full].name, out_db)
            del stats
            outside.extend(f"{where}.{nm}" for nm in names if f"{where}.{nm}" not in results)
        inputs = [_with_hidden(args, kw, _first_output(block(*args, **kw))) for args, kw in inputs]
        del block
    return results, outside, folds


@torch.no_grad()
def input_absmax(model: nn.Module, names: list[str], calibration, batch_size: int = 8) -> dict[str, float]:
    """``max |x|`` of the inputs of the layers ``names`` over the calibration data, from
    full-model forward passes (for layers outside the transformer blocks, e.g. a BERT MLM
    head, whose static activation scale the block pipeline cannot measure)."""
    kwargs, n = check_calibration(model, calibration)
    amax = {nm: 0.0 for nm in names}
    handles = []
    for nm in names:
        def hook(_m, args, nm=nm):
            x = args[0].detach()
            if not torch.isfinite(x).all():
                raise ValueError(f"lowbit.quantize: the calibration activations of layer '{nm}' hold NaN or Inf; "
                                 "the model is left unmodified")
            if x.numel():
                amax[nm] = max(amax[nm], float(x.abs().max()))
        handles.append(model.get_submodule(nm).register_forward_pre_hook(hook))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    mdev = _model_device(model)
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    try:
        for b0 in range(0, n, max(1, batch_size)):
            batch = {k: (v[b0:b0 + batch_size] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v)
                     for k, v in kwargs.items()}
            model(**_to(batch, mdev), **extra)
    finally:
        for h in handles:
            h.remove()
        for m, t in flags:
            m.training = t
    return amax
