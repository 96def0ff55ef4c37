"""Data-free quantizers: round-to-nearest and an error-minimizing scale/zero search ("mse").

"mse" minimises the weight reconstruction error per group. Asymmetric integers of 4 or more bits (the default
format; without double_quant, whose 8-bit zero-point codes would no longer hold an all-zero group's zero-point
exactly) use a half-quadratic fit of the zero-point (HQQ, Badri & Shaji 2023): the scale stays the min/max one, the
zero-point starts at RTN's integer and becomes fractional, fitted by proximal steps on an l_p loss (p = 0.7) that
lets a group's few largest errors go so the bulk of its weights sit on the grid. Everything else (3 bits and
below, symmetric, codebooks, double_quant) uses two stages with integer zero-points:
1. a grid search over clipping ratios of the min/max range (as in GPTQ/AWQ's `mse` option), then
2. alternating least squares: with codes fixed, the scale and zero-point minimising the group's squared error
   have a closed form (a 1-D linear regression of w on q); with scale/zero fixed, nearest rounding is optimal.
Each step can only lower a group's error, and a group keeps whichever candidate had the lowest error, so the
result is never worse than the range the search starts from (plain min/max, the RTN range).

Why the split (SmolLM2-135M, Botchan perplexity, 1024 tokens; float 28.19; BENCHMARKS.md): at 4 bits the
half-quadratic zero gives 36.40 (g128) and 32.98 (g64) against RTN's 37.25 and 36.77 and the two-stage search's
39.24 and 36.76, with lower weight error than both; at 3 bits g128 it gives 115.6 against the two-stage search's
96.0, where a fractional zero shifts the many near-zero weights coherently (see `_search`).
"""

from __future__ import annotations

import torch

from ..formats import QuantParams, QuantScheme, codebook_values, pack, round_params

# Rows of the grouped weight processed at once: bounds scratch memory to ~ a few times this many floats.
_CHUNK_ELEMENTS = 1 << 18  # ~1 MiB of float32: the search's passes stay in cache
_GRID = torch.linspace(1.0, 0.5, 11).tolist()
_ALS_STEPS = 6
# Half-quadratic zero-point fit (asymmetric int, >= 4 bits): HQQ's published defaults.
HQ_MIN_BITS = 4
_HQ_P, _HQ_BETA, _HQ_KAPPA, _HQ_STEPS = 0.7, 10.0, 1.01, 20


