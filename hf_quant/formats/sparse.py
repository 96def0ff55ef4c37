"""Sparse outliers (SpQR style) stored beside the codes: W = decode(codes) + S, S with k entries per output row.

    outlier_cols    int16    [*lead, out, k]   column of each entry, ascending and distinct within a row
    outlier_values  float16  [*lead, out, k]   the entry (the weight minus its decoded code)

A fixed count per row (ELLPACK layout) keeps every stored shape a function of the scheme and the weight shape;
int16 columns limit in_features to 32767. Cost: 32 k / in bits per weight. The forward adds
sum_k x[:, cols[o, k]] * values[o, k] for every output o: a gather and a k-term sum, exact in the compute dtype
(for long prefills in slices of k, so the gathered block stays under GATHER_ELEMENTS).
"""

from __future__ import annotations

import torch

from .base import AdditiveTerm, register_additive_term
from .scheme import QuantScheme

MAX_COLUMNS = 32767
GATHER_ELEMENTS = 1 << 24  # largest gathered [M, out, k-slice] block of the forward (64 MiB in float32)


class SparseOutlierTerm(AdditiveTerm):
    def active(self, scheme: QuantScheme) -> bool:
        return scheme.outliers_per_row > 0

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


SPARSE_OUTLIERS = register_additive_term(SparseOutlierTerm())
