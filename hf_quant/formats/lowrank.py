"""Low-rank error correction stored beside the codes: W = decode(codes) + U @ V.

    lowrank_u  float16 [*lead, out, r]
    lowrank_v  float16 [*lead, r, in]

with r = scheme.lowrank_rank. The forward adds (x @ V^T) @ U^T to the kernel's output, which costs
r * (out + in) multiply-adds per token instead of a dense correction's out * in.

Fitting (LoRC / LQER style): W ~ Q(W - U V) + U V. Starts from the best rank-r approximation of W itself (its
dominant directions, which also set the quantization range), then alternates: quantize what the low-rank part does
not explain, refit U V as the best rank-r approximation (truncated SVD) of the remaining residual W - Q (as in
LoftQ). On SmolLM2 layers at 2 bits, rank 16, this starting point lowers the relative weight error by about a
further 0.02 over starting from Q(W).

Whitening by the inputs: with `input_scale` s (sqrt of the mean squared input activation per input channel) the SVD
is taken of the residual times diag(s), so the factors minimise ||(W - Q - U V) diag(s)||, the output error under a
diagonal activation model. With `input_whitening` C, a Cholesky factor of the inputs' second moments H = C C^T (what
GPTQ calibrates with, and what the calibrated fit uses), they minimise ||(W - Q - U V) C||, which is the output error
tr(E H E^T) exactly (SVD-LLM's truncation-aware whitening): GPTQ leaves a residual whose error is small in H's
metric, not in its diagonal's.
"""

from __future__ import annotations

import torch

from .base import dequantize
from .format import AdditiveTerm, register_additive_term

LOWRANK_TENSORS = ("lowrank_u", "lowrank_v")
ALTERNATIONS = 2


class LowRankTerm(AdditiveTerm):
    field = "lowrank_rank"

    def specs(self, scheme, shape):
        *lead, out, in_features = shape
        r = scheme.lowrank_rank
        return {"lowrank_u": ((*lead, out, r), torch.float16), "lowrank_v": ((*lead, r, in_features), torch.float16)}

    def dense(self, scheme, tensors, in_features):
        return tensors["lowrank_u"].float() @ tensors["lowrank_v"].float()

    def linear(self, x, tensors):
        u, v = tensors["lowrank_u"], tensors["lowrank_v"]
        return (x @ v.to(x.dtype).t()) @ u.to(x.dtype).t()

    def value_checks(self, scheme, tensors, shape):
        return [(n, tensors[n], torch.isfinite(tensors[n]), "finite") for n in LOWRANK_TENSORS]

    def fit(self, weight, scheme, quantize_rest, hessian, settings):
        whitening = None if hessian is None else input_whitening(hessian, settings.damp)
        return quantize_weight_lowrank(weight, scheme, quantize=quantize_rest, input_whitening=whitening)


LOWRANK = register_additive_term(LowRankTerm())


def base_scheme(scheme):
    """The scheme of the codes alone (no low-rank part)."""
    return LOWRANK.inner(scheme)


def input_whitening(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower Cholesky factor C of H + damp * mean(diag H) I (H = C C^T), damped as GPTQ damps H."""
    h = hessian.double()
    diag = torch.diagonal(h)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean = float(diag.clamp_min(0).mean())
    return torch.linalg.cholesky(h + max(damp * mean, 1e-12) * eye).float()


@torch.no_grad()
def quantize_weight_lowrank(weight: torch.Tensor, scheme, input_scale: torch.Tensor | None = None,
                            quantize=None, input_whitening: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Canonical tensors (codes, scales, ... and lowrank_u/lowrank_v) of `weight` [*lead, out, in].
    `quantize(weight, scheme)` quantizes the codes (default: the data-free coding of the scheme's format).
    `input_scale` [in] or `input_whitening` [in, in] (lower triangular, invertible) weight the fit (module doc)."""
    if input_scale is not None and input_whitening is not None:
        raise ValueError("pass input_scale or input_whitening, not both")
    inner = base_scheme(scheme)
    if quantize is None:
        quantize = inner.codec.quantize
    r = scheme.lowrank_rank
    w = weight.detach().float()
    *lead, out, in_features = w.shape
    if r > min(out, in_features):
        raise ValueError(f"lowrank_rank={r} exceeds min(out, in) = {min(out, in_features)} of a {tuple(w.shape)} "
                         "weight; use a smaller rank")
    s = None
    if input_scale is not None:
        s = input_scale.float().clamp_min(1e-8 * float(input_scale.max().clamp_min(1e-30)))
    c = None if input_whitening is None else input_whitening.float()
    u, v = _stored_factors(w, r, s, c)
    for _ in range(ALTERNATIONS):
        packed = quantize(w - u.float() @ v.float(), inner)
        u, v = _stored_factors(w - dequantize(inner, packed, in_features), r, s, c)
    return {**packed, "lowrank_u": u.contiguous(), "lowrank_v": v.contiguous()}


def _stored_factors(m: torch.Tensor, r: int, s: torch.Tensor | None,
                    c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 rank-r factors of m, optimal in the norm weighted by the input scale s (columns) or by the whitening
    C (||(m - U V) C||) when given: the best rank-r factors (U, V') of m C, then V = V' C^-1."""
    if c is not None:
        u, v = _factors(m @ c, r)
        v = torch.linalg.solve_triangular(c, v, upper=False, left=False)
    else:
        u, v = _factors(m if s is None else m * s, r)
        if s is not None:
            v = v / s
    return u.to(torch.float16), v.to(torch.float16)


def _factors(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors (U sqrt(S), sqrt(S) V^T) of m [..., out, in], balanced so both fit float16 well."""
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    root = sv[..., :r].sqrt()
    return u[..., :r] * root.unsqueeze(-2), root.unsqueeze(-1) * vh[..., :r, :]
