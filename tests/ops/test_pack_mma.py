"""lowbit.ops.pack_mma against reference.pack_mma (bit for bit), the layout of
csrc/core/mma.h checked independently, and reference.unpack_mma as its inverse."""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops, reference as ref
from _helpers import FLOAT_DTYPES, misaligned, raises

# (N, K, group_size): the smallest layer (one k16 row, one 64-column unit), K not a
# multiple of 64 (80, 144), ragged last groups (80 at 32, 144 at 128), per-channel
# (group_size = K and far beyond it), group_size 16, and a few units of 64 columns.
CASES = [(64, 16, 16), (64, 80, 32), (128, 144, 128), (192, 144, 16), (64, 48, 48), (128, 64, 2**40),
         (256, 256, 128), (64, 32, 32)]


def _make(n, k, bits, group_size, device, scale_dtype=torch.float32, zero_dtype=torch.int32, zero_max=None):
    """Random codes [N, K] and their GPTQ tensors: qweight, scales [G, N] (a fifth of
    them negative), zeros [G, N] in 0..zero_max (default 2**bits - 1)."""
    g = ref.num_groups(k, group_size)
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device=device)
    qweight = ref.pack_int32(codes.t(), bits)
    sign = 1 - 2 * (torch.rand(g, n, device=device) < 0.2).float()
    scales = ((torch.rand(g, n, device=device) * 0.05 + 1e-3) * sign).to(scale_dtype)
    hi = 2**bits - 1 if zero_max is None else zero_max
    zeros = torch.randint(0, hi + 1, (g, n), device=device).to(zero_dtype)
    return codes, qweight, scales, zeros


