"""lowbit.ops.accumulate_hessian against reference.gptq.accumulate_hessian.

``H <- (num_seen * H + 2 X^T X) / (num_seen + m)``, in place, one GEMM per call.

Tolerance (``_bound``), derived, not tuned: entry ``(i, j)`` of ``2 X^T X / n`` is a dot
product of ``n`` terms whose magnitudes sum to ``2 |x_i| . |x_j| / n <= sqrt(H_ii H_jj)``
(Cauchy-Schwarz on the exact float64 H); a dot product of ``m`` terms in a float of unit
roundoff ``u`` errs by at most ``m u`` of that sum (Higham's gamma_m), and each further
batch rescales H once (``beta`` and ``alpha``, two more roundings) before adding. So
``|H - H_ref| <= (n + 4 * batches) * u * sqrt(H_ii H_jj)``. For float32 (``u = 2**-24``)
and ``n = 300`` rows that is ``2e-5`` of the diagonal scale, while one missing or
doubled row moves the entries by about ``1 / n = 3e-3`` of it: two orders of magnitude
apart. float64 uses the same bound with ``u = 2**-53`` ("exact-ish").
"""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops
from lowbit.reference import gptq as rg
from _helpers import raises

UNIT = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def _activations(n: int, k: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Correlated activations with a mean offset, like a linear layer's inputs."""
    mix = torch.randn(k, k, dtype=torch.float64) / max(k, 1) ** 0.5 + 0.5 * torch.eye(k, dtype=torch.float64)
    x = torch.randn(n, k, dtype=torch.float64) @ mix + torch.randn(k, dtype=torch.float64)
    return x.to(dtype=dtype, device=device)


def _exact(x: torch.Tensor) -> torch.Tensor:
    """2 X^T X / n in float64 on the CPU, from x as given (its own dtype's values)."""
    xf = x.reshape(-1, x.shape[-1]).double().cpu()
    return 2 * xf.t() @ xf / xf.shape[0]


def _bound(h_exact: torch.Tensor, rows: int, batches: int, dtype) -> torch.Tensor:
    d = h_exact.diagonal().clamp(min=0).sqrt()
    return (rows + 4 * batches) * UNIT[dtype] * torch.outer(d, d)


def _accumulate(batches, k, dtype, device) -> torch.Tensor:
    h = torch.zeros(k, k, dtype=dtype, device=device)
    seen = 0
    for x in batches:
        ops.accumulate_hessian(h, x, seen)
        seen += x.reshape(-1, k).shape[0]
    return h


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 5, 37, 64])
def test_matches_reference(device, dtype, k):
    # One call from zeros, then a second on top of a non-trivial H (the num_seen blend).
    x1 = _activations(200, k, dtype, device)
    x2 = _activations(100, k, dtype, device)
    h = torch.zeros(k, k, dtype=dtype, device=device)
    out = ops.accumulate_hessian(h, x1, 0)
    assert out is None and h.dtype == dtype and h.shape == (k, k)
    want1 = rg.accumulate_hessian(torch.zeros(k, k, dtype=dtype), x1.cpu(), 0)
    assert torch.all((h.cpu().double() - want1.double()).abs() <= _bound(_exact(x1), 200, 1, dtype))
    ops.accumulate_hessian(h, x2, 200)
    want2 = rg.accumulate_hessian(want1, x2.cpu(), 200)
    exact = _exact(torch.cat([x1, x2]))
    bound = _bound(exact, 300, 2, dtype)
    assert torch.all((h.cpu().double() - want2.double()).abs() <= 2 * bound)
    assert torch.all((h.cpu().double() - exact).abs() <= bound)
    # A row too few is far outside the bound (the bound is not vacuous; with k >= 5 some
    # of the k^2 entries always move by ~1/n of the diagonal scale).
    assert k < 5 or not torch.all((_exact(torch.cat([x1, x2[:-1]])) - exact).abs() <= bound)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("x_dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_batch_split_invariant(device, dtype, x_dtype):
    """Any split of the rows into batches (an empty batch and 3-D batches included) gives
    the H of one batch: 2 X^T X / n over all rows. (float64 x into a float32 H: x is
    rounded to float32 first, 2u more per term, inside the bound's 4u per batch.)"""
    k = 24
    x = _activations(240, k, x_dtype, device)   # x_dtype values: the exact H is of these
    exact = _exact(x)
    whole = _accumulate([x], k, dtype, device)
    bound = _bound(exact, 240, 1, dtype)
    assert torch.all((whole.cpu().double() - exact).abs() <= bound)
    splits = [
        [x[:1], x[1:]],
        [x[:0], x[:100], x[100:100], x[100:]],                      # empty batches
        [x[:120].reshape(4, 30, k), x[120:].reshape(2, 3, 20, k)],  # [B, L, K] and 4-D
        list(x.split(17)),                                          # ragged last batch
        [x[:0].reshape(0, 5, k)] + [x[i:i + 1] for i in range(240)],  # row by row
    ]
    for batches in splits:
        h = _accumulate(batches, k, dtype, device)
        nb = len(batches)
        assert torch.all((h.cpu().double() - exact).abs() <= _bound(exact, 240, nb, dtype)), len(batches)
        if dtype == torch.float64:
            # exact-ish: a float64 H is the same to ~1e-13 of the diagonal scale
            assert torch.allclose(h, whole, rtol=0, atol=1e-13 * float(exact.diagonal().max()))


def test_noncontiguous_x(device):
    k = 16
    buf = _activations(64, 2 * k, torch.float32, device)
    x = buf[:, ::2]                                    # strided view
    assert not x.is_contiguous()
    h = _accumulate([x], k, torch.float64, device)
    assert torch.allclose(h.cpu(), _exact(x), rtol=1e-12, atol=0)
    xt = _activations(k, 50, torch.float32, device).t()  # transposed view
    h = _accumulate([xt], k, torch.float64, device)
    assert torch.allclose(h.cpu(), _exact(xt), rtol=1e-12, atol=0)


def test_empty_batch_leaves_hessian_unchanged(device):
    k = 8
    x = _activations(10, k, torch.float32, device)
    h = _accumulate([x], k, torch.float32, device)
    before = h.clone()
    ops.accumulate_hessian(h, x[:0], 10)
    ops.accumulate_hessian(h, x[:0].reshape(0, 3, k), 10)
    assert torch.equal(h, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    k = 12
    h = _accumulate([_activations(20, k, dtype, device)], k, dtype, device)
    opcheck(torch.ops.lowbit.accumulate_hessian.default, (h, _activations(7, k, torch.float32, device), 20))
    opcheck(torch.ops.lowbit.accumulate_hessian.default,
            (h, _activations(6, k, torch.bfloat16, device).reshape(2, 3, k), 27))


def test_bad_input(check_device):
    d = check_device
    k = 8
    h = torch.zeros(k, k, device=d)
    x = torch.randn(5, k, device=d)
    f = ops.accumulate_hessian
    raises(TypeError, "'hessian' must be float32 or float64", f, h.half(), x, 0)
    raises(TypeError, "'hessian' must be float32 or float64", f, h.bfloat16(), x, 0)
    raises(TypeError, "'hessian' must be float32 or float64", f, h.int(), x, 0)
    raises(TypeError, "'x' must be float32, float16, bfloat16 or float64", f, h, x.int(), 0)
    raises(TypeError, "'x' must be float32, float16, bfloat16 or float64", f, h, x.to(torch.int8), 0)
    raises(ValueError, "'hessian' must be square", f, torch.zeros(k, k + 1, device=d), x, 0)
    raises(ValueError, "'hessian' must be 2-D", f, torch.zeros(k, device=d), x, 0)
    raises(ValueError, "'hessian' must be 2-D", f, torch.zeros(1, k, k, device=d), x, 0)
    raises(ValueError, r"'x' must have last dimension K = 8", f, h, torch.randn(5, k + 1, device=d), 0)
    raises(ValueError, r"'x' must have last dimension K = 8", f, h, torch.randn(k, 5, device=d), 0)
    raises(ValueError, "'x' must have at least 1 dimension", f, h, torch.tensor(1.0, device=d), 0)
    raises(ValueError, "'hessian' must be contiguous", f, torch.zeros(2 * k, k, device=d)[::2], x, 0)
    raises(ValueError, "'hessian' must be contiguous", f, torch.zeros(k, 2 * k, device=d)[:, ::2], x, 0)
    raises(ValueError, "'num_seen' must be >= 0", f, h, x, -1)
    if d != "meta":
        assert torch.count_nonzero(h).item() == 0   # rejected calls write nothing


def test_bad_device():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: a Hessian and activations on two devices")
    raises(ValueError, "'x' is on", ops.accumulate_hessian, torch.zeros(4, 4, device="cuda"),
           torch.randn(3, 4), 0)
