"""Make the small compressed-tensors checkpoints of ``tests/data/`` with llm-compressor itself.

Peer: llm-compressor 0.14.0.1 with compressed-tensors 0.19.0 (and datasets & co, which
``import llmcompressor`` needs), installed by ``benchmarks/peers/install_peer.sh --awq``
into ``<repo>/.venv-peer/site`` and ``<repo>/.venv-peer/site-packages``. Runs in the
project's interpreter with those folders put on ``sys.path`` (as
``peers/llmcompressor_awq.py`` does); nothing is downloaded.

For each scheme it loads the real stories260K (``../shared/data/models/stories260K/hf``,
float32; Llama: hidden 64, intermediate 172, 5 layers, tied embeddings), runs the peer's
``oneshot`` with a data-free ``QuantizationModifier`` (weights by round-to-nearest with
the peer's min-max observer; activations, where quantized, dynamic) and saves with
``model.save_pretrained(out, save_compressed=True)``, the peer's own compressed save:

* ``ct_stories260k_w4a16``: int4 weights, format ``pack-quantized``, two config groups
  because stories260K's ``down_proj`` has K = 172, which no group size that also fits
  K = 64 divides except 1, 2 and 4 (the peer refuses groups that do not divide K):
  ``group_0`` = q/k/v/o/gate/up projections, symmetric, group 32;
  ``group_1`` = ``down_proj``, asymmetric, per channel (so the checkpoint also carries
  packed zero points). ``lm_head`` is ignored (tied to the embeddings).
* ``ct_stories260k_w8a8`` (``--all``): the peer's ``W8A8`` preset (int8 per-channel
  weights, dynamic per-token int8 activations), format ``int-quantized``.
* ``ct_stories260k_fp8`` (``--all``): the peer's ``FP8_DYNAMIC`` preset (float8 e4m3
  per-channel weights, dynamic per-token activations), format ``float-quantized``.

The tokenizer files are not copied (the tests feed token ids). Usage::

    .venv/bin/python benchmarks/peers/make_ct_checkpoint.py               # w4a16 only
    .venv/bin/python benchmarks/peers/make_ct_checkpoint.py --all         # all three
    .venv/bin/python benchmarks/peers/make_ct_checkpoint.py --out DIR     # elsewhere

Writes ``DIR/<name>/`` (default ``tests/data``), replacing what was there, plus a
``README.md`` in each folder saying how it was made.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PEER_SITE = REPO / ".venv-peer" / "site"
ONESHOT_SITE = REPO / ".venv-peer" / "site-packages"
STORIES = REPO.parent / "shared" / "data" / "models" / "stories260K" / "hf"

W4A16_GROUPS = {
    "group_0": {
        "targets": [r"re:.*\.(q|k|v|o|gate|up)_proj$"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
    },
    "group_1": {
        "targets": [r"re:.*\.down_proj$"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"},
    },
}

# name -> (QuantizationModifier arguments, one-line description)
CHECKPOINTS = {
    "ct_stories260k_w4a16": (dict(config_groups=W4A16_GROUPS, ignore=["lm_head"]),
                             "W4A16: q/k/v/o/gate/up int4 symmetric group 32; down_proj int4 asymmetric "
                             "per channel (K = 172); pack-quantized"),
    "ct_stories260k_w8a8": (dict(scheme="W8A8", targets=["Linear"], ignore=["lm_head"]),
                            "W8A8 preset: int8 per-channel weights, dynamic per-token int8 activations; "
                            "int-quantized"),
    "ct_stories260k_fp8": (dict(scheme="FP8_DYNAMIC", targets=["Linear"], ignore=["lm_head"]),
                           "FP8_DYNAMIC preset: float8 e4m3 per-channel weights, dynamic per-token "
                           "activations; float-quantized"),
}


def _peer():
    for site in (ONESHOT_SITE, PEER_SITE):
        if site.is_dir() and str(site) not in sys.path:
            sys.path.insert(0, str(site))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import llmcompressor
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
    except Exception as e:   # noqa: BLE001
        raise SystemExit(f"llm-compressor is not importable ({type(e).__name__}: {e}); run "
                         "benchmarks/peers/install_peer.sh --awq") from e
    return llmcompressor, oneshot, QuantizationModifier


def make(name: str, out_root: Path) -> Path:
    import compressed_tensors
    import torch
    import transformers

    llmcompressor, oneshot, QuantizationModifier = _peer()
    kwargs, what = CHECKPOINTS[name]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    oneshot(model=model, recipe=[QuantizationModifier(**kwargs)])
    out = out_root / name
    with tempfile.TemporaryDirectory(dir=out_root) as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        config = json.loads((Path(tmp) / "config.json").read_text())
        (Path(tmp) / "README.md").write_text(
            f"# {name}\n\n{what}.\n\nMade by `benchmarks/peers/make_ct_checkpoint.py` from stories260K "
            f"(float32) with llm-compressor {llmcompressor.__version__} (compressed-tensors "
            f"{compressed_tensors.__version__}, transformers {transformers.__version__}, torch "
            f"{torch.__version__}): `oneshot(model, recipe=[QuantizationModifier(**{json.dumps(kwargs)})])` "
            "then `model.save_pretrained(dir, save_compressed=True)`. quantization_config.format: "
            f"`{config['quantization_config'].get('format')}`.\n")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="also the W8A8 and FP8 checkpoints")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data", help="parent folder (default tests/data)")
    args = ap.parse_args(argv)
    if not (STORIES / "config.json").is_file():
        raise SystemExit(f"stories260K not found: {STORIES}/config.json is missing")
    args.out.mkdir(parents=True, exist_ok=True)
    names = list(CHECKPOINTS) if args.all else ["ct_stories260k_w4a16"]
    for name in names:
        out = make(name, args.out)
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"{out}: {', '.join(sorted(p.name for p in out.iterdir()))} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
