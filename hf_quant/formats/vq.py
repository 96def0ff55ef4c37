"""Vector quantization (AQLM / VPTQ style): groups of 8 consecutive weights of a row coded as 8-bit indices into
learned codebooks of 256 vectors, `planes` residual stages (1 or 2; the decoded vectors add up), times a per-group
float16 scale:

    w[o, 8v:8v+8] = scale[o, group] * sum_p codebook[p, qweight[o, p, v]]

Stored tensors of a weight [*lead, out, in]:

    qweight   uint8    [*lead, out, planes, ceil(in / 8)]   indices (a short last vector is zero-padded, cropped)
    codebook  float16  [*lead, planes, 256, 8]               one set of codebooks per matrix
    scales    float16  [*lead, out, n_groups]

Cost: planes bits per weight for the indices, 16 / group_size for the scales, planes * 256 * 8 * 16 / (out * in)
for the codebooks (~0.1 bit per plane on a 576 x 576 matrix).

Fitting by k-means: rows are normalised by their per-group RMS scale, cut into 8-weight vectors, and each residual stage fits 256 centroids by Lloyd's algorithm (initialised from a fixed random
sample of the vectors) to what the earlier stages left. Centroids are rounded to float16 before the final
assignment, so the codes are nearest for the stored codebook.

With calibration (`VectorFormat.gptq`, method="gptq"), as in GPTVQ: the k-means weights each vector coordinate by
its output importance (scale^2 times the Hessian diagonal of its input column), and the assignments are made
vector by vector with GPTQ's error feedback (`gptq_blockwise`): each vector takes the codeword nearest in the
metric of its block of the inverse Hessian, and its error is spread over the input columns not yet coded.
"""

from __future__ import annotations

import torch

from ..solvers.gptq import gptq_blockwise
from .format import Format, register_format
from .packing import all_finite
from .scheme import QuantScheme

VQ_DIM = 8
VQ_CODES = 256
LLOYD_STEPS = 12
_CHUNK = 1 << 14
_TINY = torch.finfo(torch.float16).tiny


