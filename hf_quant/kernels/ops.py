"""Every custom op of hf_quant (`torch.ops.hf_quant.*`) in one place: its schema and its fake (shape-only)
implementation for torch.compile. The implementations live beside the kernels that use them and register
themselves with `implement(name, dispatch_key)`:

    dequantize           reference.py   CompositeExplicitAutograd (every device): the plain-PyTorch decoding
    int4pack_linear      cpu.py         CPU: torch's fused int4 weight-only matmul
    int8pack_linear      cpu.py         CPU: torch's int8 weight-only matmul
    ternary_sign_linear  ternary.py     CompositeExplicitAutograd: sign-plane sums for trit-planes
    vq_lut_linear        vq.py          CompositeExplicitAutograd: codebook lookup tables for VQ
    triton_linear        triton/        CUDA (and CPU under TRITON_INTERPRET=1): fused dequantize-matmul
    triton_moe_linear    triton/        CUDA (and CPU): fused MoE experts

One `torch.library.Library` defines them all. Library ops, not `custom_op`: the fused ones run once per layer per
decoded token, and a Library op dispatches in ~3 us where custom_op's Python wrapper takes 10-15 us. Gradients
through packed weights are handled one level up (`PackedWeight.packed_linear`), so no op has an autograd kernel.
"""

from __future__ import annotations

import torch

LIB = torch.library.Library("hf_quant", "DEF")

_WEIGHT_ARGS = ("Tensor[] planes, int[] widths, Tensor scale, Tensor? zero, Tensor? table, int mode, float sym_zero, "
                "int group_size, int out_features")

SCHEMAS = {
    "dequantize": "dequantize(Tensor qweight, Tensor scale, Tensor? zero, Tensor? table, int bits, int group_size, "
                  "int in_features, ScalarType dtype) -> Tensor",
    "int4pack_linear": "int4pack_linear(Tensor x, Tensor packed, Tensor scale_zeros, int group_size, "
                       "int out_features) -> Tensor",
    "int8pack_linear": "int8pack_linear(Tensor x, Tensor weight, Tensor scale, Tensor? zero_term) -> Tensor",
    "ternary_sign_linear": "ternary_sign_linear(Tensor x, Tensor signs, Tensor scales, int group_size) -> Tensor",
    "vq_lut_linear": "vq_lut_linear(Tensor x, Tensor codebook, Tensor offsets, Tensor scales) -> Tensor",
    "triton_linear": f"triton_linear(Tensor x, {_WEIGHT_ARGS}, int split_k=0) -> Tensor",
    "triton_moe_linear": f"triton_moe_linear(Tensor x, Tensor expert_ids, {_WEIGHT_ARGS}) -> Tensor",
}

FAKES = {
    "dequantize": lambda qweight, scale, zero, table, bits, group_size, in_features, dtype: qweight.new_empty(
        (*qweight.shape[:-1], in_features), dtype=dtype),
    "int4pack_linear": lambda x, packed, scale_zeros, group_size, out_features: x.new_empty((x.shape[0], out_features)),
    "int8pack_linear": lambda x, weight, scale, zero_term: x.new_empty((x.shape[0], weight.shape[0])),
    "ternary_sign_linear": lambda x, signs, scales, group_size: x.new_empty((x.shape[0], signs.shape[2])),
    "vq_lut_linear": lambda x, codebook, offsets, scales: x.new_empty((x.shape[0], scales.shape[0])),
    "triton_linear": lambda x, planes, widths, scale, zero, table, mode, sym_zero, group_size, out_features,
    split_k=0: x.new_empty((x.shape[0], out_features)),
    "triton_moe_linear": lambda x, expert_ids, planes, widths, scale, zero, table, mode, sym_zero, group_size,
    out_features: x.new_empty((expert_ids.shape[0], expert_ids.shape[1], out_features)),
}

for _name, _schema in SCHEMAS.items():
    LIB.define(_schema)
    torch.library.register_fake(f"hf_quant::{_name}", FAKES[_name], lib=LIB)


def implement(name: str, *dispatch_keys: str):
    """Decorator registering `fn` as op `name`'s implementation for each dispatch key; returns the op."""
    if name not in SCHEMAS:
        raise ValueError(f"hf_quant op {name!r} has no schema in kernels/ops.py")

    def register(fn):
        for key in dispatch_keys:
            LIB.impl(name, fn, key)
        return getattr(torch.ops.hf_quant, name).default

    return register


__all__ = ["LIB", "SCHEMAS", "implement"]
