"""torch.compile of quantized models: fullgraph (QuantLinear is one custom op with a fake
kernel, so dynamo traces through it) and equal to eager."""
import torch

import lowbit
from _helpers import stories260k


def test_compiled_stories260k_matches_eager():
    model, _ = stories260k()
    lowbit.quantize(model, "W4A16-g32-asym", progress=False)
    ids = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    # Same kernels in both; only inductor's fusion of the float ops around them differs.
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compiled_mlp_dynamic_shapes():
    torch._dynamo.reset()
    mlp = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.GELU(), torch.nn.Linear(160, 96))
    lowbit.quantize(mlp, "W8A16", progress=False)
    compiled = torch.compile(mlp, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for rows in (1, 7, 33):
            x = torch.randn(rows, 96)
            torch.testing.assert_close(compiled(x), mlp(x), rtol=1e-5, atol=1e-5)


def test_compiled_w8a8_and_fp8_fullgraph():
    """W8A8 and FP8 layers (dynamic activations) are custom ops with fake kernels end to
    end (activation quantization, then the 8-bit matmul): fullgraph, dynamic shapes."""
    import copy

    torch._dynamo.reset()
    # ReLU, not GELU: inductor's GELU differs from eager's in the last bit, and the second
    # layer's 8-bit activation quantization can turn that into a whole code step (seed
    # 1709523339 did).
    base = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.ReLU(), torch.nn.Linear(160, 96))
    for preset in ("W8A8", "FP8"):
        mlp = copy.deepcopy(base)
        lowbit.quantize(mlp, preset, progress=False)
        compiled = torch.compile(mlp, fullgraph=True, dynamic=True)
        with torch.no_grad():
            for rows in (1, 7, 33):
                x = torch.randn(rows, 96)
                torch.testing.assert_close(compiled(x), mlp(x), rtol=1e-5, atol=1e-5)
