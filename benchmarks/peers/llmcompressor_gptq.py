"""llm-compressor's GPTQ layer solve, called on our inputs, for ``bench_gptq.py``.

Peer: llm-compressor 0.14.0.1 with compressed-tensors 0.19.0 (installed by
``benchmarks/peers/install_peer.sh`` into ``<repo>/.venv-peer/site``, or importable
normally, e.g. from wheels on ``PYTHONPATH``). See ``benchmarks/peers/README.md``.

``run_peer_gptq`` does for one ``[N, K]`` weight what ``GPTQModifier`` does for one
module (``GPTQModifier.compress_module_list`` in ``llmcompressor/modifiers/gptq/base.py``):

1. build ``QuantizationArgs`` for the grid and attach them to an ``nn.Linear`` as its
   ``quantization_scheme`` (``GPTQModifier.resolve_quantization_config`` puts
   ``actorder`` on these args; ``"static"`` is an alias of ``"weight"``);
2. weight qparams from the weight observer, on the weight *before* GPTQ
   (``initialize_observer`` -> ``observe`` -> ``weight_observer.get_qparams()``);
3. stack weight / Hessian / qparams into ``[1, ...]`` batches (``prepare_batch``; it
   hands ``quantize_weight`` disposable copies, and so do we);
4. ``quantize_weight(weights, hessians, scale, zero_point, global_scale, quant_args,
   blocksize, percdamp)`` -- the only call that is timed. It dampens, Cholesky-factors
   and inverts the Hessian itself, permutes for act-order, and runs the blocked update
   (eager torch on CPU; its own Triton block kernel on CUDA when Triton is present).

Import: ``import llmcompressor`` runs the whole package (entrypoints, datasets, ...),
which needs ``datasets``/``pyarrow`` and more that the GPTQ solve never uses. Unless
``llmcompressor`` is already imported, this module registers empty package objects for
``llmcompressor``, ``llmcompressor.modifiers``, ``llmcompressor.modifiers.gptq``,
``llmcompressor.modifiers.quantization`` and ``llmcompressor.utils`` (pointing at the installed package folders,
without running their ``__init__``) and imports only the peer's own submodules it
calls: ``modifiers.gptq.gptq_quantize``, ``modifiers.gptq.helpers``,
``modifiers.quantization.calibration``, ``observers`` (and what they import:
``modifiers.utils.hooks``, ``utils.triton_utils``). The code that runs is the
peer's, unmodified.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import time
import types
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["peer_available", "run_peer_gptq", "PEER_SITE", "LLMCOMPRESSOR_VERSION",
           "COMPRESSED_TENSORS_VERSION"]

REPO = Path(__file__).resolve().parents[2]
PEER_SITE = REPO / ".venv-peer" / "site"
# The versions install_peer.sh pins (the adapter reports the installed ones).
LLMCOMPRESSOR_VERSION = "0.14.0.1"
COMPRESSED_TENSORS_VERSION = "0.19.0"

_STUB_PACKAGES = (
    "llmcompressor",
    "llmcompressor.modifiers",
    "llmcompressor.modifiers.gptq",
    "llmcompressor.modifiers.quantization",
    "llmcompressor.utils",
)

_peer = None  # types.SimpleNamespace of the peer's functions, once loaded
_load_error: str | None = None


def _add_peer_site() -> None:
    site = str(PEER_SITE)
    if PEER_SITE.is_dir() and site not in sys.path:
        sys.path.insert(0, site)


def _find_package_dir(name: str) -> Path:
    spec = importlib.machinery.PathFinder.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"no module named {name!r} (looked in .venv-peer/site and sys.path)")
    return Path(list(spec.submodule_search_locations)[0])


def _stub_packages() -> None:
    """Register the package objects above without running their ``__init__``."""
    if "llmcompressor" in sys.modules and not getattr(
        sys.modules["llmcompressor"], "__lowbit_stub__", False
    ):
        return  # the real package is already imported: use it as it is
    root = _find_package_dir("llmcompressor")
    for name in _STUB_PACKAGES:
        if name in sys.modules:
            continue
        path = root.joinpath(*name.split(".")[1:])
        if not (path / "__init__.py").is_file():
            raise ImportError(f"{path} is not a package: unexpected llmcompressor layout")
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(path)]
        mod = types.ModuleType(name)
        mod.__spec__ = spec
        mod.__path__ = [str(path)]
        mod.__file__ = None
        mod.__package__ = name
        mod.__lowbit_stub__ = True
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)


def _dist_version(name: str, fallback: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return fallback


def _load():
    global _peer, _load_error
    if _peer is not None:
        return _peer
    _add_peer_site()
    try:
        import compressed_tensors  # noqa: F401  (import errors surface here first)
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        _stub_packages()
        gq = importlib.import_module("llmcompressor.modifiers.gptq.gptq_quantize")
        calib = importlib.import_module("llmcompressor.modifiers.quantization.calibration")
    except Exception as e:  # ImportError, or an incompatible torch/transformers
        _load_error = f"{type(e).__name__}: {e}"
        raise
    _peer = types.SimpleNamespace(
        quantize_weight=gq.quantize_weight,
        initialize_observer=calib.initialize_observer,
        observe=calib.observe,
        QuantizationArgs=QuantizationArgs,
        QuantizationScheme=QuantizationScheme,
        version=_dist_version("llmcompressor", "?"),
        ct_version=_dist_version("compressed-tensors", "?"),
        gptq_file=gq.__file__,
        gptq_module=gq,
    )
    return _peer


def peer_available() -> str | None:
    """``None`` if llm-compressor's GPTQ can be imported, else the reason it cannot."""
    try:
        _load()
    except Exception as e:
        return (f"llm-compressor GPTQ not importable ({type(e).__name__}: {e}); "
                "run benchmarks/peers/install_peer.sh")
    return None


