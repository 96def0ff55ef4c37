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
"""

from __future__ import annotations

import torch

from .base import CodeFormat, register_code_format
from .scheme import QuantScheme

VQ_DIM = 8
VQ_CODES = 256


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


class VectorFormat(CodeFormat):
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


VQ = register_code_format("vq", VectorFormat())
