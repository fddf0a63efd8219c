"""Reading and writing checkpoint folders: safetensors shards, ``config.json``, and a
sha256 manifest. Shared by every format in :mod:`lowbit.formats`.

Layout (what transformers' ``from_pretrained`` reads)::

    config.json                          the model config, with quantization_config
    model.safetensors                    one shard, or
    model-00001-of-0000N.safetensors ... several, with
    model.safetensors.index.json         {"metadata": {"total_size": ...}, "weight_map": {name: file}}
    lowbit_manifest.json                 {"files": {file: {"sha256": ..., "bytes": ...}}}

Every file is written to a temporary name in the folder, flushed and fsync'ed, then
renamed over its final name (``os.replace`` is atomic), so a crash never leaves a
half-written file under a real name; the manifest is written last. Loading checks the
manifest's hashes (when present), reads tensors with safetensors (never pickle) and names
any missing or corrupt file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["CheckpointError", "save_folder", "load_folder", "read_config", "MANIFEST"]

MANIFEST = "lowbit_manifest.json"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file, has a corrupt one, or does not match what
    the model expects. The message names the file (and tensor)."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _shards(tensors: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def save_folder(directory: str | os.PathLike, tensors: dict[str, Tensor], config: dict[str, Any], *,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None,
                extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write ``tensors`` (name -> tensor, any device; stored contiguous on CPU) as
    safetensors shards, ``config`` as config.json, ``extra_files`` (name -> text or bytes)
    and the manifest into ``directory`` (created if needed). Returns the folder."""
    from safetensors.torch import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    shards = _shards(cpu, max_shard_bytes)
    meta = {"format": "pt", **(metadata or {})}
    files: list[str] = []
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        _atomic_write(d / name, save(shard, metadata=meta))
        files.append(name)
        weight_map.update({k: name for k in shard})
    stale = [p for p in d.glob("model*.safetensors") if p.name not in names]
    for p in stale:   # shards of an earlier, larger save would shadow nothing but confuse readers
        p.unlink()
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in cpu.values())
        _atomic_write(d / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2).encode())
        files.append(INDEX)
    elif (d / INDEX).exists():
        (d / INDEX).unlink()
    _atomic_write(d / "config.json", json.dumps(config, indent=2, sort_keys=True).encode())
    files.append("config.json")
    for name, content in (extra_files or {}).items():
        _atomic_write(d / name, content.encode() if isinstance(content, str) else content)
        files.append(name)
    manifest = {"files": {f: {"sha256": _sha256(d / f), "bytes": (d / f).stat().st_size} for f in files}}
    _atomic_write(d / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return d


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint folder; CheckpointError naming it if missing or not JSON."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint folder needs config.json "
                              "(is this the folder save_quantized / save_pretrained wrote?)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is corrupt") from e


def _verify(d: Path) -> None:
    path = d / MANIFEST
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt manifest ({e})") from e
    for name, entry in manifest.items():
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {MANIFEST}); copy the whole checkpoint folder")
        if f.stat().st_size != entry["bytes"] or _sha256(f) != entry["sha256"]:
            hint = ""
            if f.stat().st_mtime > path.stat().st_mtime:
                # transformers' save_pretrained writes no manifest: one left by an earlier
                # save_quantized into the same folder no longer describes its files.
                hint = (f" The file is newer than {MANIFEST}: if another tool (save_pretrained) re-saved the "
                        f"folder, delete {MANIFEST} or load with verify=False.")
            raise CheckpointError(f"{f}: corrupt: its sha256 does not match {MANIFEST} (truncated or modified "
                                  f"after saving); save the model again or re-copy the file.{hint}")


def load_folder(directory: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config, tensors) of a checkpoint folder: the manifest's hashes checked first when
    ``verify`` (and a manifest exists), then every shard read with safetensors onto the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint folder")
    config = read_config(d)
    if verify:
        _verify(d)
    if (d / INDEX).is_file():
        try:
            files = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{d / INDEX}: corrupt index ({e})") from e
    else:
        files = ["model.safetensors"]
    tensors: dict[str, Tensor] = {}
    for name in files:
        f = d / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing shard; copy the whole checkpoint folder")
        try:
            tensors.update(load_file(str(f), device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
    return config, tensors


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16 (config.json spelling)."""
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    """torch.float16 for 'float16' / 'torch.float16'; ValueError otherwise."""
    d = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in the checkpoint's config")
    return d