def _check_outputs(out, qweight, scales, zeros, bits, group_size):
    packed, s, z = out
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    g = ref.num_groups(k, group_size)
    assert packed.dtype == torch.int32 and packed.shape == (k // 16, n * bits // 2)
    assert s.dtype == scales.dtype and s.shape == (g, n)
    assert z.dtype == torch.uint8 and z.shape == (g, n)
    for t in out:
        assert t.is_contiguous() and t.device == qweight.device
    want = ref.pack_mma(qweight, scales, zeros, bits, group_size)
    for name, got, exp in zip(("packed", "scales", "zeros"), out, want):
        assert torch.equal(got, exp), name


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,group_size", CASES)
def test_matches_reference(device, bits, n, k, group_size):
    for i, (sd, zd) in enumerate([(torch.float32, torch.int32), (torch.float16, torch.uint8),
                                  (torch.bfloat16, torch.int32)]):
        zero_max = (None, 255, 0)[i]            # asymmetric, full uint8 range, all zero
        codes, qweight, scales, zeros = _make(n, k, bits, group_size, device, sd, zd, zero_max)
        if i == 2:
            zeros.fill_(2 ** (bits - 1))        # symmetric
        out = ops.pack_mma(qweight, scales, zeros, bits, group_size)
        _check_outputs(out, qweight, scales, zeros, bits, group_size)
        assert torch.equal(ref.mma_codes(out[0], bits), codes)
        qw2, s2, z2 = ref.unpack_mma(*out, bits)
        assert torch.equal(qw2, qweight) and torch.equal(s2, scales) and torch.equal(z2, zeros.to(torch.uint8))


@pytest.mark.parametrize("bits", [4, 8])
def test_layout_formulas(device, bits):
    """Where each code lands, from the formulas of csrc/core/mma.h solved for the word
    (not the reference's forward map): every (k, n) of a 3-row, 3-unit weight, and a few
    positions worked out by hand."""
    n, k = 192, 48
    codes, qweight, scales, zeros = _make(n, k, bits, 16, device)
    packed = ops.pack_mma(qweight, scales, zeros, bits, 16)[0].cpu().to(torch.int64) & 0xFFFFFFFF
    kk = torch.arange(k)[:, None].expand(k, n)
    nn = torch.arange(n)[None, :].expand(k, n)
    kb, kr = kk // 16, kk % 16
    u, nr = nn // 64, nn % 64
    t, g = (kr % 8) // 2, nr % 8
    lane = 4 * g + t
    if bits == 4:   # k = 16 kb + 2 t + (i >> 2) + 8 (i & 1), n = 64 u + 16 w + 8 ((i >> 1) & 1) + g
        w, i = nr // 16, 4 * (kr % 2) + 2 * ((nr // 8) % 2) + kr // 8
    else:           # k = 16 kb + 2 t + (i & 1) + 8 (i >> 1), n = 64 u + 8 w + g
        w, i = nr // 8, 2 * (kr // 8) + kr % 2
    index = u * 32 * bits + lane * bits + w
    got = (packed[kb, index] >> (bits * i)) & (2**bits - 1)
    assert torch.equal(got.to(torch.uint8), codes.cpu().t())
    # (k, n) -> (row kb, word index, code i), by hand.
    hand = {4: [((0, 0), (0, 0, 0)), ((8, 0), (0, 0, 1)), ((1, 8), (0, 0, 6)), ((2, 0), (0, 4, 0)),
                ((0, 1), (0, 16, 0)), ((0, 16), (0, 1, 0)), ((0, 64), (0, 128, 0)), ((16, 0), (1, 0, 0)),
                ((15, 63), (0, 127, 7)), ((41, 130), (2, 288, 5))],
            8: [((0, 0), (0, 0, 0)), ((1, 0), (0, 0, 1)), ((8, 0), (0, 0, 2)), ((0, 8), (0, 1, 0)),
                ((0, 1), (0, 32, 0)), ((2, 0), (0, 8, 0)), ((15, 63), (0, 255, 3)), ((16, 64), (1, 256, 0)),
                ((41, 130), (2, 576, 3))]}
    for (kk_, nn_), (kb_, index_, i_) in hand[bits]:
        code = (int(packed[kb_, index_]) >> (bits * i_)) & (2**bits - 1)
        assert code == int(codes[nn_, kk_]), (kk_, nn_)


def test_param_order():
    order = ref.param_order(128)
    assert order[:10].tolist() == [0, 8, 16, 24, 32, 40, 48, 56, 1, 9]
    assert order[64 + 8 * 3 + 5] == 64 + 8 * 5 + 3
    assert torch.equal(order[order], torch.arange(128))
    assert torch.equal(torch.sort(order).values, torch.arange(128))


@pytest.mark.parametrize("bits", [4, 8])
def test_permuted_params(device, bits):
    """Lane g's 8 scales (one per n8 tile c) are consecutive: stored 64 u + 8 g + c holds
    column 64 u + 8 c + g."""
    _, qweight, scales, zeros = _make(128, 32, bits, 16, device, zero_max=255)
    _, s, z = ops.pack_mma(qweight, scales, zeros, bits, 16)
    for u, g, c in [(0, 0, 0), (0, 1, 0), (0, 0, 1), (1, 7, 3), (1, 2, 7)]:
        assert torch.equal(s[:, 64 * u + 8 * g + c], scales[:, 64 * u + 8 * c + g])
        assert torch.equal(z[:, 64 * u + 8 * g + c], zeros[:, 64 * u + 8 * c + g].to(torch.uint8))


def test_strided_inputs(device):
    """Non-contiguous or misaligned inputs give the same bits."""
    _, qweight, scales, zeros = _make(128, 80, 4, 32, device, torch.float16)
    want = ops.pack_mma(qweight, scales, zeros, 4, 32)
    wide = torch.zeros(qweight.shape[0], 2 * qweight.shape[1], dtype=torch.int32, device=device)
    wide[:, ::2] = qweight
    for args in [(wide[:, ::2], scales, zeros), (qweight.t().contiguous().t(), scales.t().contiguous().t(),
                                                 zeros.t().contiguous().t()),
                 (misaligned(qweight), misaligned(scales), misaligned(zeros))]:
        got = ops.pack_mma(*args, 4, 32)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [4, 8])
def test_empty(device, bits):
    # K = 0 (no rows, no groups) and N = 0 (no columns).
    for n, k in [(64, 0), (0, 32)]:
        _, qweight, scales, zeros = _make(n, k, bits, 16, device)
        out = ops.pack_mma(qweight, scales, zeros, bits, 16)
        _check_outputs(out, qweight, scales, zeros, bits, 16)


def test_opcheck(device):
    for n, k, bits, gs, sd, zd in [(64, 80, 4, 32, torch.float16, torch.int32),
                                   (128, 32, 8, 16, torch.float32, torch.uint8),
                                   (64, 48, 4, 1000, torch.bfloat16, torch.uint8),
                                   (64, 0, 8, 16, torch.float32, torch.int32)]:
        _, qweight, scales, zeros = _make(n, k, bits, gs, device, sd, zd)
        opcheck(torch.ops.lowbit.pack_mma.default, (qweight, scales, zeros, bits, gs))


