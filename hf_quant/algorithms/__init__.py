"""Algorithms that choose codes, scales and zero-points for a weight."""

from ..formats import QuantScheme
from .data_free import quantize_params
from .data_free import quantize_weight as quantize_codes


def quantize_weight(weight, scheme: QuantScheme) -> dict:
    """Quantize a float weight [*lead, out, in] into the canonical stored tensors of `scheme` (codes, scales, and
    the low-rank correction when `scheme.lowrank_rank` > 0)."""
    if scheme.lowrank_rank:
        from .lowrank import quantize_weight_lowrank

        return quantize_weight_lowrank(weight, scheme)
    return quantize_codes(weight, scheme)


__all__ = ["quantize_params", "quantize_weight"]
