"""hf_quant's custom ops (`torch.library`): one schema each, a pure-PyTorch implementation that runs on every
device, fast per-device implementations where they exist, and fake (meta) implementations for torch.compile."""

from __future__ import annotations

import torch

from ..formats.base import codebook_values
from ..formats.packing import unpack_bits


@torch.library.custom_op("hf_quant::dequantize", mutates_args=())
def dequantize(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    format: str,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Canonical packed codes + float32 scale/zero ([*lead, out, n_groups]) -> float weight [*lead, out, in].

    `zero` is required for "int" (symmetric callers pass 2**(bits-1)); codebook formats pass None.
    """
    n_groups = scale.shape[-1]
    g = in_features if group_size == -1 else group_size
    codes = unpack_bits(qweight, bits, in_features)
    if n_groups * g != in_features:  # short last group
        codes = torch.nn.functional.pad(codes, (0, n_groups * g - in_features))
    lead = codes.shape[:-1]
    if format == "int":
        w = (codes.view(*lead, n_groups, g).to(scale.dtype) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    else:
        table = codebook_values(format, device=codes.device).to(scale.dtype)
        w = table[codes.long()].view(*lead, n_groups, g) * scale.unsqueeze(-1)
    return w.reshape(*lead, n_groups * g)[..., :in_features].to(dtype).contiguous()


@dequantize.register_fake
def _(qweight, scale, zero, format, bits, group_size, in_features, dtype):
    return qweight.new_empty((*qweight.shape[:-1], in_features), dtype=dtype)


# The fused CPU ops run once per linear layer per decoded token, so their dispatch cost matters: a Library-defined
# op with a plain CPU kernel dispatches in ~3 us, a `custom_op` (Python autograd wrapper) in ~10-15 us. Gradients
# through packed weights are handled one level up (`PackedWeight.packed_linear`), so no autograd kernel is needed.
_LIB = torch.library.Library("hf_quant", "FRAGMENT")


def _define_cpu_op(schema: str, cpu_impl, fake_impl):
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, cpu_impl, "CPU")
    torch.library.register_fake(f"hf_quant::{name}", fake_impl, lib=_LIB)
    return getattr(torch.ops.hf_quant, name).default


def _int4pack_linear(x, packed, scale_zeros, group_size: int, out_features: int):
    """x [M, K] @ W^T with W in torch's CPU int4 tile layout; output columns past `out_features` (padding) dropped."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zeros)
    # contiguous: the fake implementation (and callers) expect a dense [M, out_features] result, not a strided slice
    return y[:, :out_features].contiguous() if y.shape[1] != out_features else y


def _int8pack_linear(x, weight, scale, zero_term):
    """x [M, K] @ (weight_int8 * scale)^T, plus sum(x) * zero_term for asymmetric per-channel codes."""
    y = torch.ops.aten._weight_int8pack_mm(x, weight, scale)
    if zero_term is not None:
        y = y + x.sum(-1, keepdim=True) * zero_term
    return y


int4pack_linear = _define_cpu_op(
    "int4pack_linear(Tensor x, Tensor packed, Tensor scale_zeros, int group_size, int out_features) -> Tensor",
    _int4pack_linear,
    lambda x, packed, scale_zeros, group_size, out_features: x.new_empty((x.shape[0], out_features)),
)
int8pack_linear = _define_cpu_op(
    "int8pack_linear(Tensor x, Tensor weight, Tensor scale, Tensor? zero_term) -> Tensor",
    _int8pack_linear,
    lambda x, weight, scale, zero_term: x.new_empty((x.shape[0], weight.shape[0])),
)
