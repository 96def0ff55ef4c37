"""Fast CPU kernels built on torch's fused weight-only matmuls."""

from __future__ import annotations

import torch

from ..formats import decode_params
from ..formats.packing import unpack_bits
from .ops import implement
from .registry import Kernel, register_kernel

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@implement("int4pack_linear", "CPU")
def int4pack_linear(x, packed, scale_zeros, group_size: int, out_features: int):
    """x [M, K] @ W^T with W in torch's CPU int4 tile layout; output columns past `out_features` (padding) dropped."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zeros)
    # contiguous: the fake implementation (and callers) expect a dense [M, out_features] result, not a strided slice
    return y[:, :out_features].contiguous() if y.shape[1] != out_features else y


@implement("int8pack_linear", "CPU")
def int8pack_linear(x, weight, scale, zero_term):
    """x [M, K] @ (weight_int8 * scale)^T, plus sum(x) * zero_term for asymmetric per-channel codes."""
    y = torch.ops.aten._weight_int8pack_mm(x, weight, scale)
    if zero_term is not None:
        y = y + x.sum(-1, keepdim=True) * zero_term
    return y


def _cpu_float_reason(device, dtype) -> str | None:
    if torch.device(device).type != "cpu":
        return "CPU only"
    if dtype not in _FLOAT_DTYPES:
        return f"dtype {dtype} not supported"
    return None


def cpu_format_reason(scheme, layout: type, device, dtype) -> str | None:
    """Why a CPU kernel reading the codes of the `layout` Format class alone cannot run this layer (None: it can)."""
    if not isinstance(scheme.codec, layout):
        return f"{layout.name} format only"
    return _cpu_float_reason(device, dtype)


@register_kernel
class CpuInt4PackKernel(Kernel):
    """`aten._weight_int4pack_mm_for_cpu`: w = (q - 8) * s + m per group. Every affine int format of <= 4 bits
    maps onto it exactly (q stays q, m = (8 - zero) * s), so 2-, 3- and 4-bit weights all run here; in memory
    they take 4 bits per weight (the on-disk layout keeps exactly b bits).

    Declared precision: torch's kernel is vectorised for bfloat16 only (float32 inputs run a scalar loop, ~10x
    slower than a dense float32 matmul), so float32 activations are rounded to bfloat16 for the product and the
    result returned in float32; scales and offsets are held in bfloat16 too. That adds ~0.3% relative error
    (tests bound it); `HF_QUANT_KERNEL=reference` computes in float32 throughout."""

    name = "cpu_int4pack"
    priority = 100
    compute_dtypes = {torch.float32: torch.bfloat16}

    @classmethod
    def unsupported_reason(cls, scheme, shape, device, dtype):
        if (reason := _cpu_float_reason(device, dtype)) is not None:
            return reason
        if not scheme.codec.affine_int or scheme.bits > 4:
            return "affine int formats of at most 4 bits only"
        g, _, _ = scheme.group_layout(shape[1])
        if g not in (32, 64, 128, 256):
            return f"group size {g} is not one of 32, 64, 128, 256"
        return None

    @classmethod
    def prepare(cls, scheme, tensors, shape, dtype):
        out, in_features = shape
        g, n_groups, in_padded = scheme.group_layout(in_features)
        codes = unpack_bits(tensors["qweight"], scheme.bits, in_features).to(torch.int32)
        # x is zero-padded to in_padded at call time, so padded codes contribute nothing.
        codes = torch.nn.functional.pad(codes, (0, in_padded - in_features))
        scale, zero = decode_params(scheme, tensors)
        out_padded = -(-out // 16) * 16  # the CPU tile layout needs N % 16 == 0
        pad = out_padded - out
        if pad:
            codes = torch.nn.functional.pad(codes, (0, 0, 0, pad))
            scale = torch.nn.functional.pad(scale, (0, 0, 0, pad))
            zero = torch.nn.functional.pad(zero, (0, 0, 0, pad))
        # Shift each group's codes (they stay within [0, 15]) so that q + shift - 8 is q - zero up to a fraction:
        # the offset m = (8 - shift - zero) * s is then below one step, and its rounding to a 16-bit compute dtype
        # costs little. Unshifted 2-/3-bit codes make m several steps, and bfloat16 rounding of it costs ~3% error.
        maxq = (1 << scheme.bits) - 1
        shift = 8.0 - torch.clamp(torch.round(zero), maxq - 7, 8)
        codes = codes + shift.to(torch.int32).repeat_interleave(g, -1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        scale_zeros = torch.stack((scale, (8.0 - shift - zero) * scale), -1).transpose(0, 1).contiguous()
        scale_zeros = scale_zeros.to(cls.compute_dtype(dtype))
        return {
            "packed": packed,
            "scale_zeros": scale_zeros,
            "group_size": g,
            "in_features": in_features,
            "in_padded": in_padded,
            "out_features": out,
        }

    @classmethod
    def linear(cls, x, state):
        if x.shape[1] != state["in_padded"]:
            x = torch.nn.functional.pad(x, (0, state["in_padded"] - x.shape[1]))
        sz = state["scale_zeros"]
        compute = cls.compute_dtype(x.dtype)
        if sz.dtype != compute:
            sz = sz.to(compute)
        y = int4pack_linear(x.to(compute).contiguous(), state["packed"], sz, state["group_size"], state["out_features"])
        return y.to(x.dtype)


@register_kernel
class CpuInt8PackKernel(Kernel):
    """`aten._weight_int8pack_mm` for 8-bit per-channel weights; an asymmetric zero-point becomes a rank-1 term.
    Like `cpu_int4pack`, torch's kernel is only vectorised for 16-bit activations: float32 inputs are computed in
    bfloat16 (declared precision; `HF_QUANT_KERNEL=reference` for float32 math)."""

    name = "cpu_int8pack"
    priority = 90
    compute_dtypes = {torch.float32: torch.bfloat16}

    @classmethod
    def unsupported_reason(cls, scheme, shape, device, dtype):
        if (reason := _cpu_float_reason(device, dtype)) is not None:
            return reason
        if not scheme.codec.affine_int or scheme.bits != 8 or scheme.group_size != -1:
            return "8-bit affine int with one scale per output channel only"
        return None

    @classmethod
    def prepare(cls, scheme, tensors, shape, dtype):
        out, in_features = shape
        codes = unpack_bits(tensors["qweight"], 8, in_features)
        scale, zero = decode_params(scheme, tensors)
        weight = (codes.to(torch.int16) - 128).to(torch.int8)
        # aten._weight_int8pack_mm returns garbage (and can crash) for bfloat16 inputs with few rows when
        # in_features % 16 != 0 (torch 2.13, AVX512): zero-pad the reduction dimension to a multiple of 16.
        in_padded = -(-in_features // 16) * 16
        weight = torch.nn.functional.pad(weight, (0, in_padded - in_features)).contiguous()
        compute = cls.compute_dtype(dtype)
        zero_term = None if not scheme.has_zero else ((128.0 - zero[:, 0]) * scale[:, 0]).to(compute)
        return {"weight": weight, "scale": scale[:, 0].to(compute).contiguous(), "zero_term": zero_term,
                "in_padded": in_padded}

    @classmethod
    def linear(cls, x, state):
        if x.shape[1] != state["in_padded"]:
            x = torch.nn.functional.pad(x, (0, state["in_padded"] - x.shape[1]))
        scale, zt = state["scale"], state["zero_term"]
        compute = cls.compute_dtype(x.dtype)
        if scale.dtype != compute:
            scale = scale.to(compute)
            zt = None if zt is None else zt.to(compute)
        return int8pack_linear(x.to(compute).contiguous(), state["weight"], scale, zt).to(x.dtype)
