"""Quantization of key/value tensors [batch, heads, tokens, head_dim] for the KV cache (KIVI / KVQuant layouts).

Keys are quantized per channel: each group is one head_dim channel over `group_size` consecutive tokens (key
outliers sit in fixed channels, so a channel's own range isolates them). Values are quantized per token: each group
is `group_size` consecutive head_dim entries of one token (a short last group when it does not divide head_dim).
Both use asymmetric min/max round-to-nearest with float16 scale and offset, x ~= q * scale + offset; unlike the
weight formats (hf_quant/formats/scalar.py) the range need not include 0, which matters for key channels with a
large mean and a small spread. With `clip` each group's range is the one of least squared error among the min/max
range and that range shrunk about its midpoint (CLIP_GRID); entries outside it take the end codes. At 2 bits (4
levels) min/max spends levels on a group's extremes; the clipped range is what makes 2-bit keys usable.

Stored tensors (`quantize`), every one with batch at dim 0 and tokens at dim -2, so blocks concatenate along -2:

    codes        uint8    [B, H, T, packed_length(D, bits)]   `formats.packing.pack_bits` layout along head_dim
    scale        float16  keys [B, H, ceil(T / g), D]; values [B, H, T, ceil(D / g)]
    offset       float16  same shape as scale
    out_values   float16  [B, H, T, k]   outliers > 0 only: the k entries of each token vector kept exactly
    out_index    uint8/int16 [B, H, T, k]  their positions along head_dim

Outliers (dense-and-sparse, KVQuant): per token vector, the k entries furthest from their group's mean in units of
the group's standard deviation are stored in float16 and replaced by the group mean before the range is taken, so
they no longer stretch it. Rotation (RotateKV / QuaRot): x R with R = H diag(s) (a normalised Walsh-Hadamard
transform over blocks of the largest power of two dividing head_dim, random signs s from a seed) is quantized,
and the decoded vector is multiplied by R^T: orthogonal, so the reconstruction is exact in exact arithmetic and
an outlier's energy is spread over its block. The transform is butterflies of additions (no matmul), so a token's
result does not depend on how many tokens are transformed with it (appends equal one-shot quantization bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.packing import pack_bits, pack_bits_unchecked, packed_length, unpack_bits
from ..formats.scalar import decode_codes

KV_BITS = (2, 3, 4, 8)
AXES = ("channel", "token")
FP16_TINY = torch.finfo(torch.float16).tiny
FP16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class KVSpec:
    """How one of keys/values is stored. axis "channel": groups of `group_size` tokens per channel (keys);
    "token": groups of `group_size` head_dim entries per token (values; group_size larger than head_dim means one
    group per token). rotation_seed None: no rotation."""

    bits: int
    group_size: int
    axis: str
    outliers: int = 0
    rotation_seed: int | None = None
    clip: bool = False

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1


# --- rotation -----------------------------------------------------------------------------------------------


def hadamard_block(head_dim: int) -> int:
    """Largest power of two dividing head_dim: the size of the Walsh-Hadamard blocks."""
    return head_dim & -head_dim


def rotation_signs(head_dim: int, seed: int, device=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (head_dim,), generator=g) * 2 - 1).float().to(device)


def _fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform of each block of `block` entries along the last dim (its own inverse)."""
    shape = x.shape
    x = x.reshape(-1, block)
    if torch.compiler.is_compiling():
        # torch.compile refuses `out=` into strided views; the same additions, functional (the compiler fuses them)
        h = 1
        while h < block:
            xv = x.reshape(-1, block // (2 * h), 2, h)
            x, h = torch.stack((xv[:, :, 0] + xv[:, :, 1], xv[:, :, 0] - xv[:, :, 1]), 2).reshape(-1, block), h * 2
        return x.view(shape) * block ** -0.5
    # the stages ping-pong between two fresh buffers (2.5x faster than stacking each stage); the input is only read
    buffers = [torch.empty(x.shape, dtype=x.dtype, device=x.device), None]
    h, i = 1, 0
    while h < block:
        if buffers[i] is None:
            buffers[i] = torch.empty_like(buffers[0])
        out = buffers[i]
        xv, ov = x.reshape(-1, block // (2 * h), 2, h), out.view(-1, block // (2 * h), 2, h)
        torch.add(xv[:, :, 0], xv[:, :, 1], out=ov[:, :, 0])
        torch.sub(xv[:, :, 0], xv[:, :, 1], out=ov[:, :, 1])
        x, h, i = out, h * 2, 1 - i
    return x.view(shape) * block ** -0.5


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x R, R = diag(signs) H (float32)."""
    return _fwht(x.float() * signs, hadamard_block(x.shape[-1]))


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """y R^T: the inverse of `rotate`."""
    return _fwht(y.float(), hadamard_block(y.shape[-1])) * signs


# --- quantize / dequantize ------------------------------------------------------------------------------------


def _grouped(x: torch.Tensor, spec: KVSpec) -> tuple[torch.Tensor, int, int]:
    """x [B, H, T, D] float32 -> grouped view with the group along dim -1 ("token") or -2 ("channel"), padded by
    repeating the last entry (which leaves min/max unchanged); returns (view, group size, padded length)."""
    B, H, T, D = x.shape
    if spec.axis == "token":
        g = min(spec.group_size, D)
        n = -(-D // g) * g
        if n != D:
            x = torch.cat((x, x[..., -1:].expand(B, H, T, n - D)), -1)
        return x.view(B, H, T, n // g, g), g, n
    g = spec.group_size
    n = -(-T // g) * g
    if n != T:
        x = torch.cat((x, x[..., -1:, :].expand(B, H, n - T, D)), -2)
    return x.view(B, H, n // g, g, D), g, n


def _ungrouped(xg: torch.Tensor, spec: KVSpec, T: int, D: int) -> torch.Tensor:
    B, H = xg.shape[:2]
    if spec.axis == "token":
        return xg.reshape(B, H, T, -1)[..., :D]
    return xg.reshape(B, H, -1, D)[..., :T, :]


def _range_params(lo: torch.Tensor, hi: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16-representable (scale, offset) with offset <= lo and offset + maxq * scale >= hi: codes are chosen
    against the stored values, and rounding offset up would clip a group whose spread is small beside its mean."""
    lo = lo.clamp(-FP16_MAX, FP16_MAX)
    hi = hi.clamp(-FP16_MAX, FP16_MAX)
    offset = lo.half()
    offset = torch.where(offset.float() > lo, torch.nextafter(offset, torch.full_like(offset, -torch.inf)), offset)
    offset = offset.float()
    scale = ((hi - offset) / maxq).clamp_min(FP16_TINY).half()
    scale = torch.where(offset + maxq * scale.float() < hi, torch.nextafter(scale, torch.full_like(scale, torch.inf)),
                        scale)
    return scale.float(), offset


CLIP_GRID = tuple(1 - i / 20 for i in range(1, 11))  # range shrink factors tried by `clip`: 0.95 ... 0.5


def _clipped_params(xg, lo, hi, scale, offset, maxq: int, gdim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the (scale, offset) of least squared error among the min/max range and that range shrunk about
    its midpoint by each CLIP_GRID factor (entries outside are clipped to the end codes)."""
    def sq_error(sc, of):
        q = ((xg - of) / sc).round_().clamp_(0, maxq)
        return (q * sc + of - xg).square_().sum(gdim, keepdim=True)

    best = sq_error(scale, offset)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    for factor in CLIP_GRID:
        sc, of = _range_params(mid - factor * half, mid + factor * half, maxq)
        err = sq_error(sc, of)
        better = err < best
        best = torch.where(better, err, best)
        scale, offset = torch.where(better, sc, scale), torch.where(better, of, offset)
    return scale, offset


def quantize(x: torch.Tensor, spec: KVSpec, signs: torch.Tensor | None = None,
             traceable: bool = False) -> dict[str, torch.Tensor]:
    """Stored tensors (module doc) of x [B, H, T, D]; `signs` (from `rotation_signs`) when spec rotates.

    traceable=True (the static cache's compiled decode step) leaves out the two checks that read values on the
    host, which torch.compile cannot trace: the NaN/Inf refusal (a non-finite state there already makes that step's
    attention output non-finite, since the new token is attended in float) and `pack_bits`' range check (the codes
    are clamped to [0, maxq], so they fit); the packed bytes are the same (`pack_bits_unchecked`)."""
    if x.dim() != 4:
        raise ValueError(f"expected key/value states of shape [batch, heads, tokens, head_dim], got {tuple(x.shape)}")
    B, H, T, D = x.shape
    xf = rotate(x, signs) if spec.rotation_seed is not None else x.float()
    if not traceable and not torch.isfinite(xf).all():
        raise ValueError("key/value states contain NaN or Inf; refusing to quantize them")
    out = {}
    gdim = -1 if spec.axis == "token" else -2
    if spec.outliers:
        xg, _, _ = _grouped(xf, spec)
        mean = xg.mean(gdim, keepdim=True)
        score = ((xg - mean) / xg.std(gdim, keepdim=True, correction=0).clamp_min(1e-12)).abs()
        score = _ungrouped(score, spec, T, D)
        idx = score.topk(spec.outliers, dim=-1).indices
        out["out_values"] = xf.gather(-1, idx).clamp(-FP16_MAX, FP16_MAX).half()
        out["out_index"] = idx.to(torch.uint8 if D <= 256 else torch.int16)
        fill = _ungrouped(mean.expand_as(xg), spec, T, D).gather(-1, idx)
        xf = xf.scatter(-1, idx, fill)
    xg, _, _ = _grouped(xf, spec)
    lo, hi = xg.amin(gdim, keepdim=True), xg.amax(gdim, keepdim=True)
    scale, offset = _range_params(lo, hi, spec.maxq)
    if spec.clip:
        scale, offset = _clipped_params(xg, lo, hi, scale, offset, spec.maxq, gdim)
    q = ((xg - offset) / scale).round_().clamp_(0, spec.maxq).to(torch.uint8)
    q = _ungrouped(q, spec, T, D)
    out["codes"] = pack_bits_unchecked(q, spec.bits) if traceable else pack_bits(q, spec.bits)
    out["scale"], out["offset"] = scale.squeeze(gdim).half(), offset.squeeze(gdim).half()
    return {name: out[name] for name in sorted(out)}


def dequantize(tensors: dict[str, torch.Tensor], spec: KVSpec, head_dim: int, dtype: torch.dtype = torch.float32,
               signs: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, T, head_dim] in `dtype` from the stored tensors (T = their token count)."""
    codes = unpack_bits(tensors["codes"], spec.bits, head_dim)
    B, H, T, D = codes.shape
    scale, offset = tensors["scale"].float(), tensors["offset"].float()
    if spec.axis == "token":
        # the scalar formats' decoding (w = (q - zero) * scale, short last group padded while decoding)
        x = decode_codes(codes, scale, -offset / scale, None, min(spec.group_size, D), D, torch.float32)
    else:
        g = spec.group_size
        n = scale.shape[-2] * g
        if n != T:
            codes = torch.nn.functional.pad(codes, (0, 0, 0, n - T))
        x = codes.view(B, H, -1, g, D).float() * scale.unsqueeze(-2) + offset.unsqueeze(-2)
        x = x.view(B, H, n, D)[..., :T, :]
    if "out_values" in tensors:
        x = x.scatter(-1, tensors["out_index"].long(), tensors["out_values"].float())
    if spec.rotation_seed is not None:
        x = unrotate(x, signs)
    return x.to(dtype)


def stored_bits_per_entry(spec: KVSpec, head_dim: int) -> float:
    """Bits one key/value entry takes in storage (codes, scale and offset, outliers), for whole groups."""
    codes = packed_length(head_dim, spec.bits) * 8 / head_dim
    if spec.axis == "token":
        params = -(-head_dim // min(spec.group_size, head_dim)) * 32 / head_dim
    else:
        params = 32 / spec.group_size
    index_bits = 8 if head_dim <= 256 else 16
    return codes + params + spec.outliers * (16 + index_bits) / head_dim
