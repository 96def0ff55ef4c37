"""The reference kernel: dequantize with the plain-PyTorch op, then a float matmul. Runs everywhere."""

from __future__ import annotations

import torch

from ..formats import ScalarFormat, decode_params
from ..formats.packing import unpack_bits
from ..formats.scalar import decode_codes
from .ops import implement
from .registry import Kernel, register_kernel


@implement("dequantize", "CompositeExplicitAutograd")
def dequantize(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    table: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Canonical packed codes + float32 scale/zero ([*lead, out, n_groups]) -> float weight [*lead, out, in].

    Affine integer codes (`table` None) decode as (q - zero) * scale, `zero` required (symmetric callers pass
    2**(bits-1)); codebook codes as table[q] * scale (`table` the float value of every code, `zero` None).
    """
    codes = unpack_bits(qweight, bits, in_features)
    return decode_codes(codes, scale, zero, table, group_size, in_features, dtype).contiguous()


@register_kernel
class ReferenceKernel(Kernel):
    name = "reference"
    priority = 0

    @classmethod
    def unsupported_reason(cls, scheme, shape, device, dtype):
        return None

    @classmethod
    def prepare(cls, scheme, tensors, shape, dtype):
        fmt = scheme.codec
        if not isinstance(fmt, ScalarFormat):  # a format with its own code layout decodes through its own reference
            own = fmt.specs(scheme, tuple(shape))
            return {"scheme": scheme, "codes": {n: tensors[n] for n in own}, "in_features": shape[1]}
        scale, zero = decode_params(scheme, tensors)
        table = fmt.table(device=scale.device)
        return {"scheme": scheme, "qweight": tensors["qweight"], "scale": scale, "zero": zero, "table": table,
                "in_features": shape[1]}

    @classmethod
    def weight(cls, state: dict, dtype: torch.dtype) -> torch.Tensor:
        s = state["scheme"]
        if "codes" in state:  # codes only: additive terms (low-rank, ...) are added by the module
            return s.codec.dequantize(s, state["codes"], state["in_features"]).to(dtype)
        return dequantize(state["qweight"], state["scale"], state["zero"], state["table"], s.bits, s.group_size,
                          state["in_features"], dtype)

    @classmethod
    def linear(cls, x, state):
        return torch.nn.functional.linear(x, cls.weight(state, x.dtype))