def test_zero_points_out_of_range(device):
    _, qweight, scales, zeros = _make(64, 32, 4, 16, device)
    for bad in (-1, 256, 2**31 - 1):
        z = zeros.clone()
        z[1, 7] = bad
        raises(ValueError, r"'zeros' must hold zero points in 0\.\.255", ops.pack_mma, qweight, scales, z, 4, 16)
        raises(ValueError, r"'zeros' must hold zero points in 0\.\.255", ref.pack_mma, qweight, scales, z, 4, 16)


def test_bad_input(check_device):
    d = check_device
    other = "cpu" if d == "meta" else "meta"
    qweight = torch.zeros(8, 64, dtype=torch.int32, device=d)     # K = 64 at 4 bits, 32 at 8
    s = torch.rand(2, 64, device=d)
    z = torch.full((2, 64), 8, dtype=torch.int32, device=d)
    f = ops.pack_mma
    raises(TypeError, "'qweight' must be torch.int32, got torch.int64", f, qweight.long(), s, z, 4, 32)
    raises(ValueError, "'qweight' must be 2-D", f, qweight[0], s, z, 4, 32)
    raises(TypeError, "'scales' must be float32, float16 or bfloat16, got torch.int32", f, qweight, s.int(), z, 4, 32)
    raises(ValueError, "'scales' must be 2-D", f, qweight, s[0], z, 4, 32)
    raises(TypeError, "'zeros' must be torch.int32 or torch.uint8, got torch.float32", f, qweight, s, z.float(), 4, 32)
    raises(TypeError, "'zeros' must be torch.int32 or torch.uint8, got torch.int64", f, qweight, s, z.long(), 4, 32)
    raises(ValueError, "'group_size' must be a positive", f, qweight, s, z, 4, 0)
    raises(ValueError, "4- or 8-bit codes, got bits=3; use weight_only_matmul", f, qweight, s, z, 3, 32)
    raises(ValueError, "4- or 8-bit codes, got bits=2", f, qweight, s, z, 2, 32)
    raises(ValueError, "K \\(in_features\\) divisible by 16, got K=24", f, qweight[:3], s, z, 4, 32)
    raises(ValueError, "K \\(in_features\\) divisible by 16, got K=12", f, qweight[:3], s, z, 8, 32)
    raises(ValueError, "N \\(out_features\\) divisible by 64, got N=96",
           f, torch.zeros(8, 96, dtype=torch.int32, device=d), s, z, 4, 32)
    raises(ValueError, "group_size divisible by 16 \\(or >= K for per-channel\\), got 24", f, qweight, s, z, 4, 24)
    raises(ValueError, r"'scales' must have shape \[2, 64\] \(groups x out_features for K=64, group_size 32\), "
           r"got \[3, 64\]", f, qweight, torch.rand(3, 64, device=d), z, 4, 32)
    raises(ValueError, r"'scales' must have shape \[4, 64\]", f, qweight, s, z, 4, 16)
    raises(ValueError, r"'scales' must have shape \[1, 64\]", f, qweight, s, z, 8, 32)
    raises(ValueError, r"'zeros' must have the shape of 'scales' \[2, 64\], got \[2, 32\]",
           f, qweight, s, z[:, :32], 4, 32)
    raises(ValueError, f"'scales' is on {other}", f, qweight, torch.zeros_like(s, device=other), z, 4, 32)
    raises(ValueError, f"'zeros' is on {other}", f, qweight, s, torch.zeros_like(z, device=other), 4, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_mismatch():
    _, qweight, scales, zeros = _make(64, 32, 4, 16, "cuda")
    f = ops.pack_mma
    raises(ValueError, "argument 'scales' is on cpu but 'qweight' is on cuda", f, qweight, scales.cpu(), zeros, 4, 16)
    raises(ValueError, "argument 'zeros' is on cpu but 'qweight' is on cuda", f, qweight, scales, zeros.cpu(), 4, 16)
    raises(ValueError, "argument 'scales' is on cuda.* but 'qweight' is on cpu",
           f, qweight.cpu(), scales, zeros.cpu(), 4, 16)


def test_meta_shapes():
    for bits in (4, 8):
        k = 160
        qweight = torch.empty(k * bits // 32, 192, dtype=torch.int32, device="meta")
        g = ref.num_groups(k, 32)
        for sd in FLOAT_DTYPES:
            p, s, z = ops.pack_mma(qweight, torch.empty(g, 192, dtype=sd, device="meta"),
                                   torch.empty(g, 192, dtype=torch.int32, device="meta"), bits, 32)
            assert p.shape == (k // 16, 192 * bits // 2) and p.dtype == torch.int32
            assert s.shape == (g, 192) and s.dtype == sd and z.dtype == torch.uint8 and z.device.type == "meta"