def n_vectors(in_features: int) -> int:
    return -(-in_features // VQ_DIM)


def decode_vectors(codebook: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """Sum over planes of the indexed codebook vectors: [*lead, out, n_vectors * 8] float32 (unscaled)."""
    *lead, out, planes, nv = qweight.shape
    n_lead = 1
    for d in lead:
        n_lead *= d
    cb = codebook.float().reshape(n_lead, planes, VQ_CODES, VQ_DIM)
    idx = qweight.reshape(n_lead, out, planes, nv).long()
    rows = torch.arange(n_lead, device=idx.device).view(n_lead, 1, 1)
    total = 0
    for p in range(planes):
        total = total + cb[:, p][rows, idx[:, :, p]]  # [n_lead, out, nv, 8]
    return total.reshape(*lead, out, nv * VQ_DIM)


class VectorFormat(Format):
    name = "vq"
    bits = (8,)  # 8-bit indices of 8-weight vectors: 1 bit per weight per plane
    planes = (1, 2)

    def specs(self, scheme: QuantScheme, shape):
        *lead, out, in_features = shape
        _, n_groups, _ = scheme.group_layout(in_features)
        return {
            "qweight": ((*lead, out, scheme.planes, n_vectors(in_features)), torch.uint8),
            "codebook": ((*lead, scheme.planes, VQ_CODES, VQ_DIM), torch.float16),
            "scales": ((*lead, out, n_groups), torch.float16),
        }

    def dequantize(self, scheme: QuantScheme, tensors, in_features: int) -> torch.Tensor:
        g, _, _ = scheme.group_layout(in_features)
        vectors = decode_vectors(tensors["codebook"], tensors["qweight"])[..., :in_features]
        return vectors * tensors["scales"].float().repeat_interleave(g, -1)[..., :in_features]

    def value_checks(self, scheme, tensors, shape):
        scales, codebook = tensors["scales"].float(), tensors["codebook"].float()
        return [("scales", scales, torch.isfinite(scales) & (scales >= _TINY), "finite normal float16 values > 0"),
                ("codebook", codebook, torch.isfinite(codebook), "finite")]

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        *lead, out, in_features = weight.shape
        w = weight.detach().float().reshape(-1, out, in_features)
        if not all_finite(w):
            raise ValueError("weight contains NaN or Inf; refusing to quantize it")
        results = [_quantize_matrix(m, scheme) for m in w]
        return {name: torch.stack([r[name] for r in results]).reshape(*lead, *results[0][name].shape).contiguous()
                for name in results[0]}

    @torch.no_grad()
    def gptq(self, weight, hessian, scheme, settings):
        """GPTVQ (see the module doc); act_order visits whole vectors by decreasing summed Hessian diagonal."""
        if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
            raise ValueError(f"GPTQ needs weight [out, in] and Hessian [in, in], got {tuple(weight.shape)}, "
                             f"{tuple(hessian.shape)}")
        w = weight.detach().float()
        out, in_features = w.shape
        g = scheme.group_layout(in_features)[0]
        importance = torch.diagonal(hessian).float().clamp_min(0)
        tensors = _quantize_matrix(w, scheme, importance)
        scale = tensors["scales"].float()
        codebook = tensors["codebook"].float()  # [planes, 256, 8], as stored
        qweight = tensors["qweight"]  # [out, planes, nv]: overwritten vector by vector below

        def round_block(j: int, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
            width = x.shape[1]
            s = scale[:, (j * VQ_DIM) // g].unsqueeze(1)
            books = codebook[:, :, :width]
            target = x / s
            chosen = [torch.zeros(out, dtype=torch.long, device=x.device) for _ in range(scheme.planes)]
            # Greedy residual stages, then (two planes) one pass re-choosing each stage given the other.
            for sweep in range(1 if scheme.planes == 1 else 2):
                for p in range(scheme.planes):
                    rest = sum(books[q][chosen[q]] for q in range(scheme.planes) if q != p and (sweep or q < p))
                    chosen[p] = _nearest((target - rest) @ metric, books[p] @ metric)
            for p in range(scheme.planes):
                qweight[:, p, j] = chosen[p].to(torch.uint8)
            return s * sum(books[p][chosen[p]] for p in range(scheme.planes))

        gptq_blockwise(w, hessian, VQ_DIM, round_block, damp=settings.damp, act_order=settings.act_order,
                       block_size=settings.block_size)
        return tensors


VQ = register_format(VectorFormat())


def _quantize_matrix(w: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None = None
                     ) -> dict[str, torch.Tensor]:
    """Per-group RMS scales and k-means codebooks of w [out, in]; with `importance` [in] (the Hessian diagonal)
    each vector coordinate weighs scale^2 * importance in the k-means, the diagonal of its output error."""
    out, in_features = w.shape
    g, n_groups, in_padded = scheme.group_layout(in_features)
    wp = torch.nn.functional.pad(w, (0, in_padded - in_features))
    scale = wp.view(out, n_groups, g).pow(2).sum(-1)
    scale = (scale / torch.tensor([min(g, in_features - i * g) for i in range(n_groups)], device=w.device).float()).sqrt()
    scale = scale.clamp(_TINY, 65504.0).half()
    nv = n_vectors(in_features)
    s_cols = scale.float().repeat_interleave(g, -1)[:, :in_features]
    u = w / s_cols
    residual = torch.nn.functional.pad(u, (0, nv * VQ_DIM - in_features)).reshape(-1, VQ_DIM)
    weights = None
    if importance is not None:
        # Zero padding of a short last vector weighs nothing.
        imp = s_cols.pow(2) * importance.view(1, -1)
        weights = torch.nn.functional.pad(imp / imp.mean().clamp_min(1e-30), (0, nv * VQ_DIM - in_features))
        weights = weights.reshape(-1, VQ_DIM)
    gen = torch.Generator().manual_seed(0)
    codebooks, indices = [], []
    for _ in range(scheme.planes):
        centroids = _kmeans(residual, gen, weights)
        idx = _nearest(residual, centroids, weights)
        codebooks.append(centroids.half())
        indices.append(idx)
        residual = residual - centroids[idx]
    return {
        "qweight": torch.stack(indices, 0).view(scheme.planes, out, nv).transpose(0, 1).to(torch.uint8).contiguous(),
        "codebook": torch.stack(codebooks, 0),
        "scales": scale,
    }


def _kmeans(x: torch.Tensor, gen: torch.Generator, weights: torch.Tensor | None = None) -> torch.Tensor:
    """256 centroids of x [N, 8] (minimising the `weights`-weighted squared error per coordinate when given);
    returned float16-rounded (as stored)."""
    n = x.shape[0]
    pick = torch.randperm(n, generator=gen)[:VQ_CODES] if n >= VQ_CODES else torch.randint(0, n, (VQ_CODES,), generator=gen)
    centroids = x[pick].clone()
    wx = x if weights is None else weights * x
    for _ in range(LLOYD_STEPS):
        idx = _nearest(x, centroids, weights)
        sums = torch.zeros_like(centroids).index_add_(0, idx, wx)
        if weights is None:
            mass = torch.bincount(idx, minlength=VQ_CODES).unsqueeze(1).float()
        else:
            mass = torch.zeros_like(centroids).index_add_(0, idx, weights)
        # An empty cluster (or coordinate with no weight) keeps its centroid: it may still win vectors later.
        centroids = torch.where(mass > 0, sums / mass.clamp_min(1e-30), centroids)
    return centroids.half().float()


def _nearest(x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the centroid nearest each row of x, in the squared distance weighted per coordinate by `weights`
    (the same shape as x) when given."""
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    c2 = centroids.pow(2).sum(1)
    for s in range(0, x.shape[0], _CHUNK):
        xs = x[s : s + _CHUNK]
        if weights is None:
            out[s : s + _CHUNK] = (c2 - 2 * xs @ centroids.t()).argmin(1)
        else:
            ws = weights[s : s + _CHUNK]
            out[s : s + _CHUNK] = (ws @ centroids.pow(2).t() - 2 * (ws * xs) @ centroids.t()).argmin(1)
    return out
