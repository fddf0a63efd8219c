"""lowbit.ops.dequantize_fp8 against reference.dequantize_fp8, bit-exact."""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops, reference as ref
from _helpers import FLOAT_DTYPES, FP8_DTYPES, bits_equal, raises


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("fp8", FP8_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1, 1), (0, 8), (4, 0), (16, 16), (2, 3, 50)])
def test_matches_reference(device, dtype, fp8, shape):
    # Every bit pattern, NaNs included, through the table and the scale.
    q = torch.randint(0, 256, shape, dtype=torch.uint8).view(fp8).to(device)
    for scale in (torch.rand((), device=device) * 4, torch.rand(*shape[:-1], 1, device=device) * 4):
        assert bits_equal(ops.dequantize_fp8(q, scale, dtype), ref.dequantize_fp8(q, scale, dtype))


def test_all_codes(device):
    for fp8 in FP8_DTYPES:
        q = torch.arange(256, dtype=torch.uint8).view(fp8).reshape(16, 16).to(device)
        one = torch.tensor(1.0, device=device)
        assert bits_equal(ops.dequantize_fp8(q, one, torch.float32), q.float())


def test_opcheck(device):
    q = torch.randn(6, 20, device=device).to(torch.float8_e4m3fn)
    scale = torch.rand(6, 1, device=device)
    # opcheck's test_schema compares inputs before/after with torch.allclose, which has
    # no FP8 kernel (torch 2.13); run the other checks, and test_schema's two claims
    # (no input mutated, output aliases no input) by hand below.
    opcheck(torch.ops.lowbit.dequantize_fp8.default, (q, scale, torch.float16),
            test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    q_before, s_before = q.clone(), scale.clone()
    out = torch.ops.lowbit.dequantize_fp8.default(q, scale, torch.float16)
    assert bits_equal(q, q_before) and torch.equal(scale, s_before)
    assert out.untyped_storage().data_ptr() not in (q.untyped_storage().data_ptr(),
                                                    scale.untyped_storage().data_ptr())


def test_bad_input(check_device):
    d = check_device
    q = torch.randn(4, 16, device=d).to(torch.float8_e5m2)
    s = torch.rand(4, 1, device=d)
    f = ops.dequantize_fp8
    raises(TypeError, "'q' must be torch.float8_e4m3fn or torch.float8_e5m2, got torch.float16",
           f, q.half(), s, torch.float16)
    raises(TypeError, "'dtype' must be torch.float32", f, q, s, torch.float8_e4m3fn)
    raises(ValueError, "'scale' must hold one value", f, q, torch.rand(5, 1, device=d), torch.float16)
