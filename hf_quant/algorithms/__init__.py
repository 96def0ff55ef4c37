"""Algorithms that choose codes, scales and zero-points for a weight."""

import dataclasses

from ..formats import QuantScheme
from .data_free import quantize_params


def data_free_scheme(scheme: QuantScheme) -> QuantScheme:
    """The scheme a data-free rounding of `scheme` uses: itself for "rtn"/"mse", else (calibrated methods, whose
    scales the data-free search also starts from) its "mse" form."""
    return scheme if scheme.method in ("rtn", "mse") else dataclasses.replace(scheme, method="mse")


def quantize_weight(weight, scheme: QuantScheme) -> dict:
    """Quantize a float weight [*lead, out, in] into the canonical stored tensors of `scheme` (codes, scales, and
    the low-rank correction when `scheme.lowrank_rank` > 0, the sparse outliers when `scheme.outliers_per_row` > 0)."""
    if scheme.outliers_per_row:
        from .sparse import quantize_weight_outliers

        return quantize_weight_outliers(weight, scheme)
    if scheme.lowrank_rank:
        from .lowrank import quantize_weight_lowrank

        return quantize_weight_lowrank(weight, scheme)
    return quantize_codes(weight, scheme)


def quantize_codes(weight, scheme: QuantScheme) -> dict:
    """The codes and scales of `scheme`'s format alone (no additive terms such as low-rank factors)."""
    if scheme.format == "ternary":
        from .ternary import quantize_weight_ternary

        return quantize_weight_ternary(weight, scheme)
    if scheme.format == "vq":
        from .vq import quantize_weight_vq

        return quantize_weight_vq(weight, scheme)
    from .data_free import quantize_weight as quantize_scalar

    return quantize_scalar(weight, scheme)


__all__ = ["data_free_scheme", "quantize_params", "quantize_weight"]
