"""Tests for hf_quant.formats (bit packing, stored layout, codebooks, double quantization) and the data-free
quantizers of hf_quant.algorithms that produce the stored tensors."""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch

from hf_quant.algorithms import quantize_params, quantize_weight
from hf_quant.formats import (
    QuantParams,
    QuantScheme,
    bits_per_weight,
    codebook_values,
    decode_params,
    dequantize,
    pack,
    pack_bits,
    packed_length,
    round_params,
    tensor_specs,
    unpack,
    unpack_bits,
)
from hf_quant.formats.scalar import DQ_BLOCK, dq_decode, dq_encode

# --------------------------------------------------------------------------------------------------------------
# Independent definitions the implementation is checked against (written from the format specs, not the code).
# --------------------------------------------------------------------------------------------------------------

# QLoRA's NF4 table (Dettmers et al. 2023, bitsandbytes `NF4` constants).
NF4_REFERENCE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
FP8_NAN_CODES = (0x7F, 0xFF)


def e2m1_decode(code: int) -> float:
    """FP4 E2M1 bit pattern (sign, 2 exponent bits with bias 1, 1 mantissa bit) -> value."""
    sign = -1.0 if code >> 3 else 1.0
    exp, man = (code >> 1) & 3, code & 1
    mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
    return sign * mag


def e4m3_decode(code: int) -> float:
    """FP8 E4M3 ("fn": no infinities, NaN at S.1111.111) bit pattern -> value."""
    sign = -1.0 if code >> 7 else 1.0
    exp, man = (code >> 3) & 0xF, code & 7
    if exp == 0xF and man == 7:
        return math.nan
    mag = man / 8 * 2.0**-6 if exp == 0 else 2.0 ** (exp - 7) * (1 + man / 8)
    return sign * mag


def reference_table(fmt: str) -> torch.Tensor:
    if fmt == "nf4":
        return torch.tensor(NF4_REFERENCE, dtype=torch.float32)
    if fmt == "fp4":
        return torch.tensor([e2m1_decode(c) / 6.0 for c in range(16)], dtype=torch.float32)
    if fmt == "fp8":
        return torch.tensor([e4m3_decode(c) for c in range(256)], dtype=torch.float32)
    raise AssertionError(fmt)


