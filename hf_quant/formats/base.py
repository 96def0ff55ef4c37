"""Canonical storage of a quantized weight and its plain-PyTorch reference decoding.

Every format stores a weight of logical shape [*lead, out, in] (lead = experts for fused MoE tensors) as:

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack_bits, packed_length, unpack_bits
from .scheme import QuantScheme

DQ_BLOCK = 64

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


def codebook_values(fmt: str, device=None) -> torch.Tensor:
    """The float32 value of every code of a codebook format (FP8: all 256 E4M3 patterns, NaN mapped to 0)."""
    if fmt == "nf4":
        return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)
    if fmt == "fp4":
        return torch.tensor(FP4_CODEBOOK, dtype=torch.float32, device=device)
    if fmt == "fp8":
        v = torch.arange(256, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn).float()
        return torch.nan_to_num(v, nan=0.0)
    raise ValueError(f"format {fmt!r} has no codebook")


@dataclass
class QuantParams:
    """Unpacked quantization: integer codes and float32 per-group scale (and zero-point)."""

    codes: torch.Tensor  # uint8 [*lead, out, in]
    scale: torch.Tensor  # float32 [*lead, out, n_groups]
    zero: torch.Tensor | None  # float32 [*lead, out, n_groups], int asymmetric only


class AdditiveTerm:
    """Extension point: a correction stored beside the codes whose dense value adds to the decoded weight
    (W = base + term), e.g. low-rank factors. A registered term extends every format: `tensor_specs` lists its
    tensors, `dequantize` adds `dense`, and the packed modules add `linear(x)` to the kernel's output."""

    def active(self, scheme: QuantScheme) -> bool:
        raise NotImplementedError

    def specs(self, scheme: QuantScheme, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def dense(self, scheme: QuantScheme, tensors: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        """The term as a float32 [*lead, out, in] weight."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """x [M, in] -> the term's output [M, out] (of one matrix), in x's dtype."""
        raise NotImplementedError


ADDITIVE_TERMS: list[AdditiveTerm] = []


def register_additive_term(term: AdditiveTerm) -> AdditiveTerm:
    ADDITIVE_TERMS.append(term)
    return term


def active_terms(scheme: QuantScheme) -> list[AdditiveTerm]:
    return [t for t in ADDITIVE_TERMS if t.active(scheme)]


class CodeFormat:
    """Extension point: a format with its own code layout (e.g. ternary planes), registered under its
    `QuantScheme.format` name. It declares its stored tensors and decodes them; the scalar formats above keep the
    layout this module describes."""

    def specs(self, scheme: QuantScheme, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def dequantize(self, scheme: QuantScheme, tensors: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        """Reference decoding to a float32 weight [*lead, out, in]."""
        raise NotImplementedError


CODE_FORMATS: dict[str, CodeFormat] = {}


def register_code_format(name: str, fmt: CodeFormat) -> CodeFormat:
    CODE_FORMATS[name] = fmt
    return fmt


def tensor_specs(scheme: QuantScheme, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the stored tensors of a weight of logical `shape` [*lead, out, in]."""
    codes = CODE_FORMATS.get(scheme.format)
    specs = codes.specs(scheme, tuple(shape)) if codes is not None else _scalar_specs(scheme, tuple(shape))
    for term in active_terms(scheme):
        specs.update(term.specs(scheme, tuple(shape)))
    return specs


def _scalar_specs(scheme: QuantScheme, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    *lead, out, in_features = shape
    _, n_groups, _ = scheme.group_layout(in_features)
    specs = {"qweight": ((*lead, out, packed_length(in_features, scheme.bits)), torch.uint8)}
    param_shape = (*lead, out, n_groups)
    names = ["scales"] + (["zeros"] if scheme.has_zero else [])
    for name in names:
        if scheme.double_quant:
            numel = 1
            for d in param_shape:
                numel *= d
            specs[name] = (param_shape, torch.uint8)
            specs[f"{name}_dq"] = ((-(-numel // DQ_BLOCK), 2), torch.float16)
        else:
            specs[name] = (param_shape, torch.float16)
    return specs


def bits_per_weight(scheme: QuantScheme, shape: tuple[int, ...]) -> float:
    """True storage cost: every stored bit divided by the number of logical weights."""
    total = 0
    for shp, dtype in tensor_specs(scheme, shape).values():
        n = 1
        for d in shp:
            n *= d
        total += n * torch.empty(0, dtype=dtype).element_size() * 8
    n_weights = 1
    for d in shape:
        n_weights *= d
    return total / n_weights


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
    """Float32 scale and zero-point (None when not stored) from the stored tensors."""

    def read(name: str) -> torch.Tensor:
        if scheme.double_quant:
            return dq_decode(tensors[name], tensors[f"{name}_dq"])
        return tensors[name].float()

    scale = read("scales")
    if scheme.has_zero:
        zero = read("zeros")
    elif scheme.format == "int":
        zero = torch.full_like(scale, float(1 << (scheme.bits - 1)))
    else:
        zero = None
    return scale, zero


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
    """Reference decoding of unpacked codes with float scale/zero (zero given for every int format)."""
    g, n_groups, in_padded = scheme.group_layout(in_features)
    lead = codes.shape[:-1]
    if in_padded != in_features:  # short last group: pad while decoding only
        codes = torch.nn.functional.pad(codes, (0, in_padded - in_features))
    if scheme.format == "int":
        if zero is None:
            zero = torch.full_like(scale, float(1 << (scheme.bits - 1)))
        q = codes.view(*lead, n_groups, g).float()
        w = (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    else:
        table = codebook_values(scheme.format, device=codes.device)
        w = table[codes.long()].view(*lead, n_groups, g) * scale.unsqueeze(-1)
    return w.reshape(*lead, in_padded)[..., :in_features].to(dtype)


def dequantize(
    scheme: QuantScheme, tensors: dict[str, torch.Tensor], in_features: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Reference dequantization of the canonical tensors to a float weight [*lead, out, in]."""
    terms = active_terms(scheme)
    if scheme.format in CODE_FORMATS:
        w = CODE_FORMATS[scheme.format].dequantize(scheme, tensors, in_features)
    else:
        codes = unpack_bits(tensors["qweight"], scheme.bits, in_features)
        scale, zero = decode_params(scheme, tensors)
        if not terms:
            return dequantize_codes(scheme, codes, scale, zero, in_features, dtype)
        w = dequantize_codes(scheme, codes, scale, zero, in_features, torch.float32)
    for term in terms:
        w = w + term.dense(scheme, tensors, in_features)
    return w.to(dtype)
