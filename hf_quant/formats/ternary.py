"""Ternary trit-planes (BitNet b1.58 weights; PTQTP-style two-plane post-training fits):

    w = sum_p scale[p, group] * t_p,   t_p in {-1, 0, +1},  p < planes (1 or 2)

Stored tensors of a weight [*lead, out, in]:

    qweight  uint8    [*lead, out, planes, ceil(in / 5)]   5 trits per byte, base 3: byte = sum_k (t_k + 1) * 3**k
    scales   float16  [*lead, out, planes, n_groups]       one scale per plane and group (short last group allowed)

so a plane costs 8/5 = 1.6 bits per weight plus 16 / group_size for its scales.

Fitting: one trit-plane with per-group scales (BitNet b1.58's absmean format), or two planes fitted progressively
and then jointly (PTQTP-style): w ~ s1 t1 + s2 t2, t in {-1, 0, +1}.

Plane by plane: start from the absmean scale, then alternate nearest trits for the scale and the least-squares
scale for the trits (each step can only lower the group's error). With two planes, the second fits the first's
residual; then both are refined together: per group the 2x2 least-squares scales for fixed trits, and per weight
the best of the 9 trit pairs for fixed scales. Weights that already are ternary times a per-group scale (a
BitNet b1.58 checkpoint) are reproduced up to the float16 rounding of the scale.
"""

from __future__ import annotations

import torch

from ..solvers.gptq import gptq_blockwise
from .format import Format, register_format
from .packing import all_finite
from .scheme import QuantScheme

TRITS_PER_BYTE = 5
PLANE_STEPS = 6
JOINT_STEPS = 8
_CHUNK_ELEMENTS = 1 << 20
_TINY = torch.finfo(torch.float16).tiny
_POW3 = (1, 3, 9, 27, 81)