def reference_pack(codes: list[int], bits: int) -> bytes:
    """The canonical layout is an LSB-first bit stream: code i occupies bits [i*bits, (i+1)*bits) of the row,
    read as one little-endian integer, padded to whole groups of 8 codes (= `bits` bytes)."""
    word = 0
    for i, c in enumerate(codes):
        word |= c << (i * bits)
    return word.to_bytes(-(-len(codes) // 8) * bits, "little")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are small: one thread is several times faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------------------------

LENGTHS = (1, 7, 9, 33, 100, 257)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", LENGTHS)
def test_pack_unpack_round_trip(bits, n):
    g = torch.Generator().manual_seed(1000 * bits + n)
    lead = (3, 2)
    codes = torch.randint(0, 1 << bits, (*lead, n), generator=g, dtype=torch.int64).to(torch.uint8)
    codes[0, 0, 0] = (1 << bits) - 1  # the all-ones code always occurs
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, math.ceil(n / 8) * bits)
    assert packed.shape[-1] == packed_length(n, bits)
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.uint8 and out.shape == codes.shape
    assert torch.equal(out, codes)
    # Byte-exact against an independent bit-stream implementation, row by row.
    for row_codes, row_bytes in zip(codes.reshape(-1, n).tolist(), packed.reshape(-1, packed.shape[-1]).tolist()):
        assert bytes(row_bytes) == reference_pack(row_codes, bits)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_one_dimensional_and_wide_codes(bits):
    """A bare 1-D row packs too, and int64 input codes give the same bytes as uint8 ones."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (41,), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.shape == (packed_length(41, bits),)
    assert torch.equal(packed, pack_bits(codes.to(torch.uint8), bits))
    assert torch.equal(unpack_bits(packed, bits, 41), codes.to(torch.uint8))


def test_packed_length_is_exact_bits():
    # 3-bit really takes 3 bits per code (in whole groups of 8 codes), not 4 or 8.
    assert packed_length(8, 3) == 3
    assert packed_length(4096, 3) * 8 == 4096 * 3
    assert packed_length(9, 3) == 6
    assert packed_length(1, 1) == 1
    assert packed_length(16, 4) == 8
    assert packed_length(17, 8) == 24  # 8-bit rows are padded to whole groups of 8 as well
    assert packed_length(200, 5) == 125


@pytest.mark.parametrize(
    "bits, codes, expected",
    [
        # 3-bit codes 0..7: the word is octal 0o76543210 = 0xFAC688, stored little-endian.
        (3, [0, 1, 2, 3, 4, 5, 6, 7], [0x88, 0xC6, 0xFA]),
        # 3-bit codes 1..7, 0: octal 0o07654321 = 0x1F58D1.
        (3, [1, 2, 3, 4, 5, 6, 7, 0], [0xD1, 0x58, 0x1F]),
        # A lone 3-bit code is zero-padded to a whole group of 8 codes: 3 bytes.
        (3, [5], [0x05, 0x00, 0x00]),
        # 9 codes -> two groups -> 6 bytes; the 9th code starts the second group.
        (3, [7, 0, 0, 0, 0, 0, 0, 0, 6], [0x07, 0x00, 0x00, 0x06, 0x00, 0x00]),
        # 4-bit: even code in the low nibble, odd code in the high nibble.
        (4, [1, 2, 3, 4, 15, 0, 10, 5], [0x21, 0x43, 0x0F, 0x5A]),
        # 2-bit: four codes per byte, first code in the lowest bits.
        (2, [1, 2, 3, 0, 3, 3, 0, 1], [0b00111001, 0b01001111]),
        # 1-bit: code i is bit i.
        (1, [1, 0, 1, 1, 0, 0, 0, 1], [0b10001101]),
        # 5-bit: codes 31, 1 -> bits 0-4 all ones, bit 5 set.
        (5, [31, 1, 0, 0, 0, 0, 0, 0], [0x3F, 0, 0, 0, 0]),
        # 8-bit: identity, padded to a multiple of 8.
        (8, [200, 3, 255], [200, 3, 255, 0, 0, 0, 0, 0]),
    ],
)
def test_pack_layout_hand_computed(bits, codes, expected):
    packed = pack_bits(torch.tensor(codes, dtype=torch.uint8)[None], bits)
    assert packed[0].tolist() == expected
    assert unpack_bits(packed, bits, len(codes))[0].tolist() == codes


def test_pack_errors():
    with pytest.raises(ValueError, match="fit"):
        pack_bits(torch.tensor([[8]], dtype=torch.uint8), 3)
    for bits in (0, 9):
        with pytest.raises(ValueError, match="bits"):
            pack_bits(torch.zeros(1, 8, dtype=torch.uint8), bits)
    with pytest.raises(ValueError):  # 4 bytes is not a whole number of 3-bit groups
        unpack_bits(torch.zeros(1, 4, dtype=torch.uint8), 3, 8)
    with pytest.raises(ValueError):  # 3 bytes hold at most 8 codes
        unpack_bits(torch.zeros(1, 3, dtype=torch.uint8), 3, 9)
    with pytest.raises(ValueError):  # 6 bytes hold 9..16 codes, not 8
        unpack_bits(torch.zeros(1, 6, dtype=torch.uint8), 3, 8)


# --------------------------------------------------------------------------------------------------------------
# Quantization schemes: stored layout, exact decoding, error bounds, mse <= rtn
# --------------------------------------------------------------------------------------------------------------

SCHEME_KINDS = [("int", b, s) for b in (2, 3, 4, 5, 6, 8) for s in (False, True)] + [
    ("nf4", 4, False),
    ("fp4", 4, False),
    ("fp8", 8, False),
]
GROUPS = (32, 64, 128, 256, -1)

# Upper bounds of the RTN relative reconstruction error ||W - W_hat|| / ||W|| on Gaussian weights, for small
# groups (32, 64) and large ones (128, 256, per channel). Measured values (48x200 and 3x40x96 weights, double
# quantization on and off) with ~15% margin; 4-bit asymmetric at group 64 measures 0.090.
RTN_BOUNDS = {
    ("int", 2, False): (0.53, 0.62),
    ("int", 2, True): (0.60, 0.69),
    ("int", 3, False): (0.23, 0.27),
    ("int", 3, True): (0.26, 0.30),
    ("int", 4, False): (0.105, 0.125),
    ("int", 4, True): (0.12, 0.14),
    ("int", 5, False): (0.052, 0.061),
    ("int", 5, True): (0.059, 0.068),
    ("int", 6, False): (0.026, 0.030),
    ("int", 6, True): (0.029, 0.034),
    ("int", 8, False): (0.0064, 0.0075),
    ("int", 8, True): (0.0072, 0.0084),
    ("nf4", 4, False): (0.106, 0.116),
    ("fp4", 4, False): (0.121, 0.13),
    ("fp8", 8, False): (0.029, 0.031),
}
# Upper bounds of the int2 mse-method error (small groups, large groups), by symmetric: measured + ~15%.
MSE_INT2_BOUNDS = {False: (0.48, 0.58), True: (0.52, 0.61)}
SHAPES = ((48, 200), (3, 40, 96))  # in_features not divisible by most group sizes; 3-D = fused experts


def make_scheme(kind, group_size, double_quant, method) -> QuantScheme:
    fmt, bits, sym = kind
    return QuantScheme(format=fmt, bits=bits, symmetric=sym, group_size=group_size, method=method,
                       double_quant=double_quant)


def independent_decode(scheme: QuantScheme, params, in_features: int) -> torch.Tensor:
    """Plain decoding of unpacked (codes, scale, zero), written from the layout spec."""
    codes, scale, zero = params.codes, params.scale, params.zero
    g = in_features if scheme.group_size == -1 else scheme.group_size
    n_groups = scale.shape[-1]
    assert n_groups == math.ceil(in_features / g)
    assert codes.shape[-1] == in_features
    codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], n_groups * g - in_features)], -1)
    q = codes.reshape(*codes.shape[:-1], n_groups, g)
    if scheme.format == "int":
        if scheme.symmetric:
            assert zero is None
            z = torch.full_like(scale, 2.0 ** (scheme.bits - 1))
        else:
            z = zero
        w = (q.float() - z[..., None]) * scale[..., None]
    else:
        assert zero is None
        w = reference_table(scheme.format)[q.long()] * scale[..., None]
    return w.reshape(*codes.shape[:-1], n_groups * g)[..., :in_features]


def representable_values(scheme: QuantScheme, scale, zero) -> torch.Tensor:
    """Every value a group can decode to, [..., n_groups, n_codes] in float64 (NaN codes excluded)."""
    if scheme.format == "int":
        z = torch.full_like(scale, 2.0 ** (scheme.bits - 1)) if zero is None else zero
        c = torch.arange(1 << scheme.bits, dtype=torch.float64)
        return (c - z.double()[..., None]) * scale.double()[..., None]
    table = reference_table(scheme.format).double()
    table = table[~table.isnan()]
    return table * scale.double()[..., None]


def check_stored(scheme: QuantScheme, weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Layout, exact decoding and nearest rounding of one quantized weight; returns the dequantized weight."""
    shape = tuple(weight.shape)
    in_features = shape[-1]
    specs = tensor_specs(scheme, shape)
    assert set(tensors) == set(specs)
    expected_names = {"qweight", "scales"} | ({"zeros"} if scheme.has_zero else set())
    if scheme.double_quant:
        expected_names |= {f"{n}_dq" for n in expected_names - {"qweight"}}
    assert set(specs) == expected_names
    for name, (shp, dtype) in specs.items():
        assert tuple(tensors[name].shape) == shp, name
        assert tensors[name].dtype == dtype, name
    g = in_features if scheme.group_size == -1 else scheme.group_size
    n_groups = math.ceil(in_features / g)
    # Exactly `bits` per stored weight: the short last group (in_features % group_size) is not padded on disk.
    assert specs["qweight"][0] == (*shape[:-1], math.ceil(in_features / 8) * scheme.bits)
    assert specs["scales"][0] == (*shape[:-1], n_groups)

    params = unpack(scheme, tensors, in_features)
    # Scales / zero-points as stored: float16, or 8-bit codes * step + offset per block of 64 (decoded here
    # independently of `dq_decode`).
    for name, value in (("scales", params.scale), ("zeros", params.zero)):
        if name not in tensors:
            continue
        if scheme.double_quant:
            codes = tensors[name].reshape(-1).float()
            meta = tensors[f"{name}_dq"].float()
            block = torch.arange(codes.numel()) // DQ_BLOCK
            expected = (codes * meta[block, 0] + meta[block, 1]).reshape(tensors[name].shape)
        else:
            expected = tensors[name].float()
        assert torch.equal(value, expected), name
    assert (params.scale > 0).all()

    w_hat = dequantize(scheme, tensors, in_features)
    assert w_hat.dtype == torch.float32 and w_hat.shape == weight.shape
    assert torch.equal(w_hat, independent_decode(scheme, params, in_features))
    assert torch.isfinite(w_hat).all()
    if scheme.format == "fp8":
        assert not torch.isin(params.codes, torch.tensor(FP8_NAN_CODES, dtype=torch.uint8)).any()

    # Every weight decodes to the nearest value its group can represent (codes chosen against stored scales).
    values = representable_values(scheme, params.scale, params.zero)  # [..., n_groups, n_codes]
    w_g = weight.double()
    pad = n_groups * g - in_features
    w_g = torch.nn.functional.pad(w_g, (0, pad)).reshape(*shape[:-1], n_groups, g)
    best = (w_g[..., None] - values[..., None, :]).abs().amin(-1).reshape(*shape[:-1], -1)[..., :in_features]
    chosen = (w_hat.double() - weight.double()).abs()
    slack = 1e-4 * params.scale.double().repeat_interleave(g, -1)[..., :in_features]
    assert (chosen <= best + slack).all(), (chosen - best).max()
    return w_hat


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("group_size", GROUPS, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("kind", SCHEME_KINDS, ids=lambda k: f"{k[0]}{k[1] if k[0] == 'int' else ''}{'-sym' * k[2]}")
def test_quantize_scheme(kind, group_size, double_quant):
    small, large = RTN_BOUNDS[kind]
    bound = small if group_size in (32, 64) else large
    for shape_i, shape in enumerate(SHAPES):
        gen = torch.Generator().manual_seed(zlib.crc32(repr((kind, group_size, double_quant, shape_i)).encode()))
        weight = torch.randn(shape, generator=gen) * 0.02
        errs = {}
        for method in ("rtn", "mse"):
            scheme = make_scheme(kind, group_size, double_quant, method)
            params = quantize_params(weight, scheme)
            tensors = pack(scheme, params)  # == quantize_weight (test_quantize_weight_is_pack_of_params)
            # The stored scales/zeros are exactly the ones the codes were chosen against (double quantization must
            # not re-round them differently when packing).
            scale, zero = decode_params(scheme, tensors)
            assert torch.equal(scale, params.scale)
            if scheme.has_zero:
                assert torch.equal(zero, params.zero)
            w_hat = check_stored(scheme, weight, tensors)
            errs[method] = rel_err(w_hat, weight)
        assert errs["rtn"] < bound, errs
        # The data-free error-minimising search must never be worse than round-to-nearest ...
        assert errs["mse"] <= errs["rtn"] * (1 + 1e-6), errs
        # ... and at 2 bits it must clearly help. With integer zero-points and no weight's error above its
        # unclipped-range error (the L-inf guard), the measured mse/rtn ratio is 0.892-0.920 asymmetric and
        # 0.873-0.937 symmetric, i.e. >= 6.3% better; the bound asks for >= 5.5% (15% margin on the gain). The
        # int2 mse errors themselves measure <= 0.412 / 0.498 (asymmetric, small / large groups) and
        # <= 0.451 / 0.531 (symmetric), bounded with ~15% margin.
        if kind[1] == 2:
            assert errs["mse"] < 0.945 * errs["rtn"], errs
            assert errs["mse"] < MSE_INT2_BOUNDS[kind[2]][group_size not in (32, 64)], errs


def test_quantize_weight_is_pack_of_params():
    gen = torch.Generator().manual_seed(21)
    w = torch.randn(2, 24, 200, generator=gen)
    for kind in (("int", 3, False), ("int", 4, True), ("nf4", 4, False), ("fp8", 8, False)):
        for dq in (False, True):
            scheme = make_scheme(kind, 64, dq, "mse")
            tensors = quantize_weight(w, scheme)
            expected = pack(scheme, quantize_params(w, scheme))
            assert set(tensors) == set(expected)
            for name in tensors:
                assert torch.equal(tensors[name], expected[name]), (kind, dq, name)


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "fp8"])
def test_codebook_rounding_is_nearest(fmt):
    """On codebooks, every chosen code is the brute-force argmin over the whole table (given the group scale),
    including values near 0, near the ends of the range and exactly at the scale."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(64, 256, generator=gen)
    w[:, :8] = torch.randn(64, 8, generator=gen) * 1e-6  # tiny values of both signs
    w[:, 8] = -w.abs().amax(1) * 1.0001  # the group's absmax on the negative side
    scheme = QuantScheme(format=fmt, bits=4 if fmt != "fp8" else 8, group_size=64, method="rtn")
    params = quantize_params(w, scheme)
    table = reference_table(fmt).double()
    valid = ~table.isnan()
    s = params.scale.double().repeat_interleave(64, -1)
    cand = torch.where(valid, table, torch.full_like(table, math.inf))
    err_all = (w.double()[..., None] - cand * s[..., None]).abs()
    best = err_all.amin(-1)
    chosen = err_all.gather(-1, params.codes.long()[..., None])[..., 0]
    assert torch.isfinite(chosen).all()  # no NaN code was ever chosen
    assert (chosen <= best + 1e-6 * s).all()


def test_fp8_never_stores_nan_codes():
    """Tiny negative weights round to -0, not to the E4M3 NaN pattern 0xFF (which other readers decode as NaN)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=gen)
    w[:, :16] = -1e-9
    w[:, 16:32] = 1e-9
    scheme = QuantScheme(format="fp8", bits=8, group_size=64, method="rtn")
    tensors = quantize_weight(w, scheme)
    codes = unpack_bits(tensors["qweight"], 8, 64)
    assert not torch.isin(codes, torch.tensor(FP8_NAN_CODES, dtype=torch.uint8)).any()
    native = codes.view(torch.float8_e4m3fn).float() * tensors["scales"].float()
    assert torch.isfinite(native).all()
    assert torch.equal(native, dequantize(scheme, tensors, 64))


