"""CPU kernel for vector-quantized weights (formats/vq.py): lookup tables instead of decoded weights.

For few tokens (decode), each 8-wide slice of the input is multiplied once with every codeword,
T[m, v, c] = x[m, 8v:8v+8] . codebook[c], and the product is then a gather-and-add over the codes:

    y[m, o] = sum_group scale[o, group] * sum_{v in group, plane p} T_p[m, v, code[o, p, v]]

so the weight is never decoded: per output row and 8 weights it reads one 4-byte table index per plane (held as
int32 offsets v * 256 + code; the on-disk codes stay 8-bit) instead of 8 decoded floats. For many tokens the tables
grow with the token count, so the kernel decodes the weight once per call and runs one dense matmul instead.
Accumulation is float32 in both regimes (no declared precision loss beyond the float32 reference).
"""

from __future__ import annotations

import torch

from ..formats.vq import VQ_CODES, VQ_DIM, VectorFormat, decode_vectors, n_vectors
from .cpu import cpu_format_reason
from .ops import implement
from .registry import Kernel, register_kernel

# Above this many tokens, decoding the weight once beats gathering tables per token (measured on a 2-core CPU:
# benchmarks/cpu_kernels.py, the vq rows).
LUT_MAX_TOKENS = 8


@implement("vq_lut_linear", "CompositeExplicitAutograd")
def vq_lut_linear(x: torch.Tensor, codebook: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, n_groups * vectors_per_group * 8] float32 (zero-padded by the caller); codebook [planes, 256, 8]
    float32; offsets [planes, out * n_groups * vectors_per_group] int32 (v * 256 + code); scales [out, n_groups]
    float32 -> [M, out] float32."""
    m = x.shape[0]
    out, n_groups = scales.shape
    nv = x.shape[1] // VQ_DIM
    xv = x.view(m, nv, VQ_DIM)
    total = None
    for p in range(codebook.shape[0]):
        table = torch.matmul(xv, codebook[p].t()).view(m, nv * VQ_CODES)  # [M, nv * 256]
        # One token: a 1-D gather (measured ~2x faster than gathering along dim 1 of a [1, N] table).
        picked = table[0].index_select(0, offsets[p]).unsqueeze(0) if m == 1 else table.index_select(1, offsets[p])
        total = picked if total is None else total.add_(picked)
    per_group = total.view(m, out, n_groups, nv // n_groups).sum(-1)
    return (per_group * scales).sum(-1)


@register_kernel
class CpuVqKernel(Kernel):
    name = "cpu_vq"
    priority = 80

    @classmethod
    def unsupported_reason(cls, scheme, shape, device, dtype):
        return cpu_format_reason(scheme, VectorFormat, device, dtype)

    @classmethod
    def prepare(cls, scheme, tensors, shape, dtype):
        out, in_features = shape
        g, n_groups, _ = scheme.group_layout(in_features)
        nv = n_vectors(in_features)
        # Vectors per group: a group size is a multiple of 8, except one per-channel group of any width.
        per_group = g // VQ_DIM if n_groups > 1 else nv
        nv_padded = n_groups * per_group
        codes = tensors["qweight"].long()  # [out, planes, nv]
        # Padded vectors read code 0 of a zero-padded input slice: they add nothing.
        codes = torch.nn.functional.pad(codes, (0, nv_padded - nv))
        base = torch.arange(nv_padded, dtype=torch.long).mul_(VQ_CODES)
        offsets = (codes + base).permute(1, 0, 2).reshape(scheme.planes, out * nv_padded).to(torch.int32)
        return {
            "codebook": tensors["codebook"].float().contiguous(),
            "codes": tensors["qweight"],
            "offsets": offsets.contiguous(),
            "scales": tensors["scales"].float().contiguous(),
            "group_size": g,
            "in_features": in_features,
            "in_padded": nv_padded * VQ_DIM,
        }

    @classmethod
    def linear(cls, x, state):
        if x.shape[0] > LUT_MAX_TOKENS:
            return torch.nn.functional.linear(x, cls.weight(state, x.dtype))
        xf = x.float()
        if xf.shape[1] != state["in_padded"]:
            xf = torch.nn.functional.pad(xf, (0, state["in_padded"] - xf.shape[1]))
        y = vq_lut_linear(xf.contiguous(), state["codebook"], state["offsets"], state["scales"])
        return y.to(x.dtype)

    @classmethod
    def weight(cls, state, dtype):
        g, n = state["group_size"], state["in_features"]
        vectors = decode_vectors(state["codebook"], state["codes"])[..., :n]
        return (vectors * state["scales"].repeat_interleave(g, -1)[..., :n]).to(dtype)
