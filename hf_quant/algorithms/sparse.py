"""Sparse outliers (SpQR style): the k largest-magnitude weights of each output row are taken out before the
low-bit codes are fitted (so they no longer stretch their groups' ranges), and stored exactly as float16
residuals w - decode(code) at their positions. `importance` (e.g. input activation second moments, [in]) ranks
weights by |w| * sqrt(importance) instead, the diagonal-Hessian sensitivity of SpQR.
"""

from __future__ import annotations

import dataclasses

import torch

from ..formats import QuantScheme, dequantize
from ..formats.sparse import MAX_COLUMNS


@torch.no_grad()
def quantize_weight_outliers(weight: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None = None,
                             quantize=None) -> dict[str, torch.Tensor]:
    """Canonical tensors of `weight` [*lead, out, in]: the inner scheme's (codes, ... and any low-rank factors) plus
    `outlier_cols` / `outlier_values`. `quantize(weight, scheme)` quantizes the rest under the scheme without
    outliers (default: the data-free `quantize_weight`; GPTQ passes its own)."""
    if quantize is None:
        from . import quantize_weight as quantize

    k = scheme.outliers_per_row
    in_features = weight.shape[-1]
    if in_features > MAX_COLUMNS:
        raise ValueError(f"outliers_per_row needs in_features <= {MAX_COLUMNS} (int16 columns), got {in_features}")
    if k > in_features:
        raise ValueError(f"outliers_per_row={k} exceeds in_features={in_features}")
    w = weight.detach().float()
    score = w.abs() if importance is None else w.abs() * importance.float().clamp_min(0).sqrt()
    cols = score.topk(k, dim=-1).indices.sort(-1).values
    inner = dataclasses.replace(scheme, outliers_per_row=0)
    packed = quantize(w.scatter(-1, cols, 0.0), inner)
    decoded = dequantize(inner, packed, in_features)
    values = (w.gather(-1, cols) - decoded.gather(-1, cols)).to(torch.float16)
    return {**packed, "outlier_cols": cols.to(torch.int16).contiguous(), "outlier_values": values.contiguous()}