def test_symmetric_rtn_has_no_zero_and_is_odd():
    """Symmetric int stores no zero-point and decodes -w to -w_hat up to one step (codes centred on 2**(b-1))."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(8, 128, generator=gen)
    scheme = QuantScheme(bits=4, symmetric=True, group_size=64, method="rtn")
    t = quantize_weight(w, scheme)
    assert "zeros" not in t
    t_neg = quantize_weight(-w, scheme)
    assert torch.equal(t["scales"], t_neg["scales"])
    step = t["scales"].float().repeat_interleave(64, -1)
    assert ((dequantize(scheme, t, 128) + dequantize(scheme, t_neg, 128)).abs() <= step * 1.0001).all()


def test_quantize_is_deterministic_and_row_independent():
    """Rows are quantized independently (chunking must not leak between rows) and repeatably."""
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(20, 200, generator=gen)
    scheme = QuantScheme(bits=4, group_size=64, method="mse")
    full = quantize_params(w, scheme)
    again = quantize_params(w.clone(), scheme)
    part = quantize_params(w[5:9], scheme)
    assert torch.equal(full.codes, again.codes) and torch.equal(full.scale, again.scale)
    assert torch.equal(full.codes[5:9], part.codes)
    assert torch.equal(full.scale[5:9], part.scale)
    assert torch.equal(full.zero[5:9], part.zero)


@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_zero_and_constant_weights(method):
    """All-zero, constant and narrow-range groups quantize without inf/NaN (also for their neighbours in a
    double-quant block), decode close to exactly, and scales stay > 0."""
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(8, 128, generator=gen) * 0.05
    w[0] = 0
    w[1] = 0.5
    w[2, :64] = -3.0
    w[3] = 5.0  # a constant >= 4 used to get zero-point -w/tiny: -inf in float16
    w[4, 64:] = -100.0
    w[5] = torch.linspace(2.0, 2.01, 128)  # all positive, range << |mean|
    for kind in SCHEME_KINDS:
        for dq in (False, True):
            scheme = make_scheme(kind, 64, dq, method)
            t = quantize_weight(w, scheme)
            w_hat = dequantize(scheme, t, 128)
            assert torch.isfinite(w_hat).all(), (kind, dq)
            scale, zero = decode_params(scheme, t)
            assert (scale > 0).all(), (kind, dq)
            if scheme.has_zero:  # zero-points within the code range
                assert (zero >= -0.5).all() and (zero <= (1 << scheme.bits) - 0.5).all(), (kind, dq)
            assert (w_hat[0] == 0).all(), (kind, dq)  # exact zeros stay exact
            # constant groups: error well below one quantization step of the value's magnitude
            err = (w_hat - w).abs().amax(-1) / w.abs().amax(-1).clamp_min(1e-12)
            bound = 1.05 / (1 << (kind[1] - 1)) if kind[0] == "int" else 0.15
            # With double_quant an 8-bit affine code per block of 64 scales cannot resolve scales 100-1000x smaller
            # than the block's largest (inherent to the format): only the largest group keeps its accuracy there.
            rows = [4] if dq else [1, 2, 3, 4, 5]
            assert (err[rows] <= bound).all(), (kind, dq, err)
            if not dq:  # the Gaussian rows are unharmed by their neighbours
                assert rel_err(w_hat[6:], w[6:]) < 1.2 * RTN_BOUNDS[kind][0], (kind, dq)


# --------------------------------------------------------------------------------------------------------------
# Storage cost
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme, shape, expected",
    [
        (QuantScheme(bits=4, group_size=128), (256, 1024), 4 + 32 / 128),  # codes + fp16 scale + fp16 zero
        (QuantScheme(bits=4, group_size=128, symmetric=True), (256, 1024), 4 + 16 / 128),
        # double quant: 8-bit scale and zero codes per group, plus one fp16 (step, offset) per 64 of each
        (QuantScheme(bits=4, group_size=128, double_quant=True), (256, 1024), 4 + 16 / 128 + 2 * 32 / (64 * 128)),
        (QuantScheme(bits=4, group_size=128, symmetric=True, double_quant=True), (256, 1024),
         4 + 8 / 128 + 32 / (64 * 128)),
        (QuantScheme(bits=3, group_size=128, symmetric=True), (256, 1024), 3 + 16 / 128),  # exactly 3 bits
        (QuantScheme(bits=3, group_size=128), (256, 1024), 3 + 32 / 128),
        (QuantScheme(bits=2, group_size=64), (4, 64, 512), 2 + 32 / 64),  # 3-D expert tensor
        (QuantScheme(bits=5, group_size=32, symmetric=True), (64, 256), 5 + 16 / 32),
        (QuantScheme(bits=8, group_size=-1, symmetric=True), (64, 1024), 8 + 16 / 1024),
        (QuantScheme(format="nf4", group_size=64), (64, 1024), 4 + 16 / 64),
        (QuantScheme(format="fp8", bits=8, group_size=128), (64, 1024), 8 + 16 / 128),
        # short last group: 200 inputs in 2 groups (128 + 72) -> 200 3-bit codes = 75 bytes/row, + 2 scales + 2 zeros
        (QuantScheme(bits=3, group_size=128), (10, 200), (75 * 8 + 4 * 16) / 200),
        (QuantScheme(bits=5, group_size=64, symmetric=True), (10, 100), (65 * 8 + 2 * 16) / 100),
    ],
    ids=lambda v: str(v) if not isinstance(v, QuantScheme) else None,
)
def test_bits_per_weight(scheme, shape, expected):
    assert bits_per_weight(scheme, shape) == pytest.approx(expected, rel=1e-12)
    # ... and it agrees with what quantize_weight actually stores.
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    tensors = quantize_weight(w, dataclasses.replace(scheme, method="rtn"))
    stored = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    assert stored / w.numel() == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Double quantization
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("magnitude", [1e-4, 3e-3, 0.05, 2.0])
def test_double_quant_round_trip(n, magnitude):
    gen = torch.Generator().manual_seed(n * 7 + int(magnitude * 1e4))
    values = magnitude * (0.2 + 2.8 * torch.rand(n, generator=gen))  # scale-like: positive, 15x spread
    codes, meta = dq_encode(values)
    assert codes.dtype == torch.uint8 and codes.shape == values.shape
    assert meta.dtype == torch.float16 and meta.shape == (math.ceil(n / DQ_BLOCK), 2)
    decoded = dq_decode(codes, meta)
    assert decoded.shape == values.shape and decoded.dtype == torch.float32
    assert (decoded > 0).all()
    # Per block: within half a step of the input (the step covers the block's range in 255 steps); values
    # below the float16-rounded offset are clipped to it.
    pad = (-n) % DQ_BLOCK
    v = torch.nn.functional.pad(values, (0, pad), value=float(values[-1])).view(-1, DQ_BLOCK)
    d = torch.nn.functional.pad(decoded, (0, pad), value=float(decoded[-1])).view(-1, DQ_BLOCK)
    step, offset = meta.float().unbind(1)
    lo, hi = v.min(1).values, v.max(1).values
    # The step spans the block's range in 255 steps, up to float16 rounding (2**-24 apart below 2**-14).
    fp16_ulp = torch.maximum(step * 2.0**-10, torch.full_like(step, 2.0**-24))
    varied = hi > lo
    assert (step[varied] * 255 <= (hi - lo + 2 * (offset - lo).abs())[varied] + 2 * 255 * fp16_ulp[varied]).all()
    assert (offset + 255 * step >= hi).all()  # the top of the block is representable
    allowed = 0.5 * step + (offset - lo).clamp_min(0) + 1e-7 * v.abs().amax(1)
    assert ((d - v).abs() <= allowed[:, None]).all()
    assert rel_err(decoded, values) < 0.01
    # Decoding is a fixed point after one more encode (what storage holds is stable).
    assert torch.allclose(dq_decode(*dq_encode(decoded)), decoded, rtol=2e-3, atol=0)


@pytest.mark.parametrize("log_magnitude", [-5, -4, -3, -2, -1, 0, 1])
def test_double_quant_rounding_is_what_pack_stores(log_magnitude):
    """`round_params` (what codes are chosen against) must equal what `pack` stores and decoding returns. One
    encode/decode pass is not idempotent for some blocks (those whose float16 step had to be widened)."""
    gen = torch.Generator().manual_seed(log_magnitude + 100)
    scheme = QuantScheme(bits=4, group_size=64, double_quant=True)
    for _ in range(5):
        spread = float(torch.empty(1).uniform_(0.05, 20, generator=gen))
        scale = 10.0**log_magnitude * (1 + spread * torch.rand(40, 25, generator=gen))
        zero = 15 * torch.rand(40, 25, generator=gen)
        r_scale, r_zero = round_params(scheme, scale, zero)
        tensors = pack(scheme, QuantParams(torch.zeros(40, 64, dtype=torch.uint8), r_scale, r_zero))
        d_scale, d_zero = decode_params(scheme, tensors)
        assert torch.equal(d_scale, r_scale)
        assert torch.equal(d_zero, r_zero)
        assert rel_err(r_scale, scale) < 0.01


def test_double_quant_constant_and_zero_blocks():
    for value in (0.0, 1e-3, 7.0):
        values = torch.full((130,), value)
        codes, meta = dq_encode(values)
        decoded = dq_decode(codes, meta)
        assert torch.allclose(decoded, values, rtol=1e-3, atol=0)


def test_double_quant_scales_positive_on_weights():
    """With double_quant, decoded scales are > 0 for every group, including all-zero and tiny ones."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(40, 256, generator=gen)
    w[3] = 0
    w[4] *= 1e-6
    w[5] *= 1e3
    for kind in SCHEME_KINDS:
        scheme = make_scheme(kind, 32, True, "rtn")
        scale, zero = decode_params(scheme, quantize_weight(w, scheme))
        assert (scale > 0).all(), kind
        assert torch.isfinite(scale).all(), kind
        if zero is not None:
            assert torch.isfinite(zero).all(), kind


