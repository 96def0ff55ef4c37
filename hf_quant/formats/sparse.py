"""Sparse outliers (SpQR style) stored beside the codes: W = decode(codes) + S, S with k entries per output row.

    outlier_cols    int16    [*lead, out, k]   column of each entry, ascending and distinct within a row
    outlier_values  float16  [*lead, out, k]   the entry (the weight minus its decoded code)

A fixed count per row (ELLPACK layout) keeps every stored shape a function of the scheme and the weight shape;
int16 columns limit in_features to 32767. Cost: 32 k / in bits per weight. The forward adds
sum_k x[:, cols[o, k]] * values[o, k] for every output o: a gather and a k-term sum, exact in the compute dtype
(for long prefills in slices of k, so the gathered block stays under GATHER_ELEMENTS).

Fitting: the k largest-magnitude weights of each output row are taken out before the low-bit codes are fitted (so
they no longer stretch their groups' ranges), and stored exactly as float16 residuals w - decode(code) at their
positions. With calibration, weights are ranked by |w| * sqrt(H_ii) instead (H the input Hessian), the
diagonal-Hessian sensitivity of SpQR.
"""

from __future__ import annotations

import torch

from .base import dequantize, quantize as quantize_data_free
from .format import AdditiveTerm, register_additive_term

MAX_COLUMNS = 32767
GATHER_ELEMENTS = 1 << 24  # largest gathered [M, out, k-slice] block of the forward (64 MiB in float32)


class SparseOutlierTerm(AdditiveTerm):
    field = "outliers_per_row"

    def specs(self, scheme, shape):
        *lead, out, _ = shape
        k = scheme.outliers_per_row
        return {"outlier_cols": ((*lead, out, k), torch.int16), "outlier_values": ((*lead, out, k), torch.float16)}

    def dense(self, scheme, tensors, in_features):
        cols, values = tensors["outlier_cols"].long(), tensors["outlier_values"].float()
        out = torch.zeros(*cols.shape[:-1], in_features, dtype=torch.float32, device=cols.device)
        return out.scatter_add_(-1, cols, values)

    def linear(self, x, tensors):
        cols, values = tensors["outlier_cols"], tensors["outlier_values"]
        m, k = x.shape[0], cols.shape[-1]
        # The gather holds M * out * k elements: in slices of k for long prefills (one slice when decoding).
        width = max(1, min(k, GATHER_ELEMENTS // max(1, m * cols[..., 0].numel())))
        y = None
        for k0 in range(0, k, width):
            c, v = cols[..., k0 : k0 + width], values[..., k0 : k0 + width]
            gathered = x[:, c.long().reshape(-1)].view(m, *c.shape)  # [M, out, width]
            part = (gathered * v.to(x.dtype)).sum(-1)
            y = part if y is None else y + part
        return y

    def value_checks(self, scheme, tensors, shape):
        cols, values = tensors["outlier_cols"].long(), tensors["outlier_values"]
        in_features = shape[-1]
        ascending = torch.ones_like(cols, dtype=torch.bool)
        ascending[..., 1:] = cols[..., 1:] > cols[..., :-1]
        return [("outlier_cols", cols, (cols >= 0) & (cols < in_features), f"column indices in [0, {in_features})"),
                ("outlier_cols", cols, ascending, "strictly ascending within each row (distinct columns)"),
                ("outlier_values", values, torch.isfinite(values), "finite")]

    @torch.no_grad()
    def fit(self, weight, scheme, quantize_rest, hessian, settings):
        importance = None if hessian is None else torch.diagonal(hessian).float().clamp_min(0)
        return quantize_weight_outliers(weight, scheme, importance, quantize_rest)


SPARSE_OUTLIERS = register_additive_term(SparseOutlierTerm())


@torch.no_grad()
def quantize_weight_outliers(weight: torch.Tensor, scheme, importance: torch.Tensor | None = None,
                             quantize=None) -> dict[str, torch.Tensor]:
    """Canonical tensors of `weight` [*lead, out, in]: the inner scheme's (codes, ... and any low-rank factors) plus
    `outlier_cols` / `outlier_values`. `quantize(weight, scheme)` quantizes the rest under the scheme without
    outliers (default: data-free); `importance` [in] ranks weights by |w| sqrt(importance)."""
    quantize = quantize or quantize_data_free
    k = scheme.outliers_per_row
    in_features = weight.shape[-1]
    if in_features > MAX_COLUMNS:
        raise ValueError(f"outliers_per_row needs in_features <= {MAX_COLUMNS} (int16 columns), got {in_features}")
    if k > in_features:
        raise ValueError(f"outliers_per_row={k} exceeds in_features={in_features}")
    w = weight.detach().float()
    score = w.abs() if importance is None else w.abs() * importance.float().clamp_min(0).sqrt()
    cols = score.topk(k, dim=-1).indices.sort(-1).values
    inner = SPARSE_OUTLIERS.inner(scheme)
    packed = quantize(w.scatter(-1, cols, 0.0), inner)
    decoded = dequantize(inner, packed, in_features)
    values = (w.gather(-1, cols) - decoded.gather(-1, cols)).to(torch.float16)
    return {**packed, "outlier_cols": cols.to(torch.int16).contiguous(), "outlier_values": values.contiguous()}
