"""CPU kernel for ternary trit-planes (formats/ternary.py): multiplication-free in the weights.

Each plane's trits are held as a sign matrix of -1/0/+1, so the product of a group of activations with it is a sum
of added and subtracted activations (exact in any float type: no weight value multiplies an activation); each
group's partial sum is then multiplied once by its scale. The groups run as one batched product:

    y = sum_{plane p, group g}  scale[p, g, :] * (x[:, g] @ sign[p, g])

Declared precision: as the other CPU kernels, float32 activations are computed in bfloat16 (the signs are exact in
bfloat16; the activations and the accumulation are rounded), ~0.3% relative error; `HF_QUANT_KERNEL=reference`
computes in float32.
"""

from __future__ import annotations

import torch

from ..formats.ternary import TernaryFormat, unpack_trits
from .cpu import cpu_format_reason
from .ops import implement
from .registry import Kernel, register_kernel


@implement("ternary_sign_linear", "CompositeExplicitAutograd")
def ternary_sign_linear(x: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, in] with in = n_blocks * group_size (zero-padded by the caller); signs [n_blocks * planes, group_size,
    out] of -1/0/+1 in x's dtype; scales [n_blocks * planes, out] -> [M, out] (float32 accumulation of the
    scaled partial sums)."""
    m = x.shape[0]
    blocks = x.shape[1] // group_size
    planes = signs.shape[0] // blocks
    xg = x.view(m, blocks, group_size).transpose(0, 1)  # [blocks, M, g]
    if planes > 1:
        xg = xg.repeat_interleave(planes, 0)  # signs are ordered (block, plane)
    partial = torch.bmm(xg, signs)  # [blocks * planes, M, out]: sums of +-x
    return (partial.float() * scales.float().unsqueeze(1)).sum(0).to(x.dtype)


@register_kernel
class CpuTernaryKernel(Kernel):
    name = "cpu_ternary"
    priority = 80
    compute_dtypes = {torch.float32: torch.bfloat16}

    @classmethod
    def unsupported_reason(cls, scheme, shape, device, dtype):
        return cpu_format_reason(scheme, TernaryFormat, device, dtype)

    @classmethod
    def prepare(cls, scheme, tensors, shape, dtype):
        out, in_features = shape
        g, n_groups, in_padded = scheme.group_layout(in_features)
        trits = unpack_trits(tensors["qweight"], in_features)  # [out, planes, in]
        trits = torch.nn.functional.pad(trits, (0, in_padded - in_features))
        compute = cls.compute_dtype(dtype)
        planes = scheme.planes
        # [out, planes, G, g] -> [G, planes, g, out] -> [G * planes, g, out]
        signs = trits.view(out, planes, n_groups, g).permute(2, 1, 3, 0).reshape(n_groups * planes, g, out)
        scales = tensors["scales"].float().permute(2, 1, 0).reshape(n_groups * planes, out)
        return {"signs": signs.to(compute).contiguous(), "scales": scales.contiguous(), "group_size": g,
                "in_padded": in_padded}

    @classmethod
    def linear(cls, x, state):
        if x.shape[1] != state["in_padded"]:
            x = torch.nn.functional.pad(x, (0, state["in_padded"] - x.shape[1]))
        signs = state["signs"]
        xc = x.to(signs.dtype).contiguous()
        return ternary_sign_linear(xc, signs, state["scales"], state["group_size"]).to(x.dtype)
