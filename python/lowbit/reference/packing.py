"""Bit packing of integer codes into int32 words: the GPTQ checkpoint layout (the spec).

This docstring is the one place the layout is defined; everything else points here.

``pack_int32(codes, bits)`` takes uint8 codes ``[R, C]`` (each ``< 2**bits``) and packs
each column ``c`` as a little-endian bit stream along dim 0: code ``r`` occupies stream
bits ``[r * bits, (r + 1) * bits)``, lowest bit first; stream bit ``p`` is bit
``p % 32`` of word ``p // 32``. The result is int32 ``[ceil(R * bits / 32), C]``
(words are stored as two's-complement int32; bit 31 is the sign bit). Unused high bits
of the last word are zero.

* 4 bits: eight codes per word, code ``8w + j`` in bits ``4j .. 4j+3`` of word ``w``;
  2 bits: sixteen per word; 8 bits: four per word.
* 3 bits: 32 codes fill three words exactly; codes 10 and 21 of each 32 straddle a
  word boundary (low bits in the first word's top, the rest at the next word's
  bottom), exactly as GPTQ's reference packer lays them out.

GPTQ tensors (DESIGN.md's interchange layout) in these terms, for codes ``q`` ``[N, K]``
and zero points ``z`` ``[N, G]``:

* ``qweight = pack_int32(q.t(), bits)``  -> int32 ``[K * bits / 32, N]`` (packed along K)
* ``qzeros  = pack_int32(z, bits).t()``  -> int32 ``[G, N * bits / 32]`` (packed along N;
  the classic v1 files store ``z - 1``: a format concern, not this op's).
"""
from __future__ import annotations

import torch

__all__ = ["pack_int32", "unpack_int32", "packed_rows"]


def packed_rows(rows: int, bits: int) -> int:
    """Number of int32 words that hold ``rows`` codes of ``bits`` bits: ``ceil(rows * bits / 32)``."""
    return (rows * bits + 31) // 32


def _bit_positions(rows: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Stream position of bit t of code r is r * bits + t.
    p = (torch.arange(rows, device=device)[:, None] * bits
         + torch.arange(bits, device=device)[None, :])
    return p // 32, p % 32


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[R, C]`` -> int32 ``[ceil(R * bits / 32), C]`` (see the module docstring)."""
    r, c = codes.shape
    words = torch.zeros(packed_rows(r, bits), c, dtype=torch.int64, device=codes.device)
    word, shift = _bit_positions(r, bits, codes.device)
    q = codes.to(torch.int64)
    for t in range(bits):
        bit = (q >> t) & 1
        words.index_add_(0, word[:, t], bit << shift[:, t, None])
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """int32 ``[ceil(rows * bits / 32), C]`` -> uint8 codes ``[rows, C]``; inverse of ``pack_int32``."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    word, shift = _bit_positions(rows, bits, packed.device)
    codes = torch.zeros(rows, packed.shape[1], dtype=torch.int64, device=packed.device)
    for t in range(bits):
        codes |= ((w[word[:, t]] >> shift[:, t, None]) & 1) << t
    return codes.to(torch.uint8)
