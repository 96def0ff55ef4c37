"""Quantization algorithms that work on a model: calibration-time methods (GPTQ driving, AWQ, rotations),
mixed-precision allocation and its evolutionary refinement, fused-expert handling. How one weight is coded is its
format's business (hf_quant.formats); these functions are the entry points the rest of hf_quant calls."""

import dataclasses

from ..formats import QuantScheme, quantize, quantize_params
from ..formats.scheme import CALIBRATION_METHODS


def data_free_scheme(scheme: QuantScheme) -> QuantScheme:
    """The scheme a data-free rounding of `scheme` uses: itself for "rtn"/"mse", else (calibrated methods, whose
    scales the data-free search also starts from) its "mse" form."""
    return dataclasses.replace(scheme, method="mse") if scheme.method in CALIBRATION_METHODS else scheme


def quantize_weight(weight, scheme: QuantScheme) -> dict:
    """Quantize a float weight [*lead, out, in] into the canonical stored tensors of `scheme` (codes, scales, and
    the low-rank correction when `scheme.lowrank_rank` > 0, the sparse outliers when `scheme.outliers_per_row` > 0),
    data-free."""
    return quantize(weight, scheme)


def quantize_codes(weight, scheme: QuantScheme) -> dict:
    """The codes and scales of `scheme`'s format alone (no additive terms such as low-rank factors)."""
    return scheme.codec.quantize(weight, scheme)


__all__ = ["data_free_scheme", "quantize_codes", "quantize_params", "quantize_weight"]
