"""lowbit.ops.unpack_int32 against reference.unpack_int32, and as pack_int32's inverse."""
import pytest
import torch
from torch.library import opcheck

from lowbit import ops, reference as ref
from _helpers import raises


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("rows,cols", [(1, 1), (0, 4), (3, 0), (37, 13), (96, 2), (250, 33)])
def test_matches_reference(device, bits, rows, cols):
    # Arbitrary words, including bits beyond the last code, must unpack like the reference.
    packed = torch.randint(-2**31, 2**31 - 1, (ref.packed_rows(rows, bits), cols),
                           dtype=torch.int32, device=device)
    out = ops.unpack_int32(packed, bits, rows)
    assert out.dtype == torch.uint8 and out.shape == (rows, cols)
    assert torch.equal(out, ref.unpack_int32(packed, bits, rows))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_inverts_pack(device, bits):
    codes = torch.randint(0, 2**bits, (77, 19), dtype=torch.uint8, device=device)
    assert torch.equal(ops.unpack_int32(ops.pack_int32(codes, bits), bits, 77), codes)


def test_noncontiguous(device):
    packed = torch.randint(-2**31, 2**31 - 1, (9, 12), dtype=torch.int32, device=device).t()
    assert torch.equal(ops.unpack_int32(packed, 4, 96), ref.unpack_int32(packed, 4, 96)[:96])


def test_opcheck(device):
    packed = torch.randint(-2**31, 2**31 - 1, (15, 6), dtype=torch.int32, device=device)
    opcheck(torch.ops.lowbit.unpack_int32.default, (packed, 3, 160))


def test_bad_input(check_device):
    packed = torch.zeros(4, 3, dtype=torch.int32, device=check_device)
    f = ops.unpack_int32
    raises(TypeError, "'packed' must be torch.int32, got torch.int64", f, packed.long(), 4, 32)
    raises(ValueError, "'packed' must be 2-D", f, packed[0], 4, 32)
    raises(ValueError, "'packed' must have 2 rows of words for rows=16 and bits=4", f, packed, 4, 16)
    raises(ValueError, "'bits' must be in", f, packed, 1, 128)
    raises(ValueError, "'rows' must be >= 0", f, packed, 4, -1)
