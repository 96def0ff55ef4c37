"""K-quants ("kquant"): weights whose codes ARE llama.cpp's Q4_K / Q5_K / Q6_K blocks (ggml-common.h), so they export
to GGUF bit for bit. The layout is fixed by `bits`:

    bits  GGUF   super-block of 256 weights of one row                           decoding (float32)
    4     Q4_K   8 sub-blocks of 32; fp16 d, dmin; 6-bit scale and min codes    w = (d * sc) * q - (dmin * m), q 0..15
    5     Q5_K   the same with 5-bit codes                                        w = (d * sc) * q - (dmin * m), q 0..31
    6     Q6_K   16 sub-blocks of 16; fp16 d; int8 scale codes                   w = (d * sc) * (q - 32),       q 0..63

Stored tensors of a weight of logical shape [*lead, out, in] (S = in / 256 super-blocks per row):

    qweight  uint8    [*lead, out, packed_length(in, bits)]  codes, `packing.pack_bits` layout (not GGUF's)
    scales   uint8    [*lead, out, S, 8]   6-bit sub-block scale codes (bits 4, 5)   | int8 [*lead, out, S, 16] (6)
    mins     uint8    [*lead, out, S, 8]   6-bit sub-block min codes (bits 4, 5 only)
    d        float16  [*lead, out, S]      super-block scale of the scale codes (>= 0)
    dmin     float16  [*lead, out, S]      super-block scale of the min codes (>= 0; bits 4, 5 only)

Decoding computes in float32 in gguf-py's / llama.cpp's order, so the GGUF blocks (GGUFTarget.k_quant) decode to
the same float32 numbers. `group_size` must be 256 (the super-block; HfQuantConfig sets it when format="kquant" is
given without one) and `symmetric` False (Q6_K's codes are symmetric by construction). Rows must be a multiple of
256 weights: other weights are refused (llama.cpp falls back to another type for them; give those modules another
format with `overrides`, or keep them in float).

Data-free coding (`quantize`; method "mse" and "rtn" alike): per sub-block, a search over the code range like
llama.cpp's make_qkx2_quants (Q4_K/Q5_K: scale and min fitted by least squares for each candidate rounding) and
make_qx_quants (Q6_K), minimising the plain squared error; then the sub-block scales (and mins) are coded with the
super-block's d (and dmin) and the weight codes RE-ROUNDED with the decoded scales; then a few refinement passes,
each keeping a change only where it lowers the super-block's error: per sub-block the neighbouring scale/min codes
and the least-squares ones for the current codes, per super-block the least-squares d (and dmin) for the current
codes. GPTQ (`gptq`): these parameters are fixed first (static groups), then GPTQ rounds each column to the nearest
code of its sub-block (`gptq_columns`).
"""

from __future__ import annotations

import torch

from ..solvers.gptq import gptq_columns
from .format import Format, register_format
from .packing import all_finite, pack_bits, packed_length, unpack_bits
from .scalar import ExportRefused, ExportedWeight

SUPER = 256
_REFINE_PASSES = 2  # measured on N(0, 1) rows: pass 1 -3.4% error, pass 2 -0.5%, pass 3 -0.15%
_CHUNK_WEIGHTS = 1 << 16  # weights of a chunk of rows coded at once (the search holds ~20 candidates of each)


class _Layout:
    """The block geometry of one width."""

    def __init__(self, bits: int):
        self.bits = bits
        self.affine = bits in (4, 5)  # Q4_K / Q5_K: scale and min codes; Q6_K: signed scale codes only
        self.sub = 32 if self.affine else 16  # weights per sub-block
        self.n_sub = SUPER // self.sub
        self.nmax = (1 << bits) - 1  # largest code
        self.code_max = 63 if self.affine else 127  # largest scale code (Q6_K: int8, also -128)
        self.code_min = 0 if self.affine else -128


LAYOUTS = {b: _Layout(b) for b in (4, 5, 6)}


