"""Algorithms that choose codes, scales and zero-points for a weight."""

from .data_free import quantize_weight, quantize_params

__all__ = ["quantize_params", "quantize_weight"]
