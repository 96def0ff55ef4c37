"""GPTQ entry points: a weight quantized against its input Hessian in any format, with any additive terms.

The error-feedback solver is format-agnostic (hf_quant.solvers.gptq); each format supplies its rounding step
(`Format.gptq`): the nearest grid code per column for int/NF4/FP4/FP8, GPTVQ's joint vector choice for VQ, trit pairs
for ternary planes. Sparse outliers are ranked by |w| sqrt(H_ii) (SpQR's diagonal sensitivity) and the low-rank
factors are fitted to the residual in the metric of the (damped) Hessian itself, both around GPTQ-quantized codes.
"""

from __future__ import annotations

import torch

from ..formats import GPTQSettings, QuantParams, QuantScheme, quantize, quantize_stacked
from ..solvers.gptq import gptq_blockwise, hessian_inverse_factor, single_thread


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, *, damp: float = 0.01,
                  act_order: bool = True, static_groups: bool = True, block_size: int = 128,
                  refit_scales: bool = False) -> QuantParams:
    """Codes, scales and zero-points (scales/zeros already rounded as stored) of a scalar-format weight [out, in]
    given its Hessian [in, in] (proportional to X X^T of its inputs)."""
    settings = GPTQSettings(damp=damp, act_order=act_order, static_groups=static_groups, block_size=block_size,
                            refit_scales=refit_scales)
    return scheme.codec.gptq_params(weight, hessian, scheme, settings)


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, *, damp: float = 0.01,
                act_order: bool = True, static_groups: bool = True, refit_scales: bool = False
                ) -> dict[str, torch.Tensor]:
    """Canonical tensors of one weight [out, in] quantized by GPTQ against `hessian`, for every format and term."""
    return quantize(weight, scheme, hessian, GPTQSettings(damp=damp, act_order=act_order, static_groups=static_groups,
                                                          refit_scales=refit_scales))


def gptq_weights(weights: list[torch.Tensor], hessian: torch.Tensor, scheme: QuantScheme,
                 settings: GPTQSettings) -> list[dict[str, torch.Tensor]]:
    """GPTQ of weights sharing one Hessian (q/k/v): stacked into one pass where the format allows it (the same
    result as quantizing each alone)."""
    return quantize_stacked(weights, hessian, scheme, settings)


__all__ = ["gptq_blockwise", "gptq_quantize", "gptq_weight", "gptq_weights", "hessian_inverse_factor",
           "single_thread"]