class KQuantFormat(Format):
    """llama.cpp's K-quant super-blocks (module doc)."""

    name = "kquant"
    bits = (4, 5, 6)
    group_sizes = (SUPER,)
    k_quant = True  # trait: codes are K-quant super-blocks (exporters with a `k_quant` method hold them)

    def validate(self, scheme):
        if isinstance(scheme.bits, bool) or scheme.bits not in self.bits:
            raise ValueError(f"bits={scheme.bits!r} does not fit format='kquant': its codes are GGUF's Q4_K, Q5_K or "
                             "Q6_K blocks; set bits to 4, 5 or 6 (Q2_K/Q3_K are not produced)")
        if scheme.symmetric:
            raise ValueError("symmetric=True does not apply to format='kquant': its codes are llama.cpp's K-quant "
                             "blocks, fixed by `bits` (Q4_K/Q5_K with sub-block mins, Q6_K symmetric already); "
                             "leave symmetric=False")
        super().validate(scheme)
        if scheme.group_size != SUPER:
            raise ValueError(f"group_size={scheme.group_size} does not fit format='kquant': K-quants code super-blocks "
                             f"of {SUPER} weights (sub-blocks of {LAYOUTS[scheme.bits].sub} inside), fixed by `bits`; "
                             f"set group_size={SUPER} (or leave it unset)")

    def label(self, scheme):
        return f"q{scheme.bits}_k"

    def has_zero(self, scheme):
        return LAYOUTS[scheme.bits].affine

    # --- layout -------------------------------------------------------------------------------------

    def specs(self, scheme, shape):
        *lead, out, in_features = shape
        lay, s = LAYOUTS[scheme.bits], -(-in_features // SUPER)
        specs = {"qweight": ((*lead, out, packed_length(in_features, scheme.bits)), torch.uint8),
                 "scales": ((*lead, out, s, lay.n_sub), torch.uint8 if lay.affine else torch.int8)}
        if lay.affine:
            specs["mins"] = ((*lead, out, s, lay.n_sub), torch.uint8)
        specs["d"] = ((*lead, out, s), torch.float16)
        if lay.affine:
            specs["dmin"] = ((*lead, out, s), torch.float16)
        return specs

    def dequantize(self, scheme, tensors, in_features):
        codes = unpack_bits(tensors["qweight"], scheme.bits, in_features)
        return decode(scheme.bits, codes, tensors["d"], tensors["scales"], tensors.get("dmin"), tensors.get("mins"))

    def value_checks(self, scheme, tensors, shape):
        checks = []
        for name in ("d", "dmin"):
            if name in tensors:
                v = tensors[name].float()
                checks.append((name, v, torch.isfinite(v) & (v >= 0), "finite float16 values >= 0"))
        if LAYOUTS[scheme.bits].affine:
            for name in ("scales", "mins"):
                checks.append((name, tensors[name], tensors[name] < 64, "6-bit codes (< 64)"))
        return checks

    # --- coding -------------------------------------------------------------------------------------

    @torch.no_grad()
    def quantize(self, weight, scheme):
        *lead, out, in_features = weight.shape
        check_width(in_features)
        w = weight.detach().reshape(-1, in_features).float()
        if not all_finite(w):
            raise ValueError("weight contains NaN or Inf; refusing to quantize it")
        parts = [fit(scheme.bits, w[r0 : r0 + step]) for r0, step in _chunks(w.shape[0], in_features)]
        return _pack(scheme.bits, {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, (*lead, out))

    @torch.no_grad()
    def gptq(self, weight, hessian, scheme, settings):
        """The data-free fit's super-block and sub-block parameters (always static groups: fixed before any column
        is rounded), then each column rounded to its sub-block's nearest code with GPTQ's error feedback."""
        lay = LAYOUTS[scheme.bits]
        out, in_features = weight.shape
        check_width(in_features)
        fitted = {}

        def static_params(W):
            fitted.update(fit(scheme.bits, W.float()))
            step, offset = sub_block_params(scheme.bits, fitted)
            return step.reshape(out, -1), None if offset is None else offset.reshape(out, -1)

        def round_column(w, s, m):
            if lay.affine:  # w ~ s * q - m
                q = torch.where(s > 0, torch.round((w + m) / s), torch.zeros_like(w)).clamp_(0, lay.nmax)
                return q.to(torch.uint8), q * s - m
            c = torch.where(s != 0, torch.round(w / s), torch.zeros_like(w)).clamp_(-32, 31)
            return (c + 32).to(torch.uint8), c * s

        codes, _, _ = gptq_columns(weight, hessian, lay.sub, round_column, static_params=static_params,
                                   has_zero=lay.affine, damp=settings.damp, act_order=settings.act_order,
                                   block_size=settings.block_size)
        fitted["codes"] = codes
        return _pack(scheme.bits, fitted, (out,))

    def gptq_stacked(self, weights, hessian, scheme, settings):
        # Rows are independent under one Hessian: one stacked pass gives each weight its own codes.
        if len(weights) == 1:
            return [self.gptq(weights[0], hessian, scheme, settings)]
        tensors = self.gptq(torch.cat(weights), hessian, scheme, settings)
        out, row = [], 0
        for w in weights:
            out.append({k: t[row : row + w.shape[0]] for k, t in tensors.items()})
            row += w.shape[0]
        return out

    # --- export -------------------------------------------------------------------------------------

    def export_tensors(self, target, scheme, tensors, shape, requantize=False):
        # The codes and the super-/sub-block parameters as they are: exact wherever the target has K-quant blocks.
        pack = getattr(target, "k_quant", None)
        if pack is None:
            raise ExportRefused(f"{target.name} has no K-quant super-blocks ({scheme.label}: 6/8-bit sub-block scales "
                                "under float16 super-block scales)",
                                "export to gguf, or quantize these modules with format='int' for this target; "
                                "requantize=True cannot change the block layout")
        codes = unpack_bits(tensors["qweight"], scheme.bits, shape[-1])
        out, description = pack(scheme.bits, codes, tensors["d"], tensors["scales"], tensors.get("dmin"),
                                tensors.get("mins"), tuple(shape))
        return ExportedWeight(out, description, None)


def check_width(in_features: int) -> None:
    if in_features % SUPER:
        raise ValueError(f"in_features={in_features} is not a multiple of {SUPER}: format='kquant' codes rows in "
                         f"super-blocks of {SUPER} weights (llama.cpp itself stores such tensors as another type). "
                         "Fix: give this module another format, e.g. overrides={regex: {'format': 'int', "
                         "'group_size': 32}}, or keep it in float (modules_to_not_convert)")


def _chunks(rows: int, in_features: int):
    step = max(1, _CHUNK_WEIGHTS // in_features)
    return [(r0, step) for r0 in range(0, rows, step)]


# --- decoding ---------------------------------------------------------------------------------------------


def decode(bits: int, codes, d, scales, dmin=None, mins=None) -> torch.Tensor:
    """Codes [*lead, out, in] (uint8, unsigned) and the block parameters -> float32 weights [*lead, out, in],
    computed as gguf-py's dequantize does: (d * sc) * q - (dmin * m), or (d * sc) * (q - 32) for Q6_K."""
    lay = LAYOUTS[bits]
    *lead, in_features = codes.shape
    s = d.shape[-1]
    q = torch.nn.functional.pad(codes, (0, s * SUPER - in_features)).view(*lead, s, lay.n_sub, lay.sub).float()
    step = (d.float().unsqueeze(-1) * scales.float()).unsqueeze(-1)
    if lay.affine:
        w = step * q - (dmin.float().unsqueeze(-1) * mins.float()).unsqueeze(-1)
    else:
        w = step * (q - 32)
    return w.reshape(*lead, s * SUPER)[..., :in_features]


def sub_block_params(bits: int, p: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(step d * sc, offset dmin * m or None) per sub-block [rows, S, n_sub], float32 as decoding computes them."""
    step = p["d"].float().unsqueeze(-1) * p["scales"].float()
    if not LAYOUTS[bits].affine:
        return step, None
    return step, p["dmin"].float().unsqueeze(-1) * p["mins"].float()


def _pack(bits: int, p: dict, lead: tuple) -> dict[str, torch.Tensor]:
    lay = LAYOUTS[bits]
    if not all(bool(torch.isfinite(p[k]).all()) for k in ("d", "dmin") if k in p):
        raise ValueError("weight too large for K-quant blocks: a super-block scale d (or dmin) overflows float16 "
                         "(|w| beyond ~1e6); keep this module in float (modules_to_not_convert)")
    out = {"qweight": pack_bits(p["codes"], bits).reshape(*lead, -1).contiguous(),
           "scales": p["scales"].to(torch.uint8 if lay.affine else torch.int8).reshape(*lead, -1, lay.n_sub)}
    if lay.affine:
        out["mins"] = p["mins"].to(torch.uint8).reshape(*lead, -1, lay.n_sub)
    out["d"] = p["d"].reshape(*lead, -1)
    if lay.affine:
        out["dmin"] = p["dmin"].reshape(*lead, -1)
    return {k: v.contiguous() for k, v in out.items()}


# --- the data-free fit ------------------------------------------------------------------------------------


def fit(bits: int, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows w [rows, in] (float32, in a multiple of 256) -> codes uint8 [rows, in], d (and dmin) float16
    [rows, S], scale (and min) codes [rows, S, n_sub] as int16 (module doc)."""
    lay = LAYOUTS[bits]
    rows, in_features = w.shape
    x = w.reshape(rows, -1, lay.n_sub, lay.sub)
    if lay.affine:
        s, mn = _sub_block_affine(x, lay)
    else:
        s, mn = _sub_block_symmetric(x, lay), None
    p = _code_scales(s, mn, lay)
    err = _sub_error(x, p, lay)
    for _ in range(_REFINE_PASSES):
        p, err = _refine_sub_blocks(x, p, err, lay)
        p, err = _refine_super_blocks(x, p, err, lay)
    p["codes"] = _codes(x, p, lay).reshape(rows, in_features)
    return p


def _sub_block_affine(x, lay):
    """Per sub-block (scale >= 0, min >= 0) with w ~ scale * q - min, q in [0, nmax]: make_qkx2_quants' search
    (candidate roundings of the [min(w, 0), max(w)] range, each refitted by least squares) on the plain error."""
    lo = x.amin(-1, keepdim=True).clamp_max(0)
    hi = x.amax(-1, keepdim=True)
    span = (hi - lo).clamp_min(1e-30)
    n = x.shape[-1]
    best_s, best_m = span / lay.nmax, -lo
    best_err = _affine_error(x, best_s, best_m, lay)
    sum_x = x.sum(-1, keepdim=True)
    for k in range(-10, 11):  # rmin -1, rdelta 0.1, 20 steps (llama.cpp's Q4_K setting)
        iscale = (lay.nmax + 0.1 * k) / span
        q = torch.round((x - lo) * iscale).clamp_(0, lay.nmax)
        sl, sl2, sxl = q.sum(-1, keepdim=True), (q * q).sum(-1, keepdim=True), (q * x).sum(-1, keepdim=True)
        det = n * sl2 - sl * sl
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        scale = (n * sxl - sum_x * sl) / safe
        low = (sl2 * sum_x - sl * sxl) / safe  # w ~ scale * q + low
        pos = low > 0  # the offset must be a non-negative min: refit the scale alone
        scale = torch.where(pos, sxl / sl2.clamp_min(1e-30), scale)
        low = torch.where(pos, torch.zeros_like(low), low)
        scale, m = scale.clamp_min(0), -low
        err = _affine_error(x, scale, m, lay)
        better = ok & (err < best_err)
        best_s, best_m = torch.where(better, scale, best_s), torch.where(better, m, best_m)
        best_err = torch.where(better, err, best_err)
    return best_s.squeeze(-1), best_m.squeeze(-1)


def _affine_error(x, s, m, lay):
    q = torch.where(s > 0, torch.round((x + m) / s.clamp_min(1e-30)), torch.zeros_like(x)).clamp_(0, lay.nmax)
    return (q * s - m - x).pow_(2).sum(-1, keepdim=True)


def _sub_block_symmetric(x, lay):
    """Per sub-block signed scale with w ~ scale * c, c in [-32, 31]: make_qx_quants' search (the largest |w|
    mapped near -32, least-squares scale for each candidate) on the plain error."""
    idx = x.abs().argmax(-1, keepdim=True)
    top = x.gather(-1, idx)
    safe = torch.where(top != 0, top, torch.ones_like(top))
    best_s = torch.zeros_like(top)
    best_gain = torch.zeros_like(top)  # error = sum x^2 - (sum x c)^2 / sum c^2: maximise the gain
    for k in range(-12, 13):
        c = torch.round(x * (-(32 + 0.1 * k) / safe)).clamp_(-32, 31)
        sxc, sc2 = (x * c).sum(-1, keepdim=True), (c * c).sum(-1, keepdim=True)
        gain = sxc * sxc / sc2.clamp_min(1e-30)
        better = (sc2 > 0) & (gain > best_gain)
        best_s = torch.where(better, sxc / sc2.clamp_min(1e-30), best_s)
        best_gain = torch.where(better, gain, best_gain)
    return best_s.squeeze(-1)


def _code_scales(s, mn, lay):
    """Float sub-block scales (and mins) [rows, S, n_sub] -> fp16 d (dmin) and integer codes (llama.cpp's recipe)."""
    top = s.abs().amax(-1)
    d = (top / lay.code_max).to(torch.float16)
    p = {"d": d, "scales": _nearest_code(s, d, lay)}
    if mn is not None:
        dmin = (mn.amax(-1) / 63).to(torch.float16)
        p["dmin"], p["mins"] = dmin, _nearest_code(mn, dmin, lay)
    return p


def _nearest_code(v, d, lay):
    df = d.float().unsqueeze(-1)
    q = torch.where(df > 0, torch.round(v / torch.where(df > 0, df, torch.ones_like(df))), torch.zeros_like(v))
    return q.clamp_(lay.code_min, lay.code_max).to(torch.int16)


def _codes(x, p, lay):
    """The nearest weight codes [rows, S, n_sub, sub] (uint8) under the decoded parameters p."""
    step, offset = sub_block_params(lay.bits, p)
    step = step.unsqueeze(-1)
    nz = step != 0
    safe = torch.where(nz, step, torch.ones_like(step))
    if lay.affine:
        q = torch.where(nz, torch.round((x + offset.unsqueeze(-1)) / safe), torch.zeros_like(x)).clamp_(0, lay.nmax)
    else:
        q = torch.where(nz, torch.round(x / safe), torch.zeros_like(x)).clamp_(-32, 31) + 32
    return q.to(torch.uint8)


def _sub_error(x, p, lay):
    """Squared error per sub-block [rows, S, n_sub] of the nearest codes under p."""
    q = _codes(x, p, lay)
    deq = decode(lay.bits, q.flatten(1), p["d"], p["scales"], p.get("dmin"), p.get("mins"))
    return (deq.view_as(x) - x).pow_(2).sum(-1)


def _refine_sub_blocks(x, p, err, lay):
    """Per sub-block, try the neighbouring scale (and min) codes and the least-squares codes for the current weight
    codes; keep the best."""
    base = dict(p)
    cands = []
    deltas = [(a, b) for a in (-1, 0, 1) for b in ((-1, 0, 1) if lay.affine else (0,)) if (a, b) != (0, 0)]
    if not lay.affine:
        deltas += [(-2, 0), (2, 0)]
    for a, b in deltas:
        c = dict(base, scales=(base["scales"] + a).clamp(lay.code_min, lay.code_max))
        if lay.affine:
            c["mins"] = (base["mins"] + b).clamp(0, 63)
        cands.append(c)
    cands.append(_least_squares_codes(x, base, lay))
    if not lay.affine:
        cands.append(dict(base, scales=(-base["scales"]).clamp(lay.code_min, lay.code_max)))
    best = dict(base)
    for c in cands:
        e = _sub_error(x, c, lay)
        better = e < err
        best["scales"] = torch.where(better, c["scales"], best["scales"])
        if lay.affine:
            best["mins"] = torch.where(better, c["mins"], best["mins"])
        err = torch.where(better, e, err)
    return best, err


def _least_squares_codes(x, p, lay):
    """With the weight codes fixed, each sub-block's least-squares step (and offset), coded with the current d
    (and dmin)."""
    q = _codes(x, p, lay).float()
    if not lay.affine:
        c = q - 32
        step = (x * c).sum(-1) / (c * c).sum(-1).clamp_min(1e-30)
        return dict(p, scales=_nearest_code(step, p["d"], lay))
    n = x.shape[-1]
    sl, sl2, sxl, sx = q.sum(-1), (q * q).sum(-1), (q * x).sum(-1), x.sum(-1)
    det = n * sl2 - sl * sl
    safe = torch.where(det > 0, det, torch.ones_like(det))
    step = torch.where(det > 0, (n * sxl - sx * sl) / safe, torch.zeros_like(det)).clamp_min(0)
    offset = torch.where(det > 0, -(sl2 * sx - sl * sxl) / safe, torch.zeros_like(det)).clamp_min(0)
    return dict(p, scales=_nearest_code(step, p["d"], lay), mins=_nearest_code(offset, p["dmin"], lay))


def _refine_super_blocks(x, p, err, lay):
    """Per super-block, the least-squares d (and dmin) for the current codes, rounded to float16; kept where the
    super-block's error (with codes re-rounded) is lower."""
    q = _codes(x, p, lay).float()
    sc = p["scales"].float().unsqueeze(-1)
    if lay.affine:
        a = (sc * q).flatten(-2)  # w ~ d * a - dmin * b
        b = p["mins"].float().unsqueeze(-1).expand_as(q).flatten(-2)
        xf = x.flatten(-2)
        aa, bb, ab = (a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1)
        ax, bx = (a * xf).sum(-1), (b * xf).sum(-1)
        det = aa * bb - ab * ab
        ok = det > 1e-12 * (aa * bb).clamp_min(1e-30)
        safe = torch.where(ok, det, torch.ones_like(det))
        d = (ax * bb - bx * ab) / safe
        dmin = (ax * ab - bx * aa) / safe
        ok = ok & (d >= 0) & (dmin >= 0) & torch.isfinite(d) & torch.isfinite(dmin)
        cand = dict(p, d=torch.where(ok, d, p["d"].float()).clamp_max(65504).to(torch.float16),
                    dmin=torch.where(ok, dmin, p["dmin"].float()).clamp_max(65504).to(torch.float16))
    else:
        a = (sc * (q - 32)).flatten(-2)
        aa, ax = (a * a).sum(-1), (a * x.flatten(-2)).sum(-1)
        ok = (aa > 0) & (ax > 0)
        d = torch.where(ok, ax / aa.clamp_min(1e-30), p["d"].float())
        cand = dict(p, d=d.clamp_max(65504).to(torch.float16))
    e = _sub_error(x, cand, lay)
    better = (e.sum(-1) < err.sum(-1)).unsqueeze(-1)
    out = dict(p)
    for k in ("d", "dmin"):
        if k in p:
            out[k] = torch.where(better.squeeze(-1), cand[k], p[k])
    return out, torch.where(better, e, err)


KQUANT = register_format(KQuantFormat())

__all__ = ["KQUANT", "KQuantFormat", "LAYOUTS", "SUPER", "decode", "fit"]
