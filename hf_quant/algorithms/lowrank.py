"""Low-rank error correction (LoRC / LQER style): W ~ Q(W - U V) + U V.

Starts from the best rank-r approximation of W itself (its dominant directions, which also set the quantization
range), then alternates: quantize what the low-rank part does not explain, refit U V as the best rank-r
approximation (truncated SVD) of the remaining residual W - Q (as in LoftQ). On SmolLM2 layers at 2 bits, rank 16,
this starting point lowers the relative weight error by about a further 0.02 over starting from Q(W). With `input_scale` (sqrt of the mean squared input activation
per input channel) the SVD is taken of the residual whitened by it, so the factors minimise the output error
||(W - Q - U V) diag(s)|| under a diagonal activation model instead of the plain weight error.
"""

from __future__ import annotations

import dataclasses

import torch

from ..formats import QuantScheme, dequantize

ALTERNATIONS = 2


def base_scheme(scheme: QuantScheme) -> QuantScheme:
    """The scheme of the codes alone (no low-rank part)."""
    return dataclasses.replace(scheme, lowrank_rank=0)


@torch.no_grad()
def quantize_weight_lowrank(weight: torch.Tensor, scheme: QuantScheme, input_scale: torch.Tensor | None = None,
                            quantize=None) -> dict[str, torch.Tensor]:
    """Canonical tensors (codes, scales, ... and lowrank_u/lowrank_v) of `weight` [*lead, out, in].
    `quantize(weight, scheme)` quantizes the codes (default: the data-free quantizer of the scheme's format)."""
    if quantize is None:
        from . import quantize_codes as quantize
    inner = base_scheme(scheme)
    r = scheme.lowrank_rank
    w = weight.detach().float()
    *lead, out, in_features = w.shape
    if r > min(out, in_features):
        raise ValueError(f"lowrank_rank={r} exceeds min(out, in) = {min(out, in_features)} of a {tuple(w.shape)} "
                         "weight; use a smaller rank")
    s = None
    if input_scale is not None:
        s = input_scale.float().clamp_min(1e-8 * float(input_scale.max().clamp_min(1e-30)))
    u, v = _stored_factors(w, r, s)
    for _ in range(ALTERNATIONS):
        packed = quantize(w - u.float() @ v.float(), inner)
        u, v = _stored_factors(w - dequantize(inner, packed, in_features), r, s)
    return {**packed, "lowrank_u": u.contiguous(), "lowrank_v": v.contiguous()}


def _stored_factors(m: torch.Tensor, r: int, s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 rank-r factors of m, optimal in the norm weighted by the input scale s (columns) when given."""
    u, v = _factors(m if s is None else m * s, r)
    if s is not None:
        v = v / s
    return u.to(torch.float16), v.to(torch.float16)


def _factors(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors (U sqrt(S), sqrt(S) V^T) of m [..., out, in], balanced so both fit float16 well."""
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    root = sv[..., :r].sqrt()
    return u[..., :r] * root.unsqueeze(-2), root.unsqueeze(-1) * vh[..., :r, :]