def peer_name() -> str:
    p = _load()
    return f"llmcompressor {p.version}"


def quant_args(bits: int, group_size: int | None, symmetric: bool, act_order: bool,
               k: int | None = None):
    """The peer's ``QuantizationArgs`` for our grid (int, ``bits``, per group / channel).

    ``group_size`` None, or larger than ``k``, is per-channel (strategy "channel");
    otherwise strategy "group" (the peer requires ``k % group_size == 0``).
    ``act_order`` -> ``actorder="static"`` (alias of "weight": columns are processed in
    decreasing diag(H) order, groups stay the original contiguous column ranges, as
    in lowbit and GPTQ's "static groups"); False -> ``None``.
    """
    p = _load()
    per_channel = group_size is None or (k is not None and group_size > k)
    kw = dict(num_bits=bits, type="int", symmetric=symmetric,
              actorder="static" if act_order else None)
    if per_channel:
        kw.update(strategy="channel")
    else:
        kw.update(strategy="group", group_size=group_size)
    return p.QuantizationArgs(**kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _backend(p, args, device: torch.device, width: int) -> str:
    """Which block update the peer's ``ImplBackend`` dispatch picks (first block)."""
    try:
        from compressed_tensors.utils import impl_backend

        if impl_backend.ENFORCE_EAGER:
            return "eager"
        probe = torch.empty(1, 1, width, device=device)
        use = p.gptq_module._gptq_block_update_triton_req(
            probe, None, None, None, None, scale=None, zero_point=None,
            global_scale=None, g_idx=None, quant_args=args, i1=0)
        return "triton" if use else "eager"
    except Exception:
        return "unknown"


def run_peer_gptq(w: Tensor, hessian: Tensor, bits: int, group_size: int | None,
                  symmetric: bool, act_order: bool, block_size: int = 128,
                  damp: float = 0.01) -> dict:
    """llm-compressor's GPTQ of ``w`` ``[N, K]`` (out, in) with Hessian ``[K, K]``.

    ``hessian`` is ``2/n * sum x x^T`` (undamped, not inverted): that is what the peer's
    ``quantize_weight`` gets from its pipeline (``prepare_batch`` divides the
    accumulated ``2 * sum x x^T`` by the sample count). The peer dampens it with
    ``damp * mean(diag(H))`` and inverts it inside the timed call. Neither ``w`` nor
    ``hessian`` is modified. Runs on ``w.device``.

    Returns ``{"seconds", "w_hat", "loss", "peer"}`` plus ``"qparams_seconds"`` (the
    untimed observer step), ``"scale"``, ``"zero_point"`` (peer's qparams, peer's
    convention: signed codes, ``w_hat = (q - zero_point) * scale``), ``"rtn_fallback"``
    (True when the peer's Cholesky failed and it fell back to round-to-nearest) and
    ``"backend"`` ("triton" or "eager": which block update the peer dispatches to).
    """
    p = _load()
    if w.ndim != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"w [N, K] and hessian [K, K] expected, got {tuple(w.shape)}, "
                         f"{tuple(hessian.shape)}")
    n, k = w.shape
    args = quant_args(bits, group_size, symmetric, act_order, k)
    if args.strategy == "group" and k % args.group_size:
        raise ValueError(f"llm-compressor needs in_features ({k}) divisible by "
                         f"group_size ({args.group_size})")
    device = w.device

    with torch.no_grad():
        # 1-2. the module as the pipeline sees it, and its weight observer's qparams
        linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.float32)
        linear.weight.copy_(w)
        linear.quantization_scheme = p.QuantizationScheme(targets=["Linear"], weights=args)
        t0 = time.perf_counter()
        p.initialize_observer(linear, base_name="weight")
        p.observe([linear], base_name="weight")
        qparams = linear.weight_observer.get_qparams()
        _sync(device)
        qparams_seconds = time.perf_counter() - t0

        # 3. prepare_batch: fresh [1, ...] float32 buffers (quantize_weight overwrites them)
        weights = torch.stack([linear.weight.float()])
        hessians = torch.stack([hessian.to(device=device, dtype=torch.float32).clone()])
        scales = torch.stack([qparams["scale"]])
        zero_points = torch.stack([qparams["zero_point"]])
        global_scales = None  # only for TENSOR_GROUP (fp4) schemes

        # 4. the peer's solve, timed alone
        _sync(device)
        t0 = time.perf_counter()
        quantized, losses, used_rtn_fallback = p.quantize_weight(
            weights=weights,
            hessians=hessians,
            scale=scales,
            zero_point=zero_points,
            global_scale=global_scales,
            quant_args=args,
            blocksize=block_size,
            percdamp=damp,
        )
        _sync(device)
        seconds = time.perf_counter() - t0

    backend = _backend(p, args, device, min(block_size, k))
    return {
        "seconds": seconds,
        "w_hat": quantized[0].float(),
        "loss": float(losses[0].item()),
        "peer": f"llmcompressor {p.version}",
        "qparams_seconds": qparams_seconds,
        "scale": qparams["scale"],
        "zero_point": qparams["zero_point"],
        "rtn_fallback": bool(used_rtn_fallback[0].item()),
        "backend": backend,
    }