def packed_trit_length(n: int) -> int:
    return -(-n // TRITS_PER_BYTE)


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """int8 trits in {-1, 0, 1} along the last dim -> uint8 [..., ceil(n / 5)] (the layout above)."""
    if trits.numel() and (int(trits.min()) < -1 or int(trits.max()) > 1):
        raise ValueError("pack_trits takes values in {-1, 0, 1}")
    *lead, n = trits.shape
    digits = torch.nn.functional.pad(trits.to(torch.int16) + 1, (0, packed_trit_length(n) * TRITS_PER_BYTE - n),
                                     value=1)
    pow3 = torch.tensor(_POW3, dtype=torch.int16, device=trits.device)
    return (digits.view(*lead, -1, TRITS_PER_BYTE) * pow3).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_trits`: int8 [..., n]."""
    if packed.shape[-1] != packed_trit_length(n):
        raise ValueError(f"packed row of {packed.shape[-1]} bytes does not hold {n} trits")
    if packed.numel() and int(packed.max()) >= 3**TRITS_PER_BYTE:
        raise ValueError(f"byte value {int(packed.max())} is not 5 trits (must be < 243)")
    pow3 = torch.tensor(_POW3, dtype=torch.int16, device=packed.device)
    digits = (packed.to(torch.int16).unsqueeze(-1) // pow3) % 3
    return (digits.flatten(-2)[..., :n] - 1).to(torch.int8)


def expand_groups(scale: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    """[..., n_groups] -> [..., in] (each scale repeated over its group; the last group may be short)."""
    return scale.repeat_interleave(group, -1)[..., :in_features]


class TernaryFormat(Format):
    name = "ternary"
    bits = (2,)  # codes are trits: 2-bit in memory, 1.6 bits on disk (5 a byte)
    planes = (1, 2)

    def specs(self, scheme: QuantScheme, shape):
        *lead, out, in_features = shape
        _, n_groups, _ = scheme.group_layout(in_features)
        return {
            "qweight": ((*lead, out, scheme.planes, packed_trit_length(in_features)), torch.uint8),
            "scales": ((*lead, out, scheme.planes, n_groups), torch.float16),
        }

    def dequantize(self, scheme: QuantScheme, tensors, in_features: int) -> torch.Tensor:
        g, _, _ = scheme.group_layout(in_features)
        trits = unpack_trits(tensors["qweight"], in_features).float()
        return (trits * expand_groups(tensors["scales"].float(), g, in_features)).sum(-2)

    def value_checks(self, scheme, tensors, shape):
        scales, qweight = tensors["scales"].float(), tensors["qweight"]
        return [("scales", scales, torch.isfinite(scales) & (scales >= _TINY), "finite normal float16 values > 0"),
                ("qweight", qweight, qweight < 3**TRITS_PER_BYTE, f"< {3**TRITS_PER_BYTE} (5 trits a byte)")]

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        """Canonical tensors of a float weight [*lead, out, in]."""
        *lead, out, in_features = weight.shape
        w = weight.detach().reshape(-1, in_features).float()
        if not all_finite(w):
            raise ValueError("weight contains NaN or Inf; refusing to quantize it")
        g, n_groups, in_padded = scheme.group_layout(in_features)
        trits = torch.empty(w.shape[0], scheme.planes, in_features, dtype=torch.int8, device=w.device)
        scales = torch.empty(w.shape[0], scheme.planes, n_groups, dtype=torch.float16, device=w.device)
        step = max(1, _CHUNK_ELEMENTS // (in_padded * 9))
        for r0 in range(0, w.shape[0], step):
            # Zero padding of a short last group: its trits come out 0 and add nothing to any sum.
            wg = torch.nn.functional.pad(w[r0 : r0 + step], (0, in_padded - in_features)).view(-1, n_groups, g)
            t, s = _fit(wg, scheme.planes)
            trits[r0 : r0 + step] = t.flatten(-2)[..., :in_features]
            scales[r0 : r0 + step] = s
        return {
            "qweight": pack_trits(trits).reshape(*lead, out, scheme.planes, -1).contiguous(),
            "scales": scales.reshape(*lead, out, scheme.planes, n_groups).contiguous(),
        }

    @torch.no_grad()
    def gptq(self, weight, hessian, scheme, settings):
        """The per-group plane scales of the data-free fit, then trits chosen column by column with GPTQ's error
        feedback (`gptq_blockwise`)."""
        tensors = self.quantize(weight, scheme)
        out, in_features = weight.shape
        g = scheme.group_layout(in_features)[0]
        scales = tensors["scales"].float()  # [out, planes, n_groups], as stored
        trits = torch.zeros(out, scheme.planes, in_features, dtype=torch.int8, device=weight.device)

        def round_block(j: int, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
            s = scales[:, :, j // g]
            if scheme.planes == 1:  # a scalar grid: the nearest trit is optimal in any metric
                t = _nearest_trits(x[:, 0], s[:, 0])
                trits[:, 0, j] = t.to(torch.int8)
                return (t * s[:, 0]).unsqueeze(1)
            t1, t2 = _best_pairs(x[:, 0], s[:, 0], s[:, 1])
            trits[:, 0, j], trits[:, 1, j] = t1.to(torch.int8), t2.to(torch.int8)
            return (t1 * s[:, 0] + t2 * s[:, 1]).unsqueeze(1)

        gptq_blockwise(weight.detach().float(), hessian, 1, round_block, damp=settings.damp,
                       act_order=settings.act_order, block_size=settings.block_size)
        tensors["qweight"] = pack_trits(trits).contiguous()
        return tensors


TERNARY = register_format(TernaryFormat())


def _fit(wg: torch.Tensor, planes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """wg [rows, G, g] -> trits int8 [rows, planes, G, g], float16 scales [rows, planes, G]."""
    count = (wg != 0).sum(-1, keepdim=True).clamp_min(1)
    residual, fitted = wg, []
    for _ in range(planes):
        s = residual.abs().sum(-1, keepdim=True) / count  # absmean (BitNet b1.58)
        for _ in range(PLANE_STEPS):
            t = _nearest_trits(residual, s)
            s = _least_squares_scale(residual, t, s)
        fitted.append((t, s))
        residual = residual - s * t
    if planes == 1:
        t, s = fitted[0]
        s = _stored(s)
        return _nearest_trits(wg, s).to(torch.int8).unsqueeze(1), s.squeeze(-1).half().unsqueeze(1)
    (t1, s1), (t2, s2) = fitted
    for _ in range(JOINT_STEPS):
        s1, s2 = _joint_scales(wg, t1, t2, s1, s2)
        t1, t2 = _best_pairs(wg, s1, s2)
    s1, s2 = _stored(s1), _stored(s2)
    t1, t2 = _best_pairs(wg, s1, s2)
    trits = torch.stack((t1, t2), 1).to(torch.int8)
    return trits, torch.stack((s1, s2), 1).squeeze(-1).half()


def _nearest_trits(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w / s), -1, 1)


def _least_squares_scale(w, t, s_old):
    num, den = (w * t).sum(-1, keepdim=True), (t * t).sum(-1, keepdim=True)
    return torch.where((den > 0) & (num > 0), num / den.clamp_min(1e-12), s_old).clamp_min(_TINY)


def _joint_scales(w, t1, t2, s1, s2):
    """Per group, the (s1, s2) minimising ||w - s1 t1 - s2 t2||^2 (kept when the system is singular or a scale
    would not be positive: the trits' signs carry the sign)."""
    a11, a22, a12 = (t1 * t1).sum(-1, keepdim=True), (t2 * t2).sum(-1, keepdim=True), (t1 * t2).sum(-1, keepdim=True)
    b1, b2 = (t1 * w).sum(-1, keepdim=True), (t2 * w).sum(-1, keepdim=True)
    det = a11 * a22 - a12 * a12
    ok = det > 1e-6 * (a11 * a22).clamp_min(1e-12)
    n1 = (b1 * a22 - b2 * a12) / det.where(ok, torch.ones_like(det))
    n2 = (b2 * a11 - b1 * a12) / det.where(ok, torch.ones_like(det))
    ok = ok & (n1 > 0) & (n2 > 0)
    return torch.where(ok, n1, s1).clamp_min(_TINY), torch.where(ok, n2, s2).clamp_min(_TINY)


# A list, not a module-level tensor: the module may first be imported under transformers' meta-device context.
_PAIRS = [(a, b) for a in (-1.0, 0.0, 1.0) for b in (-1.0, 0.0, 1.0)]


def _best_pairs(w, s1, s2):
    """For each weight the trit pair (t1, t2) whose value s1 t1 + s2 t2 is nearest."""
    pairs = torch.tensor(_PAIRS, dtype=w.dtype, device=w.device)
    values = s1.unsqueeze(-1) * pairs[:, 0] + s2.unsqueeze(-1) * pairs[:, 1]  # [rows, G, 1, 9]
    best = (w.unsqueeze(-1) - values).abs().argmin(-1)
    pair = pairs[best]
    return pair[..., 0], pair[..., 1]


def _stored(s: torch.Tensor) -> torch.Tensor:
    """The scale as float16 storage holds it (at least float16's smallest normal, so it stays > 0)."""
    return s.clamp(_TINY, 65504.0).half().float()
