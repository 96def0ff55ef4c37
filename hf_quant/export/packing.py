"""Integer codes packed into int32 words the way the export targets read them.

Both compressed-tensors (`pack_to_int32`) and GPTQ (AutoGPTQ / GPTQModel `pack`) store codes as one LSB-first bit
stream of little-endian 32-bit words along one dimension: code i occupies bits [i*bits, (i+1)*bits) of the stream,
so when 32 is not a multiple of `bits` (3, 5, 6, 7 bits) a code straddles two words (GPTQ's 3-bit layout: 32 codes
in 3 words, codes 10 and 21 split across word boundaries). The stream is zero-padded to whole words:
ceil(n * bits / 32) words for n codes. The values packed are unsigned, in [0, 2**bits).
"""

from __future__ import annotations

import torch

from ..formats.scalar import ExportRefused

_CHUNK_CODES = 1 << 22  # bounds the int64 scratch


def packed_words(n: int, bits: int) -> int:
    """int32 words that n codes of `bits` bits take."""
    return -(-n * bits // 32)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Unsigned codes in [0, 2**bits) -> int32 words along `dim` (module doc); the other dimensions are kept."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    x = codes.movedim(dim, -1)
    *lead, n = x.shape
    flat = x.reshape(-1, n)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"codes must be in [0, {1 << bits}) to pack at {bits} bits")
    n32 = -(-n // 32) * 32
    start = torch.arange(32, dtype=torch.int64, device=codes.device) * bits
    word, offset = start // 32, start % 32
    spill = offset + bits > 32  # codes whose high bits go to the next word
    rows = flat.shape[0]
    out = torch.empty(rows, n32 // 32 * bits, dtype=torch.int32, device=codes.device)
    step = max(1, _CHUNK_CODES // max(n32, 1))
    for r0 in range(0, rows, step):
        c = torch.nn.functional.pad(flat[r0 : r0 + step].to(torch.int64), (0, n32 - n))
        c = c.view(c.shape[0], n32 // 32, 32)
        w = torch.zeros(c.shape[0], n32 // 32, bits, dtype=torch.int64, device=codes.device)
        # disjoint bit fields: the sum is their OR on the low 32 bits (what lies above is masked off)
        w.scatter_add_(2, word.expand_as(c), c << offset)
        if spill.any():
            w.scatter_add_(2, (word[spill] + 1).expand(*c.shape[:2], -1), c[..., spill] >> (32 - offset[spill]))
        w &= 0xFFFFFFFF
        w = torch.where(w >= 1 << 31, w - (1 << 32), w)  # two's complement int32
        out[r0 : r0 + step] = w.view(c.shape[0], -1).to(torch.int32)
    out = out[:, : packed_words(n, bits)].reshape(*lead, packed_words(n, bits))
    return out.movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of `pack_int32`: the n unsigned codes (int64) along `dim`."""
    x = words.movedim(dim, -1)
    *lead, nw = x.shape
    if nw != packed_words(n, bits):
        raise ValueError(f"{nw} int32 words do not hold {n} codes of {bits} bits ({packed_words(n, bits)} do)")
    flat = x.reshape(-1, nw).to(torch.int64) & 0xFFFFFFFF
    n32 = -(-n // 32) * 32
    flat = torch.nn.functional.pad(flat, (0, n32 // 32 * bits - nw + 1)).view(-1)  # +1 word: spill reads stay in
    rows = x.reshape(-1, nw).shape[0]
    idx = torch.arange(n32, dtype=torch.int64, device=words.device) * bits
    word, offset = idx // 32, idx % 32
    per_row = n32 // 32 * bits + 1
    base = (torch.arange(rows, device=words.device) * per_row)[:, None]
    lo = flat[base + word] >> offset
    hi = flat[base + word + 1] << (32 - offset)
    codes = ((lo | torch.where(offset + bits > 32, hi, 0)) & ((1 << bits) - 1))[:, :n]
    return codes.reshape(*lead, n).movedim(-1, dim)


def refuse_stacked(shape: tuple[int, ...], target: str) -> None:
    """Targets that write one matrix per module refuse stacked expert weights [experts, out, in]."""
    if len(shape) > 2:
        raise ExportRefused(f"stacked expert weights {tuple(shape)} are not exported to {target} yet",
                            "quantize with quantize_experts=False (experts kept in float) to export the rest")
