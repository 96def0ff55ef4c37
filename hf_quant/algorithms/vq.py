"""Vector quantization by k-means (formats/vq.py): rows are normalised by their per-group RMS scale, cut into
8-weight vectors, and each residual stage fits 256 centroids by Lloyd's algorithm (initialised from a fixed random
sample of the vectors) to what the earlier stages left. Centroids are rounded to float16 before the final
assignment, so the codes are nearest for the stored codebook. (Hessian-weighted k-means and GPTQ-style error
feedback on the assignments, as in AQLM/VPTQ, are not implemented.)
"""

from __future__ import annotations

import torch

from ..formats import QuantScheme
from ..formats.vq import VQ_CODES, VQ_DIM, n_vectors

LLOYD_STEPS = 12
_CHUNK = 1 << 14
_TINY = torch.finfo(torch.float16).tiny


@torch.no_grad()
def quantize_weight_vq(weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    if scheme.format != "vq":
        raise ValueError(f"quantize_weight_vq needs format='vq', got {scheme.format!r}")
    *lead, out, in_features = weight.shape
    w = weight.detach().float().reshape(-1, out, in_features)
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; refusing to quantize it")
    results = [_quantize_matrix(m, scheme) for m in w]
    return {name: torch.stack([r[name] for r in results]).reshape(*lead, *results[0][name].shape).contiguous()
            for name in results[0]}


def _quantize_matrix(w: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    out, in_features = w.shape
    g, n_groups, in_padded = scheme.group_layout(in_features)
    wp = torch.nn.functional.pad(w, (0, in_padded - in_features))
    scale = wp.view(out, n_groups, g).pow(2).sum(-1)
    scale = (scale / torch.tensor([min(g, in_features - i * g) for i in range(n_groups)]).float()).sqrt()
    scale = scale.clamp(_TINY, 65504.0).half()
    nv = n_vectors(in_features)
    u = w / scale.float().repeat_interleave(g, -1)[:, :in_features]
    residual = torch.nn.functional.pad(u, (0, nv * VQ_DIM - in_features)).reshape(-1, VQ_DIM)
    gen = torch.Generator().manual_seed(0)
    codebooks, indices = [], []
    for _ in range(scheme.planes):
        centroids = _kmeans(residual, gen)
        idx = _nearest(residual, centroids)
        codebooks.append(centroids.half())
        indices.append(idx)
        residual = residual - centroids[idx]
    return {
        "qweight": torch.stack(indices, 0).view(scheme.planes, out, nv).transpose(0, 1).to(torch.uint8),
        "codebook": torch.stack(codebooks, 0),
        "scales": scale,
    }


def _kmeans(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """256 centroids of x [N, 8]; returned float16-rounded (as stored)."""
    n = x.shape[0]
    pick = torch.randperm(n, generator=gen)[:VQ_CODES] if n >= VQ_CODES else torch.randint(0, n, (VQ_CODES,), generator=gen)
    centroids = x[pick].clone()
    for _ in range(LLOYD_STEPS):
        idx = _nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=VQ_CODES).unsqueeze(1).float()
        # An empty cluster keeps its centroid (it may still win vectors after the others move).
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids.half().float()


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    c2 = centroids.pow(2).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    for s in range(0, x.shape[0], _CHUNK):
        xs = x[s : s + _CHUNK]
        out[s : s + _CHUNK] = (c2 - 2 * xs @ centroids.t()).argmin(1)
    return out
