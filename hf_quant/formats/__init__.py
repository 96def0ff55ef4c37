"""Weight formats: one `Format` object per format (format.py) owning its canonical on-disk layout, coding and
checks, registered by name; additive terms (sparse outliers, low-rank factors) stored beside any format's codes."""

from .format import (
    FORMATS,
    AdditiveTerm,
    Format,
    GPTQSettings,
    format_names,
    get_format,
    register_additive_term,
    register_format,
    unregister_format,
)
from .scheme import CALIBRATION_METHODS, GROUP_SIZES, METHODS, SCHEME_FIELDS, QuantScheme, resolve_scheme
from .packing import pack_bits, packed_length, unpack_bits
from .base import bits_per_weight, stored_bits, dequantize, dequantize_expert, expert_tensors, quantize, quantize_stacked, tensor_specs, value_checks
from .scalar import (
    QuantParams,
    ScalarFormat,
    codebook_values,
    decode_params,
    dequantize_codes,
    pack,
    quantize_params,
    round_params,
    unpack,
)
# The built-in formats register themselves on import (registration order is the order error messages list them).
from . import ternary, vq, kquant  # noqa: E402,F401
from . import lowrank, sparse  # noqa: E402,F401  (additive terms; lowrank first: storage order)

__all__ = [
    "AdditiveTerm",
    "CALIBRATION_METHODS",
    "FORMATS",
    "Format",
    "GPTQSettings",
    "GROUP_SIZES",
    "METHODS",
    "QuantParams",
    "QuantScheme",
    "SCHEME_FIELDS",
    "ScalarFormat",
    "bits_per_weight",
    "codebook_values",
    "decode_params",
    "dequantize",
    "dequantize_codes",
    "dequantize_expert",
    "expert_tensors",
    "format_names",
    "get_format",
    "pack",
    "pack_bits",
    "packed_length",
    "quantize",
    "quantize_params",
    "quantize_stacked",
    "register_additive_term",
    "register_format",
    "resolve_scheme",
    "round_params",
    "stored_bits",
    "tensor_specs",
    "unpack",
    "unpack_bits",
    "unregister_format",
    "value_checks",
]
