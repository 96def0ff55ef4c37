"""Low-rank error correction stored beside the codes: W = decode(codes) + U @ V.

    lowrank_u  float16 [*lead, out, r]
    lowrank_v  float16 [*lead, r, in]

with r = scheme.lowrank_rank. The forward adds (x @ V^T) @ U^T to the kernel's output, which costs
r * (out + in) multiply-adds per token instead of a dense correction's out * in.
"""

from __future__ import annotations

import torch

from .base import AdditiveTerm, register_additive_term
from .scheme import QuantScheme

LOWRANK_TENSORS = ("lowrank_u", "lowrank_v")


class LowRankTerm(AdditiveTerm):
    def active(self, scheme: QuantScheme) -> bool:
        return scheme.lowrank_rank > 0

    def specs(self, scheme, shape):
        *lead, out, in_features = shape
        r = scheme.lowrank_rank
        return {"lowrank_u": ((*lead, out, r), torch.float16), "lowrank_v": ((*lead, r, in_features), torch.float16)}

    def dense(self, scheme, tensors, in_features):
        return tensors["lowrank_u"].float() @ tensors["lowrank_v"].float()

    def linear(self, x, tensors):
        u, v = tensors["lowrank_u"], tensors["lowrank_v"]
        return (x @ v.to(x.dtype).t()) @ u.to(x.dtype).t()


LOWRANK = register_additive_term(LowRankTerm())
