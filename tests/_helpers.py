"""Helpers shared by the tests: error metrics, sample inputs, bit-exact comparison."""
from __future__ import annotations

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(||ref|| / ||ref - out||)."""
    ref, out = ref.double(), out.double()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


def random_weight(n: int, k: int, dtype=torch.float32, device="cpu", noncontiguous=False) -> torch.Tensor:
    """A weight-like [n, k] tensor: Gaussian rows of varied scale with a few outliers,
    optionally a non-contiguous view (the transpose of a [k, n] buffer)."""
    w = torch.randn(n, k) * torch.exp(torch.randn(n, 1))
    if w.numel() > 16:
        idx = torch.randint(0, w.numel(), (max(1, w.numel() // 200),))
        w.view(-1)[idx] *= 8.0
    w = w.to(dtype=dtype, device=device)
    return w.t().contiguous().t() if noncontiguous else w


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality of float or FP8 tensors, where any NaN equals any NaN (NaN
    payloads and signs differ between torch's scalar and vectorised casts)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a.float()), torch.isnan(b.float())
    if not torch.equal(nan_a, nan_b):
        return False
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
    return torch.equal(a.view(int_type)[~nan_a], b.view(int_type)[~nan_b])


# Weight shapes: 1x1, empty either way, K not a multiple of 8, K that no common group
# size divides (stories260K's 172), and a Llama-like multiple of 128.
WEIGHT_SHAPES = [(1, 1), (0, 16), (5, 0), (7, 37), (3, 172), (64, 172), (16, 256), (33, 200)]
GROUP_SIZES = [1, 7, 32, 64, 128, None]   # None: per-channel (group = K)


def raises(exc, match: str, fn, *args, **kwargs) -> None:
    """Assert that ``fn(*args)`` raises ``exc`` with a message matching ``match``."""
    import pytest

    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def shared_data(*parts: str):
    """Path into ../shared/data (beside the repository), or skip-free failure if absent:
    CI always has it, so a missing file is an error, not a skip."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    path = root.joinpath(*parts)
    assert path.exists(), f"{path} is missing: tests need ../shared/data beside the repository"
    return path


def stories260k_linear_weights() -> dict:
    """The 35 Linear weights of the real stories260K model (embeddings excluded)."""
    from safetensors.torch import load_file

    sd = load_file(str(shared_data("models", "stories260K", "hf", "model.safetensors")))
    return {k: v for k, v in sd.items() if v.dim() == 2 and "embed" not in k and "lm_head" not in k}


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of t, contiguous but one element past an aligned address: kernels that load
    16-byte vectors must notice and take their unaligned path."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def stories260k():
    """(model, tokenizer) of the real stories260K model, fp32 on the CPU, eval mode."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = str(shared_data("models", "stories260K", "hf"))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tok


def snapshot(model):
    """A model's state (cloned tensors) and module classes, for :func:`assert_unmodified`."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def assert_unmodified(model, snap) -> None:
    """Assert that ``model`` has the modules and bit-identical tensors of ``snap``."""
    sd, types = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k, v in sd.items():
        assert bits_equal(now[k], v), k


def rel_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``|ref - out| / |ref|`` (Frobenius norms, float64)."""
    return float((ref.double() - out.double()).norm() / ref.double().norm())