# --------------------------------------------------------------------------------------------------------------
# Codebooks
# --------------------------------------------------------------------------------------------------------------


def test_nf4_codebook():
    t = codebook_values("nf4")
    assert t.dtype == torch.float32 and t.shape == (16,)
    assert (t[1:] > t[:-1]).all()  # strictly sorted
    assert t[0] == -1.0 and t[-1] == 1.0
    assert (t.abs() <= 1).all()
    assert (t == 0).sum() == 1
    assert torch.allclose(t, torch.tensor(NF4_REFERENCE), atol=1e-7, rtol=0)
    # Normal-quantile shape: denser near 0 than at the ends.
    gaps = t[1:] - t[:-1]
    assert gaps[6] < gaps[0] and gaps[8] < gaps[-1]


def test_fp4_codebook_is_e2m1():
    t = codebook_values("fp4")
    assert t.shape == (16,)
    expected = torch.tensor([e2m1_decode(c) / 6.0 for c in range(16)])
    assert torch.equal(t, expected)
    e2m1 = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
    assert {round(abs(v) * 6, 5) for v in t.tolist()} == e2m1
    assert t.abs().max() == 1.0
    assert torch.equal(t[8:], -t[:8])  # bit 3 is the sign


def test_fp8_codebook_is_e4m3fn():
    t = codebook_values("fp8")
    assert t.shape == (256,)
    native = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    manual = torch.tensor([e4m3_decode(c) for c in range(256)])
    assert set(torch.nonzero(native.isnan()).flatten().tolist()) == set(FP8_NAN_CODES)
    assert torch.equal(native.isnan(), manual.isnan())
    finite = ~native.isnan()
    assert torch.equal(t[finite], native[finite])
    assert torch.equal(manual[finite], native[finite])
    assert (t[~finite] == 0).all()  # NaN patterns decode to 0, never NaN
    assert t.max() == 448.0 and t.min() == -448.0
    with pytest.raises(ValueError):
        codebook_values("int")


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_raises(bad):
    w = torch.randn(8, 64)
    w[3, 17] = bad
    for scheme in (QuantScheme(bits=4, group_size=32), QuantScheme(format="nf4", group_size=64, method="rtn")):
        with pytest.raises(ValueError, match="NaN|Inf"):
            quantize_weight(w, scheme)


