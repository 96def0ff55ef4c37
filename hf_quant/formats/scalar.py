"""Scalar formats: one code per weight on a grid, times a per-group scale. "int" (affine integer, 2-8 bits) and the
codebooks "nf4", "fp4" (E2M1) and "fp8" (E4M3).

Stored tensors of a weight of logical shape [*lead, out, in] (lead = experts for fused MoE tensors):

    qweight    uint8    [*lead, out, packed_length(in, bits)]  codes, `packing.pack_bits` layout
    scales     float16  [*lead, out, n_groups]     (uint8 codes when double_quant)
    scales_dq  float16  [ceil(numel(scales) / 64), 2]  (step, offset) per 64 scales; double_quant only
    zeros      float16  [*lead, out, n_groups]     int asymmetric only (uint8 codes when double_quant)
    zeros_dq   float16  [ceil(numel(zeros) / 64), 2]   double_quant only

Decoding: affine int  w = (q - zero) * scale   (symmetric: zero = 2**(bits-1), not stored)
          codebook    w = CODEBOOK[q] * scale  (NF4, FP4 E2M1 tables; FP8 E4M3 bit patterns)
When `in` is not a multiple of the group size, the last group of each row is shorter (its scale covers only
the remaining columns); nothing extra is stored for the padding, which exists only while decoding.
This layout is independent of any kernel's in-memory layout; kernels repack it at load time.

Data-free coding ("mse", the default; "rtn" is round to nearest on the min/max range) minimises the weight
reconstruction error per group. Asymmetric integers of 4 or more bits (without double_quant, whose 8-bit
zero-point codes would no longer hold an all-zero group's zero-point exactly) use a half-quadratic fit of the
zero-point (HQQ, Badri & Shaji 2023): the scale stays the min/max one, the zero-point starts at RTN's integer and
becomes fractional, fitted by proximal steps on an l_p loss (p = 0.7) that lets a group's few largest errors go so
the bulk of its weights sit on the grid. Everything else (3 bits and below, symmetric, codebooks, double_quant)
uses two stages with integer zero-points:
1. a grid search over clipping ratios of the min/max range (as in GPTQ/AWQ's `mse` option), then
2. alternating least squares: with codes fixed, the scale and zero-point minimising the group's squared error
   have a closed form (a 1-D linear regression of w on q); with scale/zero fixed, nearest rounding is optimal.
Each step can only lower a group's error, and a group keeps whichever candidate had the lowest error, so the
result is never worse than the range the search starts from (plain min/max, the RTN range).

Why the split (SmolLM2-135M, Botchan perplexity, 1024 tokens; float 28.19; BENCHMARKS.md): at 4 bits the
half-quadratic zero gives 36.40 (g128) and 32.98 (g64) against RTN's 37.25 and 36.77 and the two-stage search's
39.24 and 36.76, with lower weight error than both; at 3 bits g128 it gives 115.6 against the two-stage search's
96.0, where a fractional zero shifts the many near-zero weights coherently (see `_search`).

GPTQ (`gptq`): group parameters come from this data-free search, then each column is rounded to the format's
nearest code (`ColumnRounder`) with the error feedback of `solvers.gptq`. The stored tensors are the same.

Export (`export_tensors`, driven by hf_quant.export): each format says what its codes are to a target object
(compressed-tensors, GPTQ), which packs them in its own layout. The affine integers hand over codes, scales and
integer zero-points; FP8 hands over E4M3 codes and scales; the other codebooks have no exact counterpart and are
refused. Whatever the target cannot hold exactly (fractional zero-points, double-quantized scales that are not
exact in the target's scale dtype, a zero-point outside its range) is refused with `ExportRefused`, or with
`requantize=True` re-fitted to codes it holds (per group, the better of the nearest codes under the target's rounding
of the scale and zero-point and the format's own search with integer zero-points on the decoded weight), the added
weight error reported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..solvers.gptq import gptq_columns, refit_group_params
from .format import Format, GPTQSettings, get_format, register_format
from .packing import all_finite, pack_bits, packed_length, unpack_bits
from .scheme import QuantScheme

DQ_BLOCK = 64
FP16_TINY = torch.finfo(torch.float16).tiny

# NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA, Dettmers et al. 2023).
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# FP4 E2M1 values (sign, 2 exponent bits, 1 mantissa bit), scaled to max 1.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_CODEBOOK = tuple(v / 6.0 for v in _E2M1) + tuple(-v / 6.0 for v in _E2M1)
FP8_MAX = 448.0

# Rows of the grouped weight processed at once: bounds scratch memory to ~ a few times this many floats.
_CHUNK_ELEMENTS = 1 << 18  # ~1 MiB of float32: the search's passes stay in cache
_GRID = torch.linspace(1.0, 0.5, 11).tolist()
_ALS_STEPS = 6
# Half-quadratic zero-point fit (asymmetric int, >= 4 bits): HQQ's published defaults.
HQ_MIN_BITS = 4
_HQ_P, _HQ_BETA, _HQ_KAPPA, _HQ_STEPS = 0.7, 10.0, 1.01, 20


@dataclass
class QuantParams:
    """Unpacked quantization: integer codes and float32 per-group scale (and zero-point)."""

    codes: torch.Tensor  # uint8 [*lead, out, in]
    scale: torch.Tensor  # float32 [*lead, out, n_groups]
    zero: torch.Tensor | None  # float32 [*lead, out, n_groups], int asymmetric only


class ExportRefused(ValueError):
    """A weight that an export target cannot represent exactly: `reason` says why, `fix` what to do about it.
    Formats raise it without a module name; the exporter (hf_quant.export) fills in `module`."""

    def __init__(self, reason: str, fix: str, module: str | None = None):
        self.reason, self.fix, self.module = reason, fix, module
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.module + ': ' if self.module else ''}{self.reason}. Fix: {self.fix}"

    def for_module(self, module: str) -> "ExportRefused":
        return ExportRefused(self.reason, self.fix, module)


@dataclass
class ExportedWeight:
    """One weight in an export target's layout (`Format.export_tensors`)."""

    tensors: dict[str, torch.Tensor]  # the target's tensors of this weight, named as the target names them
    scheme: dict  # the target's description of how it is stored (JSON values); equal for weights stored alike
    added_error: float | None = None  # requantize: relative Frobenius error ||W' - W|| / ||W|| added; None: exact
    decoded: torch.Tensor | None = None  # requantize: W', the weight the target decodes to (logical shape); None: exact


