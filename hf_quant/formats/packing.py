"""Bit packing at exactly b bits per code.

Canonical on-disk layout (format version 1): codes of the last dimension are grouped 8 at a time
(the last dimension is zero-padded to a multiple of 8); each group of 8 codes becomes `bits` bytes,
code i of the group occupying bits [i*bits, (i+1)*bits) of the little-endian 8*bits-bit word.
So a row of n codes takes ceil(n / 8) * bits bytes, and 3-bit codes really take 3 bits.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
# Rows are processed in chunks so the int64 scratch stays small even for huge expert tensors.
_CHUNK_CODES = 1 << 20  # (their int64 scratch, ~3 copies, is then ~24 MiB at any weight size)


def packed_length(n: int, bits: int) -> int:
    """Bytes one row of `n` codes takes."""
    return -(-n // 8) * bits


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dim into uint8 (see module doc for the layout)."""
    _check_bits(bits)
    *lead, n = codes.shape
    n8 = -(-n // 8) * 8
    flat = codes.reshape(-1, n)
    if flat.numel() and int(flat.max()) >= (1 << bits):
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits")
    if bits == 8:
        out = torch.nn.functional.pad(flat.to(torch.uint8), (0, n8 - n))
        return out.reshape(*lead, n8)
    rows = flat.shape[0]
    out = torch.empty(rows, n8 // 8 * bits, dtype=torch.uint8, device=codes.device)
    step = max(1, _CHUNK_CODES // max(n8, 1))
    for r0 in range(0, rows, step):
        out[r0 : r0 + step] = pack_bits_unchecked(flat[r0 : r0 + step], bits)
    return out.reshape(*lead, n8 // 8 * bits)


def pack_bits_unchecked(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_bits`' layout in one pass, without its host-side range check and row chunking, so that torch.compile
    traces it (the KV cache's compiled step); codes must already lie in [0, 2**bits)."""
    *lead, n = codes.shape
    n8 = -(-n // 8) * 8
    c = torch.nn.functional.pad(codes, (0, n8 - n))
    if bits == 8:
        return c.to(torch.uint8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    word = (c.to(torch.int64).view(*lead, n8 // 8, 8) << shifts).sum(-1)  # disjoint bit fields: sum == OR
    return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).view(*lead, n8 // 8 * bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 codes of shape [..., n]."""
    _check_bits(bits)
    *lead, nbytes = packed.shape
    n8 = nbytes // bits * 8
    if nbytes % bits or n8 < n or n8 - n >= 8:
        raise ValueError(f"packed row of {nbytes} bytes does not hold {n} codes of {bits} bits")
    flat = packed.reshape(-1, nbytes)
    if bits == 8:
        return flat[:, :n].reshape(*lead, n)
    if bits == 4:  # the common case, without int64 scratch
        lo, hi = flat & 0xF, flat >> 4
        return torch.stack((lo, hi), -1).view(flat.shape[0], n8)[:, :n].reshape(*lead, n)
    if bits == 2:  # byte j holds codes 4j..4j+3, lowest bits first
        parts = (flat & 3, (flat >> 2) & 3, (flat >> 4) & 3, flat >> 6)
        return torch.stack(parts, -1).view(flat.shape[0], n8)[:, :n].reshape(*lead, n)
    if bits == 3:  # 3 bytes hold 8 codes; codes 2 and 5 straddle a byte boundary
        b = flat.view(flat.shape[0], n8 // 8, 3)
        b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
        parts = (b0 & 7, (b0 >> 3) & 7, (b0 >> 6) | ((b1 & 1) << 2), (b1 >> 1) & 7, (b1 >> 4) & 7,
                 (b1 >> 7) | ((b2 & 3) << 1), (b2 >> 2) & 7, b2 >> 5)
        return torch.stack(parts, -1).view(flat.shape[0], n8)[:, :n].reshape(*lead, n)
    rows = flat.shape[0]
    out = torch.empty(rows, n, dtype=torch.uint8, device=packed.device)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    mask = (1 << bits) - 1
    step = max(1, _CHUNK_CODES // max(n8, 1))
    for r0 in range(0, rows, step):
        b = flat[r0 : r0 + step].to(torch.int64).view(-1, n8 // 8, bits)
        word = (b << byte_shifts).sum(-1)
        codes = (word.unsqueeze(-1) >> shifts) & mask
        out[r0 : r0 + step] = codes.view(b.shape[0], n8)[:, :n].to(torch.uint8)
    return out.reshape(*lead, n)


def all_finite(tensor: torch.Tensor, chunk_elements: int = 1 << 22) -> bool:
    """Whether every value of `tensor` is finite, checked a slice of rows at a time: `torch.isfinite` of a whole
    bfloat16 weight allocates ~5 bytes per value (313 MB for a 65M-value head), more than quantizing it needs."""
    flat = tensor.detach().reshape(-1, tensor.shape[-1]) if tensor.dim() else tensor.detach().reshape(1, 1)
    step = max(1, chunk_elements // max(flat.shape[1], 1))
    return all(bool(torch.isfinite(flat[r0 : r0 + step]).all()) for r0 in range(0, flat.shape[0], step))
