"""GPTQ entry points: a weight quantized against its input Hessian in any format, with any additive terms.

The error-feedback solver is format-agnostic (hf_quant.solvers.gptq); each format supplies its rounding step
(`Format.gptq`): the nearest grid code per column for int/NF4/FP4/FP8, GPTVQ's joint vector choice for VQ, trit pairs
for ternary planes. Sparse outliers are ranked by |w| sqrt(H_ii) (SpQR's diagonal sensitivity) and the low-rank
factors are fitted to the residual in the metric of the (damped) Hessian itself, both around GPTQ-quantized codes.
"""

from __future__ import annotations

import dataclasses

import torch

from ..formats import GPTQSettings, QuantParams, QuantScheme, dequantize, quantize, quantize_stacked
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


# damp='cv': the damping fractions tried, and the rows of each weight GPTQ codes to score them (rows are independent
# under one Hessian, so a row sample scores a candidate at a fraction of a full solve's cost).
DAMP_CANDIDATES = (0.01, 0.03, 0.1, 0.3)
CV_ROWS = 128


def cross_validated_damp(weights: list[torch.Tensor], folds: tuple[torch.Tensor, torch.Tensor], scheme: QuantScheme,
                         settings: GPTQSettings, candidates=DAMP_CANDIDATES, rows: int = CV_ROWS
                         ) -> tuple[float, list[float]]:
    """GPTQ's damping for weights sharing one input, chosen by two-fold cross-validation (damp='cv').

    GPTQ's damping is a ridge: with few calibration tokens per input dimension (Qwen2.5-Coder-0.5B's down_proj reads
    4864 inputs, 16 x 512 tokens give 1.7 tokens per dimension) the codes fit the calibration Hessian's noise, and
    the output error on other text is 2-4x the calibration error. For each candidate, GPTQ codes a row sample fitted
    on one half's Hessian (`folds`: the mean X^T X of the even- and the odd-numbered calibration sequences) and is
    scored by tr(dW H dW^T) on the other half's, both ways. The winner is halved for the solve on all the data: the
    best ridge, as a fraction of a mean X^T X, falls as 1 / tokens. Returns (damping, summed error per candidate)."""
    sample = [w[torch.linspace(0, w.shape[0] - 1, min(rows, w.shape[0])).round().long().unique()] for w in weights]
    errors = []
    for damp in candidates:
        trial = dataclasses.replace(settings, damp=damp)
        total = 0.0
        for fit, score in (folds, folds[::-1]):
            for w, tensors in zip(sample, quantize_stacked(sample, fit, scheme, trial)):
                d = dequantize(scheme, tensors, w.shape[1]) - w
                total += float(((d @ score) * d).sum())
        errors.append(total)
    best = min(range(len(candidates)), key=errors.__getitem__)
    return candidates[best] / 2, errors


__all__ = ["DAMP_CANDIDATES", "cross_validated_damp", "gptq_blockwise", "gptq_quantize", "gptq_weight", "gptq_weights", "hessian_inverse_factor",
           "single_thread"]