_REQUANTIZE_FIX = ("export with requantize=True to re-fit the weight to codes the target holds (the added weight "
                   "error is reported per module)")


class ScalarFormat(Format):
    """Per-weight codes on a scalar grid with per-group scales (module doc). Subclasses define the grid."""

    double_quant = True

    # --- the grid (subclasses) ----------------------------------------------------------------------

    def assign(self, wg: torch.Tensor, s: torch.Tensor, z, scheme: QuantScheme) -> torch.Tensor:
        """Nearest representable code (uint8) for every weight, given its group's scale (and zero)."""
        raise NotImplementedError

    def decode(self, q: torch.Tensor, s, z, scheme: QuantScheme) -> torch.Tensor:
        raise NotImplementedError

    def implied_zero(self, scheme: QuantScheme, scale: torch.Tensor) -> torch.Tensor | None:
        """The zero-point decoding uses when none is stored (symmetric int), else None."""
        return None

    def table(self, device=None) -> torch.Tensor | None:
        """The float32 value of every code (codebooks), or None (integer grids)."""
        return None

    # --- layout -------------------------------------------------------------------------------------

    def specs(self, scheme, shape):
        *lead, out, in_features = shape
        _, n_groups, _ = scheme.group_layout(in_features)
        specs = {"qweight": ((*lead, out, packed_length(in_features, scheme.bits)), torch.uint8)}
        param_shape = (*lead, out, n_groups)
        for name in ["scales"] + (["zeros"] if self.has_zero(scheme) else []):
            if scheme.double_quant:
                numel = 1
                for d in param_shape:
                    numel *= d
                specs[name] = (param_shape, torch.uint8)
                specs[f"{name}_dq"] = ((-(-numel // DQ_BLOCK), 2), torch.float16)
            else:
                specs[name] = (param_shape, torch.float16)
        return specs

    def dequantize(self, scheme, tensors, in_features):
        codes = unpack_bits(tensors["qweight"], scheme.bits, in_features)
        scale, zero = decode_params(scheme, tensors)
        return dequantize_codes(scheme, codes, scale, zero, in_features, torch.float32)

    def sliceable(self, scheme, shape):
        # double-quant blocks (one (step, offset) pair per 64 consecutive scales, counted across experts) may
        # straddle two experts
        *_, out, in_features = shape
        return not scheme.double_quant or (out * scheme.group_layout(in_features)[1]) % DQ_BLOCK == 0

    def expert_tensors(self, scheme, tensors, index, shape):
        rows = shape[-2] * scheme.group_layout(shape[-1])[1] // DQ_BLOCK  # second-level blocks per expert
        return {name: t[index * rows : (index + 1) * rows] if name.endswith("_dq") else t[index]
                for name, t in tensors.items()}

    def dequantize_expert(self, scheme, tensors, index, in_features):
        # Decode every expert's (small) scales, then this expert's codes: the same values, exactly.
        scale, zero = decode_params(scheme, tensors)
        codes = unpack_bits(tensors["qweight"][index], scheme.bits, in_features)
        zero = None if zero is None else zero[index]
        return dequantize_codes(scheme, codes, scale[index], zero, in_features, torch.float32)

    def value_checks(self, scheme, tensors, shape):
        checks = []
        for meta_name in ("scales_dq", "zeros_dq"):
            meta = tensors.get(meta_name)
            if meta is not None:
                checks.append((meta_name, meta, torch.isfinite(meta), "finite"))
                checks.append((meta_name, meta[..., 0], meta[..., 0] > 0, "a positive step (column 0)"))
        scale, zero = decode_params(scheme, tensors)
        checks.append(("scales", scale, torch.isfinite(scale) & (scale > 0), "finite and > 0"))
        if not scheme.double_quant:  # stored float16 scales are clamped to float16's smallest normal when written
            stored = tensors["scales"].float()
            checks.append(("scales", stored, stored >= FP16_TINY, f"normal float16 values (>= {FP16_TINY:.3g})"))
        if self.has_zero(scheme):
            checks.append(("zeros", zero, torch.isfinite(zero), "finite"))
        return checks

    # --- data-free coding ---------------------------------------------------------------------------

    def quantize(self, weight, scheme):
        return pack(scheme, self.quantize_params(weight, scheme))

    @torch.no_grad()
    def quantize_params(self, weight: torch.Tensor, scheme: QuantScheme) -> QuantParams:
        if weight.dim() < 2:
            raise ValueError(f"expected a weight of shape [*lead, out, in], got {tuple(weight.shape)}")
        *lead, out, in_features = weight.shape
        g, n_groups, in_padded = scheme.group_layout(in_features)
        w = weight.detach().reshape(-1, in_features)
        if not all_finite(w):
            raise ValueError("weight contains NaN or Inf; refusing to quantize it")
        rows = w.shape[0]
        has_zero = self.has_zero(scheme)
        codes = torch.empty(rows, in_features, dtype=torch.uint8, device=w.device)
        scale = torch.empty(rows, n_groups, dtype=torch.float32, device=w.device)
        zero = torch.empty(rows, n_groups, dtype=torch.float32, device=w.device) if has_zero else None
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
            s, z = self.search(wg, scheme, mask)
            scale[r0 : r0 + step] = s.squeeze(-1)
            if zero is not None:
                zero[r0 : r0 + step] = z.squeeze(-1)
        scale, zero = round_params(scheme, scale, zero)
        for r0 in range(0, rows, step):
            wg = _grouped(w[r0 : r0 + step].float(), g, in_padded)
            z = None if zero is None else zero[r0 : r0 + step, :, None]
            codes[r0 : r0 + step] = self.assign(wg, scale[r0 : r0 + step, :, None], z, scheme).reshape(
                -1, in_padded)[:, :in_features]
        shape_p = (*lead, out)
        return QuantParams(
            codes.reshape(*shape_p, in_features),
            scale.reshape(*shape_p, n_groups),
            None if zero is None else zero.reshape(*shape_p, n_groups),
        )

    def candidate_error(self, wg, s, z, scheme, mask=None):
        """(sum of squared errors, largest absolute error) of each group when rounded with (s, z).
        `mask` (1 for real columns, 0 for the padding of a short last group) weights the columns."""
        e = (self.decode(self.assign(wg, s, z, scheme), s, z, scheme) - wg).abs_()
        if mask is not None:
            e.mul_(mask)
        return e.pow(2).sum(-1, keepdim=True), e.amax(-1, keepdim=True)

    def range_stats(self, wg, scheme):
        return wg.abs().amax(-1, keepdim=True)

    def range_params(self, wg, ratio, scheme, integer_zero, stats=None):
        """Scale/zero covering `ratio` times the group's range (min/max for asymmetric, absmax otherwise)."""
        raise NotImplementedError

    def half_quadratic(self, scheme) -> bool:
        """Whether the data-free search fits a fractional zero-point (module doc)."""
        return False

    def search(self, wg: torch.Tensor, scheme: QuantScheme, mask=None, integer_zero: bool = False):
        """Per-group (scale, zero) [rows, G, 1] of the grouped weight wg [rows, G, g] (module doc). `integer_zero`
        skips the half-quadratic (fractional) zero-point fit: the two-stage search with integer zero-points."""
        if scheme.method == "rtn":
            return self.range_params(wg, 1.0, scheme, integer_zero=True)
        if self.half_quadratic(scheme) and not integer_zero:
            return self._half_quadratic_zero(wg, scheme, mask)
        stats = self.range_stats(wg, scheme)
        best_s, best_z = self.range_params(wg, 1.0, scheme, integer_zero=True, stats=stats)
        best_err, bound = self.candidate_error(wg, best_s, best_z, scheme, mask)
        # Zero-points stay integers, so a weight of 0 is represented exactly: with a fractional zero-point the many
        # near-zero weights of a group all shift by the same fraction of a step, an error that adds up coherently
        # in the layer's output (3-bit SmolLM2: perplexity 599 with fractional zero-points vs 132 with integer
        # ones). No weight may end up further from its value than under the full (unclipped) range: minimising the
        # squared error alone clips each group's largest weights, and in LLMs those carry the most signal (3-bit
        # SmolLM2: perplexity 132 with plain min/max ranges, 632 with unconstrained MSE clipping).
        bound = bound * (1 + 1e-6)
        for ratio in _GRID[1:]:
            s, z = self.range_params(wg, ratio, scheme, integer_zero=True, stats=stats)
            best_s, best_z, best_err = _keep_better(s, z, *self.candidate_error(wg, s, z, scheme, mask), bound,
                                                    best_s, best_z, best_err)
        for _ in range(_ALS_STEPS):
            q = self.assign(wg, best_s, best_z, scheme)
            s, z = self.least_squares(wg, q, best_s, best_z, scheme, mask)
            best_s, best_z, best_err = _keep_better(s, z, *self.candidate_error(wg, s, z, scheme, mask), bound,
                                                    best_s, best_z, best_err)
        return best_s, best_z

    def _half_quadratic_zero(self, wg, scheme, mask=None):
        """RTN's scale with a fractional zero-point fitted by HQQ's proximal iterations on an l_p (p < 1) loss:
        e = shrink_p(w - dequant(q)) keeps only the errors the l_p loss still pays for, then the zero-point is the
        mean offset that explains the rest, z = mean(q - (w - e) / s), for a fixed number of steps with a growing
        beta (HQQ stops early on the matrix's mean absolute error; per-group early stopping was measured worse:
        36.66 vs 36.40 at 4 bits g128)."""
        maxq = (1 << scheme.bits) - 1
        s, z = self.range_params(wg, 1.0, scheme, integer_zero=True)
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

    def least_squares(self, wg, q, s_old, z_old, scheme, mask=None):
        """Closed-form scale minimising the group's squared error (over the `mask`ed columns) for fixed codes, with
        the zero-point (when stored) kept."""
        tiny = torch.finfo(torch.float16).tiny
        m, _ = _column_weights(wg, mask)
        c = self.decode(q, 1.0, None, scheme)  # unit-scale code values (symmetric int: q - 2**(b-1))
        num, den = (c * wg * m).sum(-1, keepdim=True), (c.pow(2) * m).sum(-1, keepdim=True)
        ok = (den > 0) & (num > 0)
        return torch.where(ok, num / den.clamp_min(1e-12), s_old).clamp_min(tiny), None

    # --- GPTQ ---------------------------------------------------------------------------------------

    def column_rounder(self, scheme: QuantScheme, device) -> "ColumnRounder":
        raise NotImplementedError

    @torch.no_grad()
    def gptq_params(self, weight, hessian, scheme, settings: GPTQSettings) -> QuantParams:
        """Codes, scales and zero-points (scales/zeros already rounded as stored) of `weight` [out, in] by GPTQ."""
        if settings.act_order and not settings.static_groups:
            raise ValueError("act_order=True needs static_groups=True: the stored formats have no per-column group "
                             "index")
        # Group scales/zero-points come from the `mse` data-free search before GPTQ rounds against them.
        search_scheme = dataclasses.replace(scheme, method="mse")
        static = settings.static_groups or scheme.group_size == -1 or scheme.double_quant

        def static_params(W):
            params = self.quantize_params(W, search_scheme)
            return params.scale, params.zero

        def dynamic_params(x):
            rows = x.shape[0]
            s, z = self.search(x, search_scheme)
            return round_params(scheme, s.view(rows), None if z is None else z.view(rows))

        codes, scale, zero = gptq_columns(
            weight, hessian, scheme.group_layout(weight.shape[1])[0], self.column_rounder(scheme, weight.device),
            static_params=static_params if static else None, dynamic_params=dynamic_params,
            has_zero=self.has_zero(scheme), damp=settings.damp, act_order=settings.act_order,
            block_size=settings.block_size)
        if settings.refit_scales:
            scale, zero = self._refit_after_gptq(weight, hessian, scheme, settings.damp, codes, scale, zero)
        return QuantParams(codes, scale, zero)

    def _refit_after_gptq(self, weight, hessian, scheme, damp, codes, scale, zero):
        """GPTQ's group parameters refitted to its codes (refit_group_params): scale and zero-point where the
        scheme fits fractional zero-points (the half-quadratic search), else the scale alone with the zero-point
        kept (integer zero-points, exportable as they are); double-quantized scales are rounded in blocks across
        rows, so they are replaced for the whole weight or not at all."""
        in_features = weight.shape[1]
        fit_zero = zero is not None and self.half_quadratic(scheme)
        unit = dequantize_codes(scheme, codes, torch.ones_like(scale), torch.zeros_like(zero) if fit_zero else zero,
                                in_features)

        def stored(s, offset):
            if offset is None:
                return round_params(scheme, s, zero)[0], None
            s, z = round_params(scheme, s, offset / s)
            return s, s * z

        g = scheme.group_layout(in_features)[0]
        new_scale, offset, _, _ = refit_group_params(
            weight, hessian, unit, g, scale, scale * zero if fit_zero else None, damp=damp, round_params=stored,
            rowwise=not scheme.double_quant)
        if fit_zero:
            return round_params(scheme, new_scale, offset / new_scale)
        return new_scale, zero

    def gptq(self, weight, hessian, scheme, settings):
        return pack(scheme, self.gptq_params(weight, hessian, scheme, settings))

    def gptq_stacked(self, weights, hessian, scheme, settings):
        # Rows are independent under one Hessian, so stacking gives each weight's own codes in one pass; not with
        # double-quantized scales, whose second-level blocks of 64 are counted per weight.
        if len(weights) == 1 or scheme.double_quant:
            return super().gptq_stacked(weights, hessian, scheme, settings)
        params = self.gptq_params(torch.cat(weights), hessian, scheme, settings)
        out, row = [], 0
        for w in weights:
            sl = slice(row, row + w.shape[0])
            out.append(pack(scheme, QuantParams(params.codes[sl], params.scale[sl],
                                                None if params.zero is None else params.zero[sl])))
            row += w.shape[0]
        return out

    # --- export to other checkpoint formats (hf_quant.export) ----------------------------------------

    def export_tensors(self, target, scheme: QuantScheme, tensors: dict[str, torch.Tensor], shape: tuple[int, ...],
                       requantize: bool = False) -> ExportedWeight:
        """This weight (canonical `tensors` of logical `shape`) in `target`'s layout: the format says what its codes
        are, the target object (hf_quant.export) checks what it can hold and packs them. Exact, or `ExportRefused`
        (naming the reason and the fix); with `requantize`, what only rounding keeps out is re-fitted to codes the
        target holds (`_rerounded`) and the added error reported. Codebooks other than FP8 have no exact
        counterpart in any target (a different grid, not a rounding): refused even with `requantize`."""
        raise ExportRefused(
            f"{target.name} has no {self.label(scheme)} weights (codes indexing a table of {1 << scheme.bits} "
            "fixed values times a scale; no layout of the target decodes that table)",
            "quantize these modules with format='int' (affine integer codes, e.g. bits=4 with symmetric=True or "
            "method='rtn'), or keep them in float with modules_to_not_convert; requantize=True cannot help (it "
            "would be a different grid, not a rounding)")

    def _export_scales(self, target, scheme, scale: torch.Tensor):
        """(problems, the scales as the target stores them, decoded to float32)."""
        stored = scale.to(target.scale_dtype).float()
        bad = (stored != scale) | ~torch.isfinite(stored) | (stored <= 0)
        problems = []
        if bad.any():
            why = " (double_quant stores scales as 8-bit codes that decode to float32 values)" if scheme.double_quant \
                else ""
            problems.append((f"{int(bad.sum())} of {bad.numel()} scales are not exact in {target.scale_dtype} (e.g. "
                             f"{float(scale[bad][0]):.9g}){why}", target.scale_fix))
        stored = torch.where(torch.isfinite(stored) & (stored > 0), stored, scale.clamp_min(FP16_TINY))
        return problems, stored

    def _refit(self, target, scheme, wg, mask):
        """Requantize: other (scale, zero) [rows, G, 1] candidates for the grouped decoded weight `wg`, within what
        `target` holds (none here; integer formats refit)."""
        return []

    def _rerounded(self, target, scheme, codes, scale, zero, new_scale, new_zero, in_features):
        """Requantize: per group, the best of (a) the nearest codes under the target's rounding of our scale and
        zero-point and (b) the format's own refit (`_refit`) of the weight the stored codes decode to; returns
        (codes, scale, zero) as the target holds them, the relative weight error added and the weight they decode
        to."""
        w = dequantize_codes(scheme, codes, scale, zero, in_features)
        g, n_groups, in_padded = scheme.group_layout(in_features)
        lead = w.shape[:-1]
        rows = w.reshape(-1, in_features)
        n = rows.shape[0]
        wg = _grouped(rows, g, in_padded)
        mask = None
        if in_padded != in_features:
            mask = (torch.arange(in_padded, device=w.device) < in_features).float().view(1, n_groups, g)

        def shaped(t):
            return None if t is None else t.reshape(n, n_groups, 1)

        best_s, best_z = shaped(new_scale), shaped(new_zero)
        best_q = self.assign(wg, best_s, best_z, scheme)
        best_err = self._group_error(wg, best_q, best_s, best_z, scheme, mask)
        step = max(1, _CHUNK_ELEMENTS // in_padded)
        for r0 in range(0, n, step):
            sl = slice(r0, r0 + step)
            for s, z in self._refit(target, scheme, wg[sl], None if mask is None else mask):
                q = self.assign(wg[sl], s, z, scheme)
                err = self._group_error(wg[sl], q, s, z, scheme, mask)
                better = err < best_err[sl]
                best_q[sl] = torch.where(better, q, best_q[sl])
                best_s[sl] = torch.where(better, s, best_s[sl])
                if best_z is not None:
                    best_z[sl] = torch.where(better, z, best_z[sl])
                best_err[sl] = torch.where(better, err, best_err[sl])
        new_codes = best_q.reshape(n, in_padded)[:, :in_features].reshape(*lead, in_features)
        out_scale = best_s.reshape(new_scale.shape)
        out_zero = None if best_z is None else best_z.reshape(new_zero.shape)
        w2 = dequantize_codes(scheme, new_codes, out_scale, out_zero, in_features)
        norm, diff = float(w.norm()), float((w2 - w).norm())
        return new_codes, out_scale, out_zero, diff / norm if norm > 0 else diff, w2

    def _group_error(self, wg, q, s, z, scheme, mask):
        e = (self.decode(q, s, z, scheme) - wg).pow_(2)
        if mask is not None:
            e.mul_(mask)
        return e.sum(-1, keepdim=True)

    def _refuse_or_reround(self, target, scheme, problems, requantize, codes, scale, zero, new_scale, new_zero,
                           in_features):
        """(codes, scale, zero, added error or None, decoded weight or None) as the target holds them, or
        ExportRefused."""
        if not problems:
            return codes, new_scale, new_zero, None, None
        if not requantize:
            fixes = list(dict.fromkeys(fix for _, fix in problems))
            raise ExportRefused("; ".join(reason for reason, _ in problems), "; or ".join(fixes + [_REQUANTIZE_FIX]))
        return self._rerounded(target, scheme, codes, scale, zero, new_scale, new_zero, in_features)


class IntFormat(ScalarFormat):
    """Affine integer codes, 2-8 bits, asymmetric (stored zero-point) or symmetric (zero-point 2**(bits-1))."""

    name = "int"
    bits = (4, 2, 3, 5, 6, 8)
    symmetric = (False, True)
    affine_int = True

    def validate(self, scheme):
        if isinstance(scheme.bits, bool) or scheme.bits not in self.bits:
            raise ValueError(f"bits must be one of {sorted(self.bits)}, got {scheme.bits!r}")
        super().validate(scheme)

    def has_zero(self, scheme):
        return not scheme.symmetric

    def label(self, scheme):
        return f"int{scheme.bits}{'-sym' if scheme.symmetric else ''}"

    @staticmethod
    def _sym_zero(scheme) -> float:
        return float(1 << (scheme.bits - 1))

    def implied_zero(self, scheme, scale):
        return None if self.has_zero(scheme) else torch.full_like(scale, self._sym_zero(scheme))

    def assign(self, wg, s, z, scheme):
        zz = self._sym_zero(scheme) if z is None else z
        return torch.clamp(torch.round(wg / s + zz), 0, (1 << scheme.bits) - 1).to(torch.uint8)

    def decode(self, q, s, z, scheme):
        zz = self._sym_zero(scheme) if z is None else z
        return (q.float() - zz) * s

    def candidate_error(self, wg, s, z, scheme, mask=None):
        zz = self._sym_zero(scheme) if z is None else z
        e = (wg / s).add_(zz).round_().clamp_(0, (1 << scheme.bits) - 1).sub_(zz).mul_(s).sub_(wg).abs_()
        if mask is not None:
            e.mul_(mask)
        return e.pow(2).sum(-1, keepdim=True), e.amax(-1, keepdim=True)

    def range_stats(self, wg, scheme):
        if scheme.symmetric:
            return super().range_stats(wg, scheme)
        # The range always includes 0 (as in GPTQ), so the zero-point -lo/s stays within [0, 2**bits - 1]. Without
        # it a constant group gets scale ~0 and a zero-point of -w/tiny (-inf in float16 for |w| >= 4: inf/NaN
        # weights), and with double_quant one far-off zero-point wrecks the 8-bit codes of its whole block of 64.
        return wg.amin(-1, keepdim=True).clamp_max(0), wg.amax(-1, keepdim=True).clamp_min(0)

    def range_params(self, wg, ratio, scheme, integer_zero, stats=None):
        tiny = torch.finfo(torch.float16).tiny
        if stats is None:
            stats = self.range_stats(wg, scheme)
        maxq = (1 << scheme.bits) - 1
        if scheme.symmetric:
            return (2 * stats * ratio / maxq).clamp_min(tiny), None
        lo, hi = stats[0] * ratio, stats[1] * ratio
        s = ((hi - lo) / maxq).clamp_min(tiny)
        z = -lo / s
        return s, (torch.round(z) if integer_zero else z)

    def half_quadratic(self, scheme):
        return self.has_zero(scheme) and scheme.bits >= HQ_MIN_BITS and not scheme.double_quant

    def least_squares(self, wg, q, s_old, z_old, scheme, mask=None):
        if scheme.symmetric:
            return super().least_squares(wg, q, s_old, z_old, scheme, mask)
        tiny = torch.finfo(torch.float16).tiny
        m, n = _column_weights(wg, mask)
        qf = q.float()
        qm, wm = (qf * m).sum(-1, keepdim=True) / n, (wg * m).sum(-1, keepdim=True) / n
        var = ((qf - qm).pow(2) * m).sum(-1, keepdim=True)
        cov = ((qf - qm) * (wg - wm) * m).sum(-1, keepdim=True)
        ok = (var > 0) & (cov > 0)
        s = torch.where(ok, cov / var.clamp_min(1e-12), s_old).clamp_min(tiny)
        # w = s * (q - z)  =>  z = mean(q) - mean(w) / s, rounded to an integer code (see `search`), then the
        # scale refitted for that zero-point.
        z = torch.where(ok, (qm - wm / s).round().clamp(0, (1 << scheme.bits) - 1), z_old)
        c = qf - z
        num, den = (c * wg * m).sum(-1, keepdim=True), (c.pow(2) * m).sum(-1, keepdim=True)
        s = torch.where(ok & (den > 0) & (num > 0), num / den.clamp_min(1e-12), s).clamp_min(tiny)
        return s, z

    def column_rounder(self, scheme, device):
        return IntColumnRounder(scheme)

    def export_tensors(self, target, scheme, tensors, shape, requantize=False):
        # Affine integers: w = (q - zero) * scale with integer codes; the target needs integer zero-points in its
        # range and scales exact in its scale dtype.
        pack = getattr(target, "affine_int", None)
        if pack is None:
            raise ExportRefused(f"{target.name} has no affine integer weights",
                                "export to a target that has them (compressed-tensors, gptq)")
        target.check_affine_int(scheme, tuple(shape))
        in_features = shape[-1]
        params = unpack(scheme, tensors, in_features)
        problems, new_scale = self._export_scales(target, scheme, params.scale)
        zero = new_zero = params.zero
        hold_zero = getattr(target, "hold_zero", None)
        if zero is not None and hold_zero is not None:
            # The target stores something other than an integer zero-point (GGUF's Q4_1: a float16 offset
            # -scale * zero): it says what it cannot hold and what it would hold instead.
            zero_problems, new_zero = hold_zero(scheme, new_scale, zero)
            problems += zero_problems
        elif zero is not None:
            lo, hi, why, fix = target.zero_range(scheme)
            rounded = zero.round()
            frac = zero != rounded
            if frac.any():
                cause = ("double_quant stores zero-points as 8-bit codes that decode to fractional values"
                         if scheme.double_quant else
                         f"method='mse' (and 'gptq', whose group parameters come from it) fits them HQQ-style for "
                         f"asymmetric int of >= {HQ_MIN_BITS} bits")
                problems.append((f"{int(frac.sum())} of {frac.numel()} zero-points are fractional (e.g. "
                                 f"{float(zero[frac][0]):.6g}; {cause}) and {target.name} stores integer zero-points",
                                 "quantize with integer zero-points (method='rtn', symmetric=True, or bits <= "
                                 f"{HQ_MIN_BITS - 1}; without double_quant)"))
            outside = (rounded < lo) | (rounded > hi)
            if outside.any():
                problems.append((f"{int(outside.sum())} of {outside.numel()} zero-points are outside [{lo}, {hi}] "
                                 f"(e.g. {float(zero[outside][0]):.6g}): {why}", fix))
            new_zero = rounded.clamp(lo, hi)
        codes, new_scale, new_zero, added, decoded = self._refuse_or_reround(
            target, scheme, problems, requantize, params.codes, params.scale, zero, new_scale, new_zero, in_features)
        out, description = pack(scheme, codes, new_scale, new_zero, tuple(shape))
        return ExportedWeight(out, description, added, decoded)

    def _refit(self, target, scheme, wg, mask):
        # The data-free search with integer zero-points (no half-quadratic fit) on the decoded weight, its scales
        # rounded to the target's dtype and zero-points clamped to the target's range.
        s, z = self.search(wg, dataclasses.replace(scheme, method="mse", double_quant=False), mask, integer_zero=True)
        s = s.to(target.scale_dtype).float().clamp_min(FP16_TINY)
        if z is not None:
            lo, hi = target.zero_range(scheme)[:2]
            z = z.round().clamp(lo, hi)
        return [(s, z)]


class CodebookFormat(ScalarFormat):
    """Codes indexing a fixed table of values (normalised to max |value| 1, except FP8) times a per-group scale."""

    codebook = True

    def __init__(self, name: str, bits: int, values):
        self.name, self.bits, self._values = name, (bits,), values

    def table(self, device=None):
        return torch.tensor(self._values, dtype=torch.float32, device=device)

    def emitted(self, table: torch.Tensor, ids: torch.Tensor):
        """(values, ids) of the codes the quantizer may emit."""
        return table, ids

    def assign(self, wg, s, z, scheme):
        table = self.table(device=wg.device)
        table, ids = self.emitted(table, torch.arange(table.numel(), device=wg.device))
        values, order = torch.sort(table)
        mids = (values[1:] + values[:-1]) / 2
        return ids[order[torch.bucketize(wg / s, mids)]].to(torch.uint8)

    def decode(self, q, s, z, scheme):
        return self.table(device=q.device)[q.long()] * s

    def range_params(self, wg, ratio, scheme, integer_zero, stats=None):
        tiny = torch.finfo(torch.float16).tiny
        if stats is None:
            stats = self.range_stats(wg, scheme)
        top = self.table().abs().max().item()
        return (stats * ratio / top).clamp_min(tiny), None

    def column_rounder(self, scheme, device):
        return CodebookColumnRounder(self, scheme, device)


class FP8Format(CodebookFormat):
    def __init__(self):
        super().__init__("fp8", 8, None)

    def table(self, device=None):
        """All 256 E4M3 bit patterns; NaN mapped to 0."""
        v = torch.arange(256, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn).float()
        return torch.nan_to_num(v, nan=0.0)

    def emitted(self, table, ids):
        keep = (ids & 0x7F) != 0x7F  # 0x7F / 0xFF are NaN in E4M3 (decoded as 0 here): never emit them
        return table[keep], ids[keep]

    def export_tensors(self, target, scheme, tensors, shape, requantize=False):
        # E4M3 codes times a per-group scale: exact wherever the target decodes float8_e4m3fn codes times its scale.
        pack = getattr(target, "float8_e4m3", None)
        if pack is None:
            raise ExportRefused(f"{target.name} has no float8 (E4M3) weights",
                                "quantize these modules with format='int' (e.g. bits=8 with symmetric=True), or "
                                "export to compressed-tensors, which has them")
        target.check_float8_e4m3(scheme, tuple(shape))
        in_features = shape[-1]
        codes = unpack_bits(tensors["qweight"], scheme.bits, in_features)
        # The NaN patterns decode to 0 here (never written by hf_quant): the code of +0 is the same value.
        codes = torch.where((codes & 0x7F) == 0x7F, torch.zeros_like(codes), codes)
        scale, _ = decode_params(scheme, tensors)
        problems, new_scale = self._export_scales(target, scheme, scale)
        codes, new_scale, _, added, decoded = self._refuse_or_reround(target, scheme, problems, requantize, codes,
                                                                      scale, None, new_scale, None, in_features)
        out, description = pack(scheme, codes, new_scale, tuple(shape))
        return ExportedWeight(out, description, added, decoded)


class IntColumnRounder:
    """GPTQ's rounding step on an integer grid: (codes, decoded values) of one column given its groups' scale/zero."""

    def __init__(self, scheme: QuantScheme):
        self.maxq = (1 << scheme.bits) - 1
        self.sym_zero = float(1 << (scheme.bits - 1))

    def __call__(self, w, s, z):
        zz = self.sym_zero if z is None else z
        q = torch.clamp(torch.round(w / s + zz), 0, self.maxq)
        return q.to(torch.uint8), (q - zz).mul_(s)


class CodebookColumnRounder:
    """GPTQ's rounding step on a codebook: the same choice as `CodebookFormat.assign`, with the sorted table built
    once instead of once per column."""

    def __init__(self, fmt: CodebookFormat, scheme: QuantScheme, device):
        table = fmt.table(device=device)
        probe = torch.linspace(-2, 2, 4099, device=device) * table.abs().max()
        codes = fmt.assign(probe, torch.ones(()), None, scheme).long()  # which ids `assign` may emit
        used = torch.unique(codes)
        values, order = torch.sort(table[used])
        self.values, self.ids = values, used[order]
        self.mids = ((values[1:] + values[:-1]) / 2).contiguous()

    def __call__(self, w, s, z):
        idx = torch.bucketize(w / s, self.mids)
        return self.ids[idx].to(torch.uint8), self.values[idx].mul_(s)


ColumnRounder = IntColumnRounder | CodebookColumnRounder

INT = register_format(IntFormat())
NF4 = register_format(CodebookFormat("nf4", 4, NF4_CODEBOOK))
FP4 = register_format(CodebookFormat("fp4", 4, FP4_CODEBOOK))
FP8 = register_format(FP8Format())


# --- helpers of the search ------------------------------------------------------------------------------------


def _grouped(w: torch.Tensor, g: int, in_padded: int) -> torch.Tensor:
    """[rows, in] -> [rows, n_groups, g]; padding repeats the last column so it leaves min/max unchanged."""
    pad = in_padded - w.shape[1]
    if pad:
        w = torch.cat((w, w[:, -1:].expand(-1, pad)), 1)
    return w.view(w.shape[0], -1, g)


def _column_weights(wg: torch.Tensor, mask=None) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(weights broadcastable to wg, number of real columns per group): the mask of a short last group's padding,
    or all ones."""
    if mask is None:
        return torch.ones_like(wg[..., :1]), float(wg.shape[-1])
    return mask, mask.sum(-1, keepdim=True)


def _keep_better(s, z, err, max_err, bound, best_s, best_z, best_err):
    better = (err < best_err) & (max_err <= bound)
    return (
        torch.where(better, s, best_s),
        None if z is None else torch.where(better, z, best_z),
        torch.where(better, err, best_err),
    )


# --- second-level ("double") quantization of scales and zero-points --------------------------------


def dq_encode(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit affine codes for `values`, with a float16 (step, offset) per block of 64 consecutive values."""
    flat = values.reshape(-1).float()
    pad = (-flat.numel()) % DQ_BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad), value=float(flat[-1]) if flat.numel() else 0.0).view(-1, DQ_BLOCK)
    lo, hi = blocks.min(1).values, blocks.max(1).values
    step = ((hi - lo) / 255).to(torch.float16).float()
    offset = lo.to(torch.float16).float()
    # float16 rounding of the offset may push values below it: widen the step until the top still fits.
    step = torch.maximum(step, ((hi - offset) / 255).to(torch.float16).float())
    step = torch.where(step > 0, step, torch.ones_like(step))
    for _ in range(2):  # float16 rounding of step can still leave hi just out of range
        too_small = offset + 255 * step < hi
        step = torch.where(too_small, torch.nextafter(step.half(), torch.full_like(step.half(), torch.inf)).float(), step)
    codes = torch.clamp(torch.round((blocks - offset[:, None]) / step[:, None]), 0, 255).to(torch.uint8)
    meta = torch.stack((step, offset), 1).to(torch.float16)
    return codes.reshape(-1)[: flat.numel()].reshape(values.shape), meta


def dq_decode(codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    flat = codes.reshape(-1).float()
    pad = (-flat.numel()) % DQ_BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, DQ_BLOCK)
    meta = meta.float()
    out = blocks * meta[:, :1] + meta[:, 1:]
    return out.reshape(-1)[: flat.numel()].reshape(codes.shape)


def _dq_round(values: torch.Tensor) -> torch.Tensor:
    """Values as double quantization stores them, i.e. a fixed point of decode(encode(.)): `pack` re-encodes
    the rounded values, and one encode/decode pass is not always idempotent (a block whose step had to be
    widened no longer spans all 256 codes), so iterate until re-encoding reproduces them exactly."""
    values = dq_decode(*dq_encode(values))
    for _ in range(8):
        again = dq_decode(*dq_encode(values))
        if torch.equal(again, values):
            break
        values = again
    return values


# --- functions of the scalar formats' canonical tensors ----------------------------------------------------


def _scalar(scheme: QuantScheme) -> ScalarFormat:
    fmt = scheme.codec
    if not isinstance(fmt, ScalarFormat):
        raise ValueError(f"format {scheme.format!r} has no per-weight scalar codes (scales and zero-points)")
    return fmt


def codebook_values(fmt: str, device=None) -> torch.Tensor:
    """The float32 value of every code of a codebook format (FP8: all 256 E4M3 patterns, NaN mapped to 0)."""
    table = get_format(fmt).table(device=device) if isinstance(get_format(fmt), ScalarFormat) else None
    if table is None:
        raise ValueError(f"format {fmt!r} has no codebook")
    return table


def round_params(scheme: QuantScheme, scale: torch.Tensor, zero: torch.Tensor | None):
    """Round float32 scale/zero to exactly what storage will hold, so codes are chosen against stored values."""
    if scheme.double_quant:
        scale = _dq_round(scale)
        zero = None if zero is None else _dq_round(zero)
    else:
        scale = scale.to(torch.float16).float()
        zero = None if zero is None else zero.to(torch.float16).float()
    tiny = torch.finfo(torch.float16).tiny
    scale = torch.where(scale > 0, scale, torch.full_like(scale, tiny))
    return scale, zero


def pack(scheme: QuantScheme, params: QuantParams) -> dict[str, torch.Tensor]:
    """QuantParams -> the canonical stored tensors (`round_params` must already have been applied)."""
    out = {"qweight": pack_bits(params.codes, scheme.bits)}
    pairs = [("scales", params.scale)] + ([("zeros", params.zero)] if scheme.has_zero else [])
    for name, value in pairs:
        if scheme.double_quant:
            out[name], out[f"{name}_dq"] = dq_encode(value)
        else:
            out[name] = value.to(torch.float16).contiguous()
    return out


def decode_params(scheme: QuantScheme, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 scale and zero-point from the stored tensors: the stored zero-point, the implied one (symmetric int),
    or None (codebooks)."""

    def read(name: str) -> torch.Tensor:
        if scheme.double_quant:
            return dq_decode(tensors[name], tensors[f"{name}_dq"])
        return tensors[name].float()

    scale = read("scales")
    if scheme.has_zero:
        return scale, read("zeros")
    return scale, _scalar(scheme).implied_zero(scheme, scale)


def unpack(scheme: QuantScheme, tensors: dict[str, torch.Tensor], in_features: int) -> QuantParams:
    codes = unpack_bits(tensors["qweight"], scheme.bits, in_features)
    scale, zero = decode_params(scheme, tensors)
    return QuantParams(codes, scale, zero if scheme.has_zero else None)


def dequantize_codes(
    scheme: QuantScheme,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference decoding of unpacked codes with float scale/zero (None for symmetric int: the implied one)."""
    fmt = _scalar(scheme)
    if zero is None:
        zero = fmt.implied_zero(scheme, scale)
    return decode_codes(codes, scale, zero, fmt.table(device=codes.device), scheme.group_size, in_features, dtype)


def decode_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, table: torch.Tensor | None,
                 group_size: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The one decoding of scalar codes (formats and the `hf_quant::dequantize` op both use it): unpacked codes
    [*lead, out, in] with scale (and zero) [*lead, out, n_groups] -> weights [*lead, out, in] in `dtype`, computed in
    scale's dtype. Affine (`table` None): (q - zero) * scale; codebook: table[q] * scale. A short last group is
    padded while decoding only."""
    n_groups = scale.shape[-1]
    g = in_features if group_size == -1 else group_size
    lead = codes.shape[:-1]
    if n_groups * g != in_features:
        codes = torch.nn.functional.pad(codes, (0, n_groups * g - in_features))
    codes = codes.view(*lead, n_groups, g)
    if table is None:
        w = (codes.to(scale.dtype) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    else:
        w = table.to(scale.dtype)[codes.long()] * scale.unsqueeze(-1)
    return w.reshape(*lead, n_groups * g)[..., :in_features].to(dtype)


def quantize_params(weight: torch.Tensor, scheme: QuantScheme) -> QuantParams:
    """Data-free codes, scales and zero-points of a scalar format (not packed)."""
    return _scalar(scheme).quantize_params(weight, scheme)


__all__ = [
    "DQ_BLOCK", "FP8_MAX", "ExportRefused", "ExportedWeight", "QuantParams", "ScalarFormat", "codebook_values",
    "decode_codes", "decode_params",
    "dequantize_codes",
    "dq_decode", "dq_encode", "pack", "quantize_params", "round_params", "unpack",
]
