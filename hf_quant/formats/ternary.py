"""Ternary trit-planes (BitNet b1.58 weights; PTQTP-style two-plane post-training fits):

    w = sum_p scale[p, group] * t_p,   t_p in {-1, 0, +1},  p < planes (1 or 2)

Stored tensors of a weight [*lead, out, in]:

    qweight  uint8    [*lead, out, planes, ceil(in / 5)]   5 trits per byte, base 3: byte = sum_k (t_k + 1) * 3**k
    scales   float16  [*lead, out, planes, n_groups]       one scale per plane and group (short last group allowed)

so a plane costs 8/5 = 1.6 bits per weight plus 16 / group_size for its scales.
"""

from __future__ import annotations

import torch

from .base import CodeFormat, register_code_format
from .scheme import QuantScheme

TRITS_PER_BYTE = 5
_POW3 = (1, 3, 9, 27, 81)


def packed_trit_length(n: int) -> int:
    return -(-n // TRITS_PER_BYTE)


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """int8 trits in {-1, 0, 1} along the last dim -> uint8 [..., ceil(n / 5)] (the layout above)."""
    if trits.numel() and (int(trits.min()) < -1 or int(trits.max()) > 1):
        raise ValueError("pack_trits takes values in {-1, 0, 1}")
    *lead, n = trits.shape
    digits = torch.nn.functional.pad(trits.to(torch.int16) + 1, (0, packed_trit_length(n) * TRITS_PER_BYTE - n),
                                     value=1)
    pow3 = torch.tensor(_POW3, dtype=torch.int16, device=trits.device)
    return (digits.view(*lead, -1, TRITS_PER_BYTE) * pow3).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_trits`: int8 [..., n]."""
    if packed.shape[-1] != packed_trit_length(n):
        raise ValueError(f"packed row of {packed.shape[-1]} bytes does not hold {n} trits")
    if packed.numel() and int(packed.max()) >= 3**TRITS_PER_BYTE:
        raise ValueError(f"byte value {int(packed.max())} is not 5 trits (must be < 243)")
    pow3 = torch.tensor(_POW3, dtype=torch.int16, device=packed.device)
    digits = (packed.to(torch.int16).unsqueeze(-1) // pow3) % 3
    return (digits.flatten(-2)[..., :n] - 1).to(torch.int8)


def expand_groups(scale: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    """[..., n_groups] -> [..., in] (each scale repeated over its group; the last group may be short)."""
    return scale.repeat_interleave(group, -1)[..., :in_features]


class TernaryFormat(CodeFormat):
    def specs(self, scheme: QuantScheme, shape):
        *lead, out, in_features = shape
        _, n_groups, _ = scheme.group_layout(in_features)
        return {
            "qweight": ((*lead, out, scheme.planes, packed_trit_length(in_features)), torch.uint8),
            "scales": ((*lead, out, scheme.planes, n_groups), torch.float16),
        }

    def dequantize(self, scheme: QuantScheme, tensors, in_features: int) -> torch.Tensor:
        g, _, _ = scheme.group_layout(in_features)
        trits = unpack_trits(tensors["qweight"], in_features).float()
        return (trits * expand_groups(tensors["scales"].float(), g, in_features)).sum(-2)


TERNARY = register_code_format("ternary", TernaryFormat())
