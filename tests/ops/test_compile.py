"""The ops trace under torch.compile (fullgraph, dynamic shapes) and match eager."""
import torch

from lowbit import ops
from _helpers import bits_equal


def _pipeline(w, x):
    s, z = ops.quant_params(w, 4, 32, False, 1.0)
    codes = ops.quantize(w, s, z, 4, 32)
    qweight = ops.pack_int32(codes.t(), 4)
    w_hat = ops.dequantize(ops.unpack_int32(qweight, 4, w.shape[1]).t(), s, z, 32, torch.float32)
    q8, s8 = ops.quantize_per_token_int8(x)
    f8, fs = ops.quantize_fp8_dynamic(x, torch.float8_e4m3fn, True)
    x_hat = ops.dequantize_fp8(f8, fs, torch.float32) + q8.float() * s8
    y_q = ops.weight_only_matmul(x_hat, qweight, s, z, 4, 32, w[:, 0])
    return (x_hat @ w_hat.t()), ops.quantize_fp8(w, fs.amax(), torch.float8_e5m2), y_q


def test_compiled_matches_eager(device):
    torch._dynamo.reset()
    compiled = torch.compile(_pipeline, fullgraph=True, dynamic=True)
    for n, k, m in [(24, 100, 3), (40, 64, 5)]:   # a second shape reuses the dynamic graph
        w = torch.randn(n, k, device=device)
        x = torch.randn(m, k, device=device)
        y_eager, f_eager, q_eager = _pipeline(w, x)
        y_comp, f_comp, q_comp = compiled(w, x)
        assert torch.allclose(y_comp, y_eager, rtol=1e-5, atol=1e-5)
        assert bits_equal(f_comp, f_eager)
        assert torch.allclose(q_comp, q_eager, rtol=1e-5, atol=1e-5)