def quantize_weight(weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """Quantize a float weight [*lead, out, in] into the canonical stored tensors of `scheme`."""
    return pack(scheme, quantize_params(weight, scheme))


@torch.no_grad()
def quantize_params(weight: torch.Tensor, scheme: QuantScheme) -> QuantParams:
    if weight.dim() < 2:
        raise ValueError(f"expected a weight of shape [*lead, out, in], got {tuple(weight.shape)}")
    *lead, out, in_features = weight.shape
    g, n_groups, in_padded = scheme.group_layout(in_features)
    w = weight.detach().reshape(-1, in_features)
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; refusing to quantize it")
    rows = w.shape[0]
    codes = torch.empty(rows, in_features, dtype=torch.uint8, device=w.device)
    scale = torch.empty(rows, n_groups, dtype=torch.float32, device=w.device)
    zero = torch.empty(rows, n_groups, dtype=torch.float32, device=w.device) if scheme.has_zero else None
    step = max(1, _CHUNK_ELEMENTS // in_padded)
    # A short last group is padded (by repeating its last column) only for the search: the padding must not
    # count in the error the search minimises, or the repeated column is weighted many times over.
    mask = None
    if in_padded != in_features:
        mask = (torch.arange(in_padded, device=w.device) < in_features).float().view(1, n_groups, g)
    # Scales are chosen chunk by chunk, but double quantization rounds them in blocks across chunks,
    # so rounding and final code assignment happen once all float scales are known.
    for r0 in range(0, rows, step):
        wg = _grouped(w[r0 : r0 + step].float(), g, in_padded)
        s, z = _search(wg, scheme, mask)
        scale[r0 : r0 + step] = s.squeeze(-1)
        if zero is not None:
            zero[r0 : r0 + step] = z.squeeze(-1)
    scale, zero = round_params(scheme, scale, zero)
    for r0 in range(0, rows, step):
        wg = _grouped(w[r0 : r0 + step].float(), g, in_padded)
        z = None if zero is None else zero[r0 : r0 + step, :, None]
        codes[r0 : r0 + step] = _assign(wg, scale[r0 : r0 + step, :, None], z, scheme).reshape(-1, in_padded)[:, :in_features]
    shape_p = (*lead, out)
    return QuantParams(
        codes.reshape(*shape_p, in_features),
        scale.reshape(*shape_p, n_groups),
        None if zero is None else zero.reshape(*shape_p, n_groups),
    )


def _grouped(w: torch.Tensor, g: int, in_padded: int) -> torch.Tensor:
    """[rows, in] -> [rows, n_groups, g]; padding repeats the last column so it leaves min/max unchanged."""
    pad = in_padded - w.shape[1]
    if pad:
        w = torch.cat((w, w[:, -1:].expand(-1, pad)), 1)
    return w.view(w.shape[0], -1, g)


def _sym_zero(scheme: QuantScheme) -> float:
    return float(1 << (scheme.bits - 1))


def _assign(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, scheme: QuantScheme) -> torch.Tensor:
    """Nearest representable code for every weight, given its group's scale (and zero)."""
    if scheme.format == "int":
        zz = _sym_zero(scheme) if z is None else z
        return torch.clamp(torch.round(wg / s + zz), 0, (1 << scheme.bits) - 1).to(torch.uint8)
    table = codebook_values(scheme.format, device=wg.device)
    ids = torch.arange(table.numel(), device=wg.device)
    if scheme.format == "fp8":  # 0x7F / 0xFF are NaN in E4M3 (decoded as 0 here): never emit them
        keep = (ids & 0x7F) != 0x7F
        table, ids = table[keep], ids[keep]
    values, order = torch.sort(table)
    mids = (values[1:] + values[:-1]) / 2
    return ids[order[torch.bucketize(wg / s, mids)]].to(torch.uint8)


def _decode(q: torch.Tensor, s, z, scheme: QuantScheme) -> torch.Tensor:
    if scheme.format == "int":
        zz = _sym_zero(scheme) if z is None else z
        return (q.float() - zz) * s
    return codebook_values(scheme.format, device=q.device)[q.long()] * s


def _error(wg, q, s, z, scheme, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    e = (_decode(q, s, z, scheme) - wg).abs_()
    if mask is not None:
        e.mul_(mask)
    return e.pow(2).sum(-1, keepdim=True), e.amax(-1, keepdim=True)


def _candidate_error(wg: torch.Tensor, s: torch.Tensor, z, scheme: QuantScheme, mask=None):
    """(sum of squared errors, largest absolute error) of each group when rounded with (s, z).
    `mask` (1 for real columns, 0 for the padding of a short last group) weights the columns."""
    if scheme.format != "int":
        return _error(wg, _assign(wg, s, z, scheme), s, z, scheme, mask)
    zz = _sym_zero(scheme) if z is None else z
    e = (wg / s).add_(zz).round_().clamp_(0, (1 << scheme.bits) - 1).sub_(zz).mul_(s).sub_(wg).abs_()
    if mask is not None:
        e.mul_(mask)
    return e.pow(2).sum(-1, keepdim=True), e.amax(-1, keepdim=True)


def _range_params(wg: torch.Tensor, ratio: float, scheme: QuantScheme, integer_zero: bool, stats=None):
    """Scale/zero covering `ratio` times the group's range (min/max for asymmetric, absmax otherwise)."""
    tiny = torch.finfo(torch.float16).tiny
    if stats is None:
        stats = _range_stats(wg, scheme)
    if scheme.format == "int":
        maxq = (1 << scheme.bits) - 1
        if scheme.symmetric:
            return (2 * stats * ratio / maxq).clamp_min(tiny), None
        lo, hi = stats[0] * ratio, stats[1] * ratio
        s = ((hi - lo) / maxq).clamp_min(tiny)
        z = -lo / s
        return s, (torch.round(z) if integer_zero else z)
    top = codebook_values(scheme.format).abs().max().item()
    return (stats * ratio / top).clamp_min(tiny), None


def _range_stats(wg: torch.Tensor, scheme: QuantScheme):
    if scheme.format == "int" and not scheme.symmetric:
        # The range always includes 0 (as in GPTQ), so the zero-point -lo/s stays within [0, 2**bits - 1]. Without
        # it a constant group gets scale ~0 and a zero-point of -w/tiny (-inf in float16 for |w| >= 4: inf/NaN
        # weights), and with double_quant one far-off zero-point wrecks the 8-bit codes of its whole block of 64.
        return wg.amin(-1, keepdim=True).clamp_max(0), wg.amax(-1, keepdim=True).clamp_min(0)
    return wg.abs().amax(-1, keepdim=True)


def _search(wg: torch.Tensor, scheme: QuantScheme, mask=None):
    if scheme.method == "rtn":
        return _range_params(wg, 1.0, scheme, integer_zero=True)
    if scheme.format == "int" and scheme.has_zero and scheme.bits >= HQ_MIN_BITS and not scheme.double_quant:
        return _half_quadratic_zero(wg, scheme, mask)
    stats = _range_stats(wg, scheme)
    best_s, best_z = _range_params(wg, 1.0, scheme, integer_zero=True, stats=stats)
    best_err, bound = _candidate_error(wg, best_s, best_z, scheme, mask)
    # Zero-points stay integers, so a weight of 0 is represented exactly: with a fractional zero-point the many
    # near-zero weights of a group all shift by the same fraction of a step, an error that adds up coherently in
    # the layer's output (3-bit SmolLM2: perplexity 599 with fractional zero-points vs 132 with integer ones).
    # No weight may end up further from its value than under the full (unclipped) range: minimising the squared
    # error alone clips each group's largest weights, and in LLMs those carry the most signal (3-bit SmolLM2:
    # perplexity 132 with plain min/max ranges, 632 with unconstrained MSE clipping).
    bound = bound * (1 + 1e-6)
    for ratio in _GRID[1:]:
        s, z = _range_params(wg, ratio, scheme, integer_zero=True, stats=stats)
        best_s, best_z, best_err = _keep_better(s, z, *_candidate_error(wg, s, z, scheme, mask), bound,
                                                best_s, best_z, best_err)
    for _ in range(_ALS_STEPS):
        q = _assign(wg, best_s, best_z, scheme)
        s, z = _least_squares(wg, q, best_s, best_z, scheme, mask)
        best_s, best_z, best_err = _keep_better(s, z, *_candidate_error(wg, s, z, scheme, mask), bound,
                                                best_s, best_z, best_err)
    return best_s, best_z


def _column_weights(wg: torch.Tensor, mask=None) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(weights broadcastable to wg, number of real columns per group): the mask of a short last group's padding,
    or all ones."""
    if mask is None:
        return torch.ones_like(wg[..., :1]), float(wg.shape[-1])
    return mask, mask.sum(-1, keepdim=True)


def _half_quadratic_zero(wg: torch.Tensor, scheme: QuantScheme, mask=None):
    """RTN's scale with a fractional zero-point fitted by HQQ's proximal iterations on an l_p (p < 1) loss:
    e = shrink_p(w - dequant(q)) keeps only the errors the l_p loss still pays for, then the zero-point is the
    mean offset that explains the rest, z = mean(q - (w - e) / s), for a fixed number of steps with a growing
    beta (HQQ stops early on the matrix's mean absolute error; per-group early stopping was measured worse: 36.66
    vs 36.40 at 4 bits g128)."""
    maxq = (1 << scheme.bits) - 1
    s, z = _range_params(wg, 1.0, scheme, integer_zero=True)
    s = s.to(torch.float16).float().clamp_min(torch.finfo(torch.float16).tiny)  # as stored
    m, n = _column_weights(wg, mask)
    beta = _HQ_BETA
    for _ in range(_HQ_STEPS):
        q = (wg / s).add_(z).round_().clamp_(0, maxq)
        e = wg - (q - z) * s
        shrunk = torch.sign(e) * torch.relu(e.abs() - e.abs().clamp_min(1e-30).pow(_HQ_P - 1) / beta)
        z = ((q - (wg - shrunk) / s) * m).sum(-1, keepdim=True) / n
        beta *= _HQ_KAPPA
    return s, z


def _keep_better(s, z, err, max_err, bound, best_s, best_z, best_err):
    better = (err < best_err) & (max_err <= bound)
    return (
        torch.where(better, s, best_s),
        None if z is None else torch.where(better, z, best_z),
        torch.where(better, err, best_err),
    )


def _least_squares(wg, q, s_old, z_old, scheme: QuantScheme, mask=None):
    """Closed-form scale (and zero) minimising the group's squared error (over the `mask`ed columns) for fixed codes."""
    tiny = torch.finfo(torch.float16).tiny
    m, n = _column_weights(wg, mask)
    if scheme.format == "int" and not scheme.symmetric:
        qf = q.float()
        qm, wm = (qf * m).sum(-1, keepdim=True) / n, (wg * m).sum(-1, keepdim=True) / n
        var = ((qf - qm).pow(2) * m).sum(-1, keepdim=True)
        cov = ((qf - qm) * (wg - wm) * m).sum(-1, keepdim=True)
        ok = (var > 0) & (cov > 0)
        s = torch.where(ok, cov / var.clamp_min(1e-12), s_old).clamp_min(tiny)
        # w = s * (q - z)  =>  z = mean(q) - mean(w) / s, rounded to an integer code (see `_search`), then the
        # scale refitted for that zero-point.
        z = torch.where(ok, (qm - wm / s).round().clamp(0, (1 << scheme.bits) - 1), z_old)
        c = qf - z
        num, den = (c * wg * m).sum(-1, keepdim=True), (c.pow(2) * m).sum(-1, keepdim=True)
        s = torch.where(ok & (den > 0) & (num > 0), num / den.clamp_min(1e-12), s).clamp_min(tiny)
        return s, z
    c = _decode(q, 1.0, None, scheme)  # unit-scale code values (symmetric int: q - 2**(b-1))
    num, den = (c * wg * m).sum(-1, keepdim=True), (c.pow(2) * m).sum(-1, keepdim=True)
    ok = (den > 0) & (num > 0)
    return torch.where(ok, num / den.clamp_min(1e-12), s_old).clamp_min(tiny), None
