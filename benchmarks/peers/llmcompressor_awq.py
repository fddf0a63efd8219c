"""llm-compressor's AWQ, end to end through its ``oneshot``, for ``bench_awq.py``.

Peer: llm-compressor 0.14.0.1 with compressed-tensors 0.19.0 plus what ``import
llmcompressor`` needs (datasets 5.2.0, pyarrow, pandas, dill, multiprocess, xxhash),
installed by ``benchmarks/peers/install_peer.sh --awq`` into ``<repo>/.venv-peer/site``
(the peer) and ``<repo>/.venv-peer/site-packages`` (datasets & co; the folder name must
contain "site-packages", see the script), or importable normally. See
``benchmarks/peers/README.md``.

``run_peer_awq`` runs what llm-compressor's AWQ examples run::

    oneshot(model=model, processor=tokenizer, dataset=Dataset({"input_ids": ids}),
            recipe=[AWQModifier(duo_scaling=..., n_grid=...),
                    QuantizationModifier(config_groups={...int, bits, group...},
                                         ignore=["lm_head"])],
            num_calibration_samples=N, max_seq_length=L, batch_size=...)

on the caller's model object (modified in place, as ``oneshot`` does) and the caller's
token ids (already tokenized: the peer skips its own tokenization when the dataset has
an ``input_ids`` column), and times the whole call. Unlike the GPTQ adapter, this one
imports ``llmcompressor`` for real (``oneshot`` needs the whole package), so it cannot
share a process with the GPTQ adapter's import stubs.

The peer's code runs unmodified except for one shim, active only during
``run_peer_awq`` and only when torch has no accelerator: its AWQ step calls
``IntermediatesCache.pin_memory`` (``Tensor.pin_memory()`` on every cached CPU input,
for faster host-to-device copies), which raises "Cannot access accelerator device when
none is available" on a CPU-only torch build; the shim makes that call a no-op there
(pinning has no function without a device). Timing wrappers around
``AWQModifier._apply_smoothing`` and ``AWQModifier._compute_best_scale`` only measure.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["peer_available", "peer_name", "run_peer_awq", "export_plain", "peer_defaults", "preset_weights",
           "same_as_preset", "placeholder_tokenizer", "PEER_SITE", "ONESHOT_SITE"]

REPO = Path(__file__).resolve().parents[2]
PEER_SITE = REPO / ".venv-peer" / "site"
ONESHOT_SITE = REPO / ".venv-peer" / "site-packages"

_peer = None
_load_error: str | None = None


def _add_paths() -> None:
    # PEER_SITE first (as the GPTQ adapter puts it), ONESHOT_SITE right after it
    for site in (ONESHOT_SITE, PEER_SITE):
        s = str(site)
        if site.is_dir() and s not in sys.path:
            sys.path.insert(0, s)


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:   # noqa: BLE001
        return "?"


def _load():
    global _peer, _load_error
    if _peer is not None:
        return _peer
    stub = sys.modules.get("llmcompressor")
    if stub is not None and getattr(stub, "__lowbit_stub__", False):
        raise ImportError("llmcompressor is stubbed by peers.llmcompressor_gptq in this process; "
                          "run the AWQ peer in a separate process")
    _add_paths()
    # The peer configures loguru on import: INFO lines and per-mapping progress go to stdout.
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets
        import llmcompressor
        from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        # datasets hashes every new Dataset with dill; with pyarrow outside a folder named
        # site-packages that fails (install_peer.sh explains): fail here, with the reason.
        try:
            datasets.Dataset.from_dict({"input_ids": [[0, 1]]})
        except Exception as e:   # noqa: BLE001
            raise ImportError(f"datasets cannot fingerprint a Dataset ({type(e).__name__}: {e}); install "
                              "datasets/pyarrow into a folder whose path contains 'site-packages' "
                              f"(pyarrow is at {Path(datasets.__file__).parents[1]})") from e
    except Exception as e:   # noqa: BLE001
        _load_error = f"{type(e).__name__}: {e}"
        raise
    _peer = dict(
        datasets=datasets, oneshot=oneshot, AWQModifier=AWQModifier, QuantizationModifier=QuantizationModifier,
        QuantizationArgs=QuantizationArgs, preset_name_to_scheme=preset_name_to_scheme,
        forward_quantize=forward_quantize, IntermediatesCache=IntermediatesCache,
        version=getattr(llmcompressor, "__version__", None) or _dist_version("llmcompressor"),
        ct_version=_dist_version("compressed-tensors"), datasets_version=datasets.__version__,
    )
    return _peer


def peer_available() -> str | None:
    """``None`` if llm-compressor's oneshot + AWQModifier import, else why not."""
    try:
        _load()
    except Exception as e:   # noqa: BLE001
        return (f"llm-compressor AWQ not importable ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                "run benchmarks/peers/install_peer.sh --awq")
    return None


def peer_name() -> str:
    p = _load()
    return f"llmcompressor {p['version']}"


def peer_defaults() -> dict:
    """The peer's own defaults for what the benchmark leaves at default (read from its classes)."""
    p = _load()
    awq = p["AWQModifier"]
    fields = awq.model_fields
    return {
        "duo_scaling": fields["duo_scaling"].default,
        "n_grid": fields["n_grid"].default,
        "weight_observer": "memoryless_minmax (QuantizationArgs.observer None -> the weight default)",
        "oneshot_batch_size": 1,
        "versions": {"llmcompressor": p["version"], "compressed-tensors": p["ct_version"],
                     "datasets": p["datasets_version"]},
    }


def weight_args(bits: int, group_size: int, symmetric: bool, observer: str | None = None) -> dict:
    """The ``weights`` QuantizationArgs (as a dict) of our grid: int, ``bits``, per group."""
    w = dict(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    if observer:
        w["observer"] = observer
    return w


def preset_weights(preset: str = "W4A16") -> dict:
    """The peer's preset's weight QuantizationArgs, as a dict (W4A16: 4-bit int, symmetric,
    strategy group, group 128, static)."""
    p = _load()
    return p["preset_name_to_scheme"](preset, ["Linear"]).weights.model_dump(mode="json")


def same_as_preset(bits: int, group_size: int, symmetric: bool, preset: str = "W4A16") -> bool:
    """Whether :func:`weight_args` (what ``run_peer_awq`` asks for) equals the peer's preset's
    weight args."""
    p = _load()
    ours = p["QuantizationArgs"](**weight_args(bits, group_size, symmetric))
    return ours == p["preset_name_to_scheme"](preset, ["Linear"]).weights


def placeholder_tokenizer():
    """A one-word tokenizer, built offline, for models that come without one (random-init):
    ``oneshot`` insists on a processor, but never calls it on a dataset that already has
    ``input_ids``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>")


@contextlib.contextmanager
def _instrument(p, stats: dict):
    """Timers around the AWQ step's methods, and the CPU-only pin_memory shim."""
    awq = p["AWQModifier"]
    cache = p["IntermediatesCache"]
    saved = {"apply": awq._apply_smoothing, "best": awq._compute_best_scale, "pin": cache.pin_memory}
    cuda = torch.cuda.is_available()

    def _sync():
        if cuda:
            torch.cuda.synchronize()

    def apply(self, *a, **k):
        _sync()
        t0 = time.perf_counter()
        try:
            return saved["apply"](self, *a, **k)
        finally:
            _sync()
            stats["smoothing_s"] += time.perf_counter() - t0

    def best(self, *a, **k):
        _sync()
        t0 = time.perf_counter()
        try:
            return saved["best"](self, *a, **k)
        finally:
            _sync()
            stats["grid_search_s"] += time.perf_counter() - t0
            stats["mappings"] += 1
            if self._error_metrics:
                stats["errors"].append(dict(self._error_metrics[-1]))

    shim = not torch.accelerator.is_available()

    def pin(self, *a, **k):
        return None if shim else saved["pin"](self, *a, **k)

    awq._apply_smoothing, awq._compute_best_scale, cache.pin_memory = apply, best, pin
    stats["pin_memory_shim"] = shim
    try:
        yield stats
    finally:
        awq._apply_smoothing, awq._compute_best_scale, cache.pin_memory = saved["apply"], saved["best"], saved["pin"]


def run_peer_awq(model, tokenizer, ids: torch.Tensor, *, bits: int = 4, group_size: int = 128,
                 symmetric: bool = True, duo_scaling=None, n_grid: int | None = None,
                 observer: str | None = None, batch_size: int = 1) -> dict:
    """llm-compressor's AWQ + quantization of ``model`` (in place) on ``ids`` int64 ``[N, L]``.

    ``duo_scaling`` / ``n_grid`` None keep the peer's defaults (True / 20); ``observer``
    None keeps its weight observer (``memoryless_minmax``; ``"mse"`` is its range search).
    ``batch_size`` is oneshot's (its default 1). The layers left out: ``lm_head``.

    Returns ``seconds`` (the whole ``oneshot`` call), ``smoothing_s`` (inside the AWQ step:
    the unquantized reference outputs, the grid searches and applying the scales),
    ``grid_search_s``, ``mappings`` (scale groups searched), ``errors`` (the peer's
    per-mapping initial / best output MSE), ``recipe`` (what was asked), ``pin_memory_shim``.
    """
    p = _load()
    n, length = ids.shape
    awq_kw = {}
    if duo_scaling is not None:
        awq_kw["duo_scaling"] = duo_scaling
    if n_grid is not None:
        awq_kw["n_grid"] = n_grid
    weights = weight_args(bits, group_size, symmetric, observer)
    recipe = [p["AWQModifier"](**awq_kw),
              p["QuantizationModifier"](config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                        ignore=["lm_head"])]
    ds = p["datasets"].Dataset.from_dict({"input_ids": ids.cpu().tolist()})
    stats = {"smoothing_s": 0.0, "grid_search_s": 0.0, "mappings": 0, "errors": []}
    with _instrument(p, stats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        p["oneshot"](model=model, processor=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=n,
                     max_seq_length=length, shuffle_calibration_samples=False, batch_size=batch_size)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    awq_mod = recipe[0]
    return {
        "seconds": seconds,
        **stats,
        "peer": f"llmcompressor {p['version']}",
        "recipe": {"AWQModifier": {"duo_scaling": awq_mod.duo_scaling, "n_grid": awq_mod.n_grid,
                                   "mappings": "default (inferred for LlamaForCausalLM)"},
                   "QuantizationModifier": {"weights": weights, "ignore": ["lm_head"]},
                   "oneshot": {"num_calibration_samples": n, "max_seq_length": length, "batch_size": batch_size,
                               "shuffle_calibration_samples": False}},
    }


@torch.no_grad()
def export_plain(peer_model, base_model, bits: int) -> tuple[torch.nn.Module, dict]:
    """A plain copy of ``base_model`` holding the peer's result: every parameter taken from
    ``peer_model`` (AWQ rescaled the norms and weights), the quantized linears' weights
    replaced by the peer's own fake-quantization of them (``forward_quantize`` with its
    stored ``weight_scale`` / ``weight_zero_point``: what its quantized forward computes).

    Returns the copy and grid facts: ``quantized_layers``, ``max_levels_per_group`` (distinct
    codes in any group), ``absmax_over_scale`` (min, max over groups: 7.5 on the peer's
    4-bit symmetric grid) and ``max_offgrid`` (largest ``|w_hat / scale - round|``).
    """
    p = _load()
    fq = p["forward_quantize"]
    plain = copy.deepcopy(base_model)
    src = dict(peer_model.named_modules())
    layers, max_levels, ratio_lo, ratio_hi, offgrid = 0, 0, float("inf"), 0.0, 0.0
    for name, mod in plain.named_modules():
        peer_mod = src.get(name)
        if peer_mod is None:
            raise KeyError(f"module {name!r} of the base model is missing from the peer's model")
        for pname, param in mod.named_parameters(recurse=False):
            value = getattr(peer_mod, pname).detach()
            scheme = getattr(peer_mod, "quantization_scheme", None)
            if pname == "weight" and scheme is not None and scheme.weights is not None \
                    and hasattr(peer_mod, "weight_scale"):
                w = value
                value = fq(peer_mod, w, "weight", scheme.weights)
                layers += 1
                scale = peer_mod.weight_scale.detach().float()
                zp = peer_mod.weight_zero_point.detach().float()
                nrow, k = value.shape
                gs = scheme.weights.group_size
                q = value.float().view(nrow, k // gs, gs) / scale.unsqueeze(-1) + zp.unsqueeze(-1)
                offgrid = max(offgrid, float((q - q.round()).abs().max()))
                qi = q.round().to(torch.int64) + 2 ** (bits - 1)    # 0 .. 2^bits - 1
                counts = torch.zeros(nrow, k // gs, 2 ** bits + 1, dtype=torch.int32, device=qi.device)
                counts.scatter_add_(-1, qi.clamp(0, 2 ** bits), torch.ones_like(qi, dtype=torch.int32))
                max_levels = max(max_levels, int((counts > 0).sum(-1).max()))
                absmax = w.float().view(nrow, k // gs, gs).abs().amax(-1)
                r = absmax / scale
                ratio_lo, ratio_hi = min(ratio_lo, float(r.min())), max(ratio_hi, float(r.max()))
            param.copy_(value.to(device=param.device, dtype=param.dtype))
    return plain, {"quantized_layers": layers, "max_levels_per_group": max_levels,
                   "absmax_over_scale": [ratio_lo, ratio_hi], "max_offgrid": offgrid}
