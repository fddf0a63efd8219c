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
from .nn import QuantLinear, linear_weight

__all__ = ["CalibrationError", "gptq_model", "LayerResult", "check_calibration"]

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """Calibration data that cannot be used (no samples, too long for the model...)."""


class _Stop(Exception):
    pass


@dataclass
class LayerResult:
    """One layer's GPTQ result: the quantized layer (on the original layer's device, not
    yet swapped in) and the statistics behind its report."""

    name: str
    layer: QuantLinear
    weight_sqnr_db: float
    output_sqnr_db: float   # 10 log10(tr(W H W^T) / tr(D H D^T)), D = W - W_hat: exact on the calibration rows
    loss: float             # GPTQ's objective
    damp: float             # the dampening that succeeded
    samples: int            # rows (tokens) in the Hessian


def check_calibration(model: nn.Module, calibration) -> tuple[dict, int]:
    """Validated calibration as keyword arguments (``input_ids`` int64 ``[B, L]`` plus any
    other tensors) and the sample count ``B``. Errors say what to pass instead."""
    if calibration is None:
        raise CalibrationError("lowbit.quantize: GPTQ needs calibration data: pass calibration=input_ids "
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
