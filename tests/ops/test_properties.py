"""Property tests (hypothesis) of the integer grid and the packing, on every device.

1. Inside the grid's representable range [(0 - zero) * scale, (2**bits - 1 - zero) * scale],
   which is the clip range [lo, hi] of quant_params, dequantize(quantize(x)) is within
   scale / 2 of x.
2. pack_int32 then unpack_int32 is the identity.
"""
import torch
from hypothesis import given, settings, strategies as st

from lowbit import ops, reference as ref
from _helpers import DEVICES, FLOAT_DTYPES

SETTINGS = settings(max_examples=60, deadline=None, derandomize=False)


@SETTINGS
@given(
    n=st.integers(1, 9),
    k=st.integers(1, 300),
    bits=st.integers(2, 8),
    group_size=st.integers(1, 320),
    symmetric=st.booleans(),
    clip=st.floats(0.3, 1.0),
    dtype=st.sampled_from(FLOAT_DTYPES),
    log_scale=st.floats(-20, 20),
    seed=st.integers(0, 2**31 - 1),
    device=st.sampled_from(DEVICES),
)
def test_roundtrip_error_within_half_step(n, k, bits, group_size, symmetric, clip, dtype, log_scale, seed,
                                          device):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.float16:
        log_scale = max(min(log_scale, 10.0), -10.0)   # keep randn * 2**log_scale finite in fp16
    w = (torch.randn(n, k, generator=gen) * 2.0**log_scale).to(dtype).to(device)
    s, z = ops.quant_params(w, bits, group_size, symmetric, clip)
    deq = ops.dequantize(ops.quantize(w, s, z, bits, group_size), s, z, group_size, torch.float32)
    wf = w.float()
    step = ref.expand_groups(s, k, group_size)
    zero = ref.expand_groups(z.float(), k, group_size)
    lo, hi = (0 - zero) * step, (2**bits - 1 - zero) * step
    inside = (wf >= lo) & (wf <= hi)
    err = (deq - wf).abs()
    # Half a step, plus the float32 rounding of w / scale and of (q - zero) * scale.
    bound = step / 2 + (wf.abs() + step) * 2.0**-22
    assert (err <= bound)[inside].all()
    # The symmetric grid's representable range covers the clipped range [-c*absmax, c*absmax].
    if symmetric:
        g_amax = ref.expand_groups(
            torch.nn.functional.pad(wf.abs(), (0, -k % group_size)).view(n, -1, group_size).amax(-1),
            k, group_size)
        assert (hi >= g_amax * clip * (1 - 2.0**-20)).all()


@SETTINGS
@given(
    rows=st.integers(0, 200),
    cols=st.integers(0, 20),
    bits=st.integers(2, 8),
    seed=st.integers(0, 2**31 - 1),
    transposed=st.booleans(),
    device=st.sampled_from(DEVICES),
)
def test_pack_unpack_identity(rows, cols, bits, seed, transposed, device):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (cols, rows) if transposed else (rows, cols), generator=gen,
                          dtype=torch.uint8).to(device)
    if transposed:
        codes = codes.t()
    packed = ops.pack_int32(codes, bits)
    assert torch.equal(ops.unpack_int32(packed, bits, rows), codes)
    assert torch.equal(packed, ref.pack_int32(codes, bits))