def test_one_dimensional_weight_raises():
    with pytest.raises(ValueError, match="shape"):
        quantize_weight(torch.randn(64), QuantScheme())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"format": "int5"}, "format"),
        ({"format": "NF4"}, "format"),
        ({"bits": 7}, "bits"),
        ({"bits": 1}, "bits"),
        ({"bits": True}, "bits"),
        ({"bits": "4"}, "bits"),
        ({"format": "nf4", "bits": 3}, "bits"),
        ({"format": "fp8", "bits": 4}, "bits"),
        ({"group_size": 48}, "group_size"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": 512}, "group_size"),
        ({"method": "gptq-typo"}, "method"),
        ({"symmetric": "yes"}, "symmetric"),
        ({"symmetric": 1}, "symmetric"),
        ({"double_quant": 1}, "double_quant"),
        ({"double_quant": None}, "double_quant"),
        ({"format": "nf4", "symmetric": True}, "symmetric"),
    ],
)
def test_bad_scheme_fields_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantScheme(**kwargs)


def test_good_schemes_accepted():
    for kind in SCHEME_KINDS:
        for g in GROUPS:
            s = make_scheme(kind, g, True, "mse")
            assert s.has_zero == (kind[0] == "int" and not kind[2])
            assert QuantScheme(**s.to_dict()) == s
