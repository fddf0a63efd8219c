"""lowbit.ops.pack_int32 against reference.pack_int32 (words bit-exact), and the GPTQ layout."""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops, reference as ref
from _helpers import raises

PACK_SHAPES = [(1, 1), (0, 5), (5, 0), (8, 3), (32, 7), (37, 13), (96, 1), (100, 33), (256, 64)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", PACK_SHAPES)
def test_matches_reference(device, bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8, device=device)
    packed = ops.pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (ref.packed_rows(shape[0], bits), shape[1])
    assert torch.equal(packed, ref.pack_int32(codes, bits))


def test_transposed_view_gives_gptq_qweight(device):
    # qweight = pack_int32(codes.t(), bits): int32 [K * bits / 32, N], packed along K.
    n, k = 6, 64
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    qweight = ops.pack_int32(codes.t(), 4)
    assert qweight.shape == (k // 8, n)
    # Eight codes per word along K, lowest bits first.
    word = int(qweight[1, 2]) & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == codes[2, 8:16].tolist()


def test_gptq_three_bit_straddle(device):
    # 32 three-bit codes fill three words; codes 10 and 21 straddle word boundaries.
    codes = torch.zeros(32, 1, dtype=torch.uint8, device=device)
    codes[10] = 0b101   # low two bits end word 0, the high bit starts word 1
    codes[21] = 0b111   # the low bit ends word 1, the high two bits start word 2
    w = [int(x) & 0xFFFFFFFF for x in ops.pack_int32(codes, 3)[:, 0].tolist()]
    assert w[0] == 0b01 << 30 and w[1] == (1 | 1 << 31) and w[2] == 0b11


def test_opcheck(device):
    codes = torch.randint(0, 8, (40, 9), dtype=torch.uint8, device=device)
    opcheck(torch.ops.lowbit.pack_int32.default, (codes, 3))


def test_bad_input(check_device):
    codes = torch.randint(0, 16, (16, 4), dtype=torch.uint8, device=check_device)
    raises(TypeError, "'codes' must be torch.uint8, got torch.int32", ops.pack_int32, codes.int(), 4)
    raises(ValueError, "'codes' must be 2-D", ops.pack_int32, codes[0], 4)
    raises(ValueError, "'bits' must be in", ops.pack_int32, codes, 9)


def test_code_out_of_range(device):
    codes = torch.randint(0, 16, (16, 4), dtype=torch.uint8, device=device)
    codes[9, 2] = 16
    raises(ValueError, r"'codes' holds a value >= 2\*\*bits = 16 \(row 9\)", ops.pack_int32, codes, 4)
    # The transposed (column-major) path, GPTQ's qweight, checks too.
    raises(ValueError, r"'codes' holds a value >= 2\*\*bits = 16 \(row 2\)", ops.pack_int32, codes.t(), 4)
