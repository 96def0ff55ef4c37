"""Functions of a weight's canonical stored tensors that hold for every format: the format object's own tensors
plus those of the active additive terms (formats/format.py)."""

from __future__ import annotations

import math

import torch

from .format import GPTQSettings, active_terms
from .scheme import QuantScheme


def tensor_specs(scheme: QuantScheme, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the stored tensors of a weight of logical `shape` [*lead, out, in]."""
    specs = scheme.codec.specs(scheme, tuple(shape))
    for term in active_terms(scheme):
        specs.update(term.specs(scheme, tuple(shape)))
    return specs


def stored_bits(scheme: QuantScheme, shape: tuple[int, ...]) -> int:
    """Every stored bit of a weight of logical `shape` [*lead, out, in] (the exact integer budgets count)."""
    return sum(math.prod(shp) * torch.empty(0, dtype=dtype).element_size() * 8
               for shp, dtype in tensor_specs(scheme, tuple(shape)).values())


def bits_per_weight(scheme: QuantScheme, shape: tuple[int, ...]) -> float:
    """True storage cost: every stored bit divided by the number of logical weights."""
    return stored_bits(scheme, shape) / math.prod(shape)


def dequantize(
    scheme: QuantScheme, tensors: dict[str, torch.Tensor], in_features: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Reference dequantization of the canonical tensors to a float weight [*lead, out, in]."""
    w = scheme.codec.dequantize(scheme, tensors, in_features)
    for term in active_terms(scheme):
        w = w + term.dense(scheme, tensors, in_features)
    return w.to(dtype)


def expert_tensors(scheme: QuantScheme, tensors: dict[str, torch.Tensor], index: int,
                   shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Expert `index`'s canonical tensors, of a stacked weight of logical `shape` [experts, out, in]."""
    fmt = scheme.codec
    if not fmt.sliceable(scheme, shape):
        raise ValueError(f"the {scheme.label} tensors of a {tuple(shape)} weight are not per-expert slices "
                         "(double-quant blocks straddle experts); dequantize the expert instead")
    own = fmt.specs(scheme, tuple(shape))
    out = fmt.expert_tensors(scheme, {n: tensors[n] for n in own}, index, shape)
    out.update({n: t[index] for n, t in tensors.items() if n not in own})
    return out


def dequantize_expert(scheme: QuantScheme, tensors: dict[str, torch.Tensor], index: int, shape: tuple[int, ...],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Expert `index` [out, in] of a stacked weight of logical `shape` [experts, out, in], from all its tensors."""
    fmt, in_features = scheme.codec, shape[-1]
    if fmt.sliceable(scheme, shape):
        return dequantize(scheme, expert_tensors(scheme, tensors, index, shape), in_features, dtype)
    w = fmt.dequantize_expert(scheme, tensors, index, in_features)
    for term in active_terms(scheme):
        w = w + term.dense(scheme, {n: tensors[n][index] for n in term.specs(scheme, shape)}, in_features)
    return w.to(dtype)


def quantize(weight: torch.Tensor, scheme: QuantScheme, hessian: torch.Tensor | None = None,
             settings: GPTQSettings | None = None) -> dict[str, torch.Tensor]:
    """The canonical stored tensors of a float weight [*lead, out, in] under `scheme`: data-free, or with GPTQ's
    error feedback against the input Hessian [in, in] when `hessian` is given (a weight [out, in]). Additive terms
    are fitted around the codes, the last registered outermost (sparse outliers, then low-rank factors, then the
    format's codes)."""
    terms = active_terms(scheme)[::-1]
    settings = settings or GPTQSettings()

    def fit(w: torch.Tensor, s: QuantScheme, depth: int) -> dict[str, torch.Tensor]:
        if depth < len(terms):
            return terms[depth].fit(w, s, lambda w2, s2: fit(w2, s2, depth + 1), hessian, settings)
        return s.codec.quantize(w, s) if hessian is None else s.codec.gptq(w, hessian, s, settings)

    return fit(weight, scheme, 0)


def quantize_stacked(weights: list[torch.Tensor], hessian: torch.Tensor, scheme: QuantScheme,
                     settings: GPTQSettings) -> list[dict[str, torch.Tensor]]:
    """GPTQ of weights [out_i, in] sharing one input Hessian (q/k/v): one stacked pass where the format allows it."""
    if active_terms(scheme):
        return [quantize(w, scheme, hessian, settings) for w in weights]
    return scheme.codec.gptq_stacked(weights, hessian, scheme, settings)


def value_checks(scheme: QuantScheme, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]):
    """Every (tensor name, values, valid mask, what valid means) check the format and its terms declare for the
    stored tensors of a weight of logical `shape`."""
    checks = list(scheme.codec.value_checks(scheme, tensors, tuple(shape)))
    for term in active_terms(scheme):
        checks += term.value_checks(scheme, tensors, tuple(shape))
    return checks
