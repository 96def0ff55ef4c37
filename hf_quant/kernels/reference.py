"""The reference kernel: dequantize with the plain-PyTorch op, then a float matmul. Runs everywhere."""

from __future__ import annotations

import torch

from ..formats.base import CODE_FORMATS, decode_params
from .ops import dequantize
from .registry import Kernel, register_kernel


@register_kernel
class ReferenceKernel(Kernel):
    name = "reference"
    priority = 0

    @classmethod
    def unsupported_reason(cls, scheme, shape, device, dtype):
        return None

    @classmethod
    def prepare(cls, scheme, tensors, shape, dtype):
        if scheme.format in CODE_FORMATS:  # a format with its own code layout decodes through its own reference
            return {"scheme": scheme, "codes": tensors, "in_features": shape[1]}
        scale, zero = decode_params(scheme, tensors)
        return {"scheme": scheme, "qweight": tensors["qweight"], "scale": scale, "zero": zero, "in_features": shape[1]}

    @classmethod
    def weight(cls, state: dict, dtype: torch.dtype) -> torch.Tensor:
        s = state["scheme"]
        if "codes" in state:  # codes only: additive terms (low-rank, ...) are added by the module
            return CODE_FORMATS[s.format].dequantize(s, state["codes"], state["in_features"]).to(dtype)
        return dequantize(
            state["qweight"], state["scale"], state["zero"], s.format, s.bits, s.group_size, state["in_features"], dtype
        )

    @classmethod
    def linear(cls, x, state):
        return torch.nn.functional.linear(x, cls.weight(state, x.dtype))
