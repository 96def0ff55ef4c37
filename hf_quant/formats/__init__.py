"""Packed weight formats: one canonical on-disk layout per format (see `base` for the layout)."""

from .base import (
    QuantParams,
    bits_per_weight,
    codebook_values,
    decode_params,
    dequantize,
    dequantize_codes,
    pack,
    round_params,
    tensor_specs,
    unpack,
)
from . import lowrank, sparse, ternary, vq  # noqa: F401  (register the additive terms and code formats)
from .packing import pack_bits, packed_length, unpack_bits
from .scheme import CODEBOOK_BITS, FORMATS, GROUP_SIZES, INT_BITS, METHODS, QuantScheme

__all__ = [
    "CODEBOOK_BITS",
    "FORMATS",
    "GROUP_SIZES",
    "INT_BITS",
    "METHODS",
    "QuantParams",
    "QuantScheme",
    "bits_per_weight",
    "codebook_values",
    "decode_params",
    "dequantize",
    "dequantize_codes",
    "pack",
    "pack_bits",
    "packed_length",
    "round_params",
    "tensor_specs",
    "unpack",
    "unpack_bits",
]
