"""format="kquant": hf_quant weights whose codes are llama.cpp's Q4_K / Q5_K / Q6_K super-blocks. The GGUF blocks
we pack decode in gguf-py to exactly hf_quant's weights (random blocks at awkward shapes, and whole tiny models
quantized data-free and with GPTQ, saved, reloaded and exported); the data-free fit beats a plain implementation of
llama.cpp's own K-quant recipe in weight error; bad settings and shapes are refused naming the field or module and
the fix; targets without K-quant blocks refuse them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import test_export_gguf as gg
from hf_quant import HfQuantConfig
from hf_quant.export import ExportRefusedModules, export
from hf_quant.export.gguf import pack_k_blocks
from hf_quant.formats import GPTQSettings, QuantScheme, dequantize, pack_bits, quantize, tensor_specs
from hf_quant.formats.kquant import LAYOUTS, decode
from hf_quant.formats.packing import unpack_bits
from hf_quant.nn import PackedWeight
from tiny_families import VOCAB, byte_level_tokenizer, tiny_family

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {4: "Q4_K", 5: "Q5_K", 6: "Q6_K"}
TEXTS = ["The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 6,
         "Quantization maps each weight to a small set of values; calibration shows which errors matter. " * 6]


def scheme(bits, **kw):
    return QuantScheme(format="kquant", bits=bits, group_size=256, **kw)


def gguf_decode(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(blocks.numpy(), qtype)))


def blocks_of(bits, tensors, in_features):
    codes = unpack_bits(tensors["qweight"], bits, in_features)
    return pack_k_blocks(KINDS[bits], codes, tensors["d"], tensors["scales"], tensors.get("dmin"), tensors.get("mins"))


@pytest.mark.parametrize("bits", [4, 5, 6])
@pytest.mark.parametrize("shape", [(3, 256), (17, 768)])
def test_random_blocks_decode_bit_for_bit_in_gguf(bits, shape):
    """Random codes and block parameters (every code value, negative Q6_K scales, float16 d of all magnitudes):
    the canonical tensors decode (hf_quant) to exactly what gguf-py decodes from our packed blocks."""
    g = torch.Generator().manual_seed(100 * bits + shape[0])
    out, n = shape
    specs = tensor_specs(scheme(bits), shape)
    tensors = {}
    for name, (shp, dtype) in specs.items():
        if dtype == torch.float16:
            tensors[name] = (2.0 ** torch.randint(-20, 2, shp, generator=g) * torch.rand(shp, generator=g)).half()
        elif dtype == torch.int8:
            tensors[name] = torch.randint(-128, 128, shp, generator=g).to(torch.int8)
        elif name == "qweight":
            codes = torch.randint(0, 1 << bits, (out, n), generator=g).to(torch.uint8)
            tensors[name] = pack_bits(codes, bits)
        else:
            tensors[name] = torch.randint(0, 64, shp, generator=g).to(torch.uint8)
        assert tuple(tensors[name].shape) == shp
    ours = dequantize(scheme(bits), tensors, n)
    blocks = blocks_of(bits, tensors, n)
    assert blocks.shape == (out, n // 256 * gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, KINDS[bits])][1])
    assert torch.equal(gguf_decode(blocks, KINDS[bits]), ours)
    # the plain definition of each block type, written out
    lay = LAYOUTS[bits]
    q = codes.float().view(out, -1, lay.n_sub, lay.sub)
    step = (tensors["d"].float()[..., None] * tensors["scales"].float())[..., None]
    if lay.affine:
        plain = step * q - (tensors["dmin"].float()[..., None] * tensors["mins"].float())[..., None]
    else:
        plain = step * (q - 32)
    assert torch.equal(plain.reshape(out, n), ours)


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_quantized_weights_round_trip_and_decode_in_gguf(bits):
    g = torch.Generator().manual_seed(7 + bits)
    w = torch.randn(2, 5, 512, generator=g) * 0.02  # stacked (experts): each expert coded on its own
    s = scheme(bits)
    tensors = quantize(w, s)
    assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == tensor_specs(s, (2, 5, 512))
    whole = dequantize(s, tensors, 512)
    for e in range(2):
        own = quantize(w[e], s)
        assert all(torch.equal(own[k], tensors[k][e]) for k in own)
        assert torch.equal(gguf_decode(blocks_of(bits, own, 512), KINDS[bits]), whole[e])
    # codes are re-rounded against the decoded scales: no single code change lowers a weight's error
    lay = LAYOUTS[bits]
    codes = unpack_bits(tensors["qweight"], bits, 512).long()
    err = (whole - w).abs()
    for delta in (-1, 1):
        moved = (codes + delta).clamp(0, lay.nmax).to(torch.uint8)
        other = decode(bits, moved, tensors["d"], tensors["scales"], tensors.get("dmin"), tensors.get("mins"))
        assert bool(((other - w).abs() >= err - 1e-7).all())
    for name, values, valid, _ in s.codec.value_checks(s, tensors, (2, 5, 512)):
        assert bool(valid.all()), name


@pytest.mark.parametrize("bits", [4, 6])
def test_value_checks_refuse_what_hf_quant_never_writes(bits):
    """A checkpoint is untrusted input: out-of-range scale/min codes and non-finite or negative d are flagged."""
    s = scheme(bits)
    good = quantize(torch.randn(2, 256, generator=torch.Generator().manual_seed(bits)), s)
    bad_values = {"d": [float("inf"), float("nan"), -1.0]}
    if LAYOUTS[bits].affine:
        bad_values.update(dmin=[float("inf"), -0.5], scales=[64, 255], mins=[64])
    for name, values in bad_values.items():
        for value in values:
            tensors = {k: t.clone() for k, t in good.items()}
            tensors[name].view(-1)[1] = value
            failed = {n for n, _, valid, _ in s.codec.value_checks(s, tensors, (2, 256)) if not bool(valid.all())}
            assert failed == {name}, (name, value)


# --- llama.cpp's recipe (ggml-quants.c: quantize_row_q4_K_ref / q5_K_ref / q6_K_ref), written out plainly ---------


def _make_qkx2(x, nmax, rmin, nstep):
    """make_qkx2_quants per sub-block x [..., 32], weights av_x + |x|: (scale, -min, codes)."""
    wt = (x.pow(2).mean(-1, keepdim=True)).sqrt() + x.abs()
    hi = x.amax(-1, keepdim=True)
    mn = x.amin(-1, keepdim=True).clamp_max(0)
    flat = hi == mn
    hi = torch.where(flat, mn + 1, hi)
    sw, sx = wt.sum(-1, keepdim=True), (wt * x).sum(-1, keepdim=True)
    scale = (hi - mn) / nmax
    L = torch.round((x - mn) * (nmax / (hi - mn))).clamp(0, nmax)
    best = (wt * (scale * L + mn - x).pow(2)).sum(-1, keepdim=True)
    for k in range(nstep + 1):
        # (llama.cpp rounds each candidate against the min of the best candidate so far)
        La = torch.round((x - mn) * ((rmin + 0.1 * k + nmax) / (hi - mn))).clamp(0, nmax)
        sl, sl2, sxl = ((wt * v).sum(-1, keepdim=True) for v in (La, La * La, La * x))
        D = sw * sl2 - sl * sl
        Ds = torch.where(D > 0, D, torch.ones_like(D))
        ts, tm = (sw * sxl - sx * sl) / Ds, (sl2 * sx - sl * sxl) / Ds
        pos = tm > 0
        ts = torch.where(pos, sxl / sl2.clamp_min(1e-30), ts)
        tm = torch.where(pos, torch.zeros_like(tm), tm)
        err = (wt * (ts * La + tm - x).pow(2)).sum(-1, keepdim=True)
        better = (D > 0) & (err < best)
        best = torch.where(better, err, best)
        scale, mn, L = torch.where(better, ts, scale), torch.where(better, tm, mn), torch.where(better, La, L)
    return torch.where(flat, torch.zeros_like(scale), scale).squeeze(-1), -mn.squeeze(-1), L


def llama_cpp_recipe(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The dequantized weight llama.cpp's reference K-quant quantizer gives (float32 rows, in a multiple of 256)."""
    rows, n = w.shape
    if bits in (4, 5):
        nmax, rmin, nstep = (15, -1.0, 20) if bits == 4 else (31, -0.5, 15)
        x = w.reshape(rows, -1, 8, 32)
        scale, mins, L = _make_qkx2(x, nmax, rmin, nstep)
        max_s, max_m = scale.amax(-1, keepdim=True), mins.amax(-1, keepdim=True)
        ls = torch.round(torch.where(max_s > 0, 63 / max_s, torch.zeros_like(max_s)) * scale).clamp_max(63)
        lm = torch.round(torch.where(max_m > 0, 63 / max_m, torch.zeros_like(max_m)) * mins).clamp_max(63)
        dd = ((max_s / 63).half().float() * ls)[..., None]
        dm = ((max_m / 63).half().float() * lm)[..., None]
        safe = torch.where(dd != 0, dd, torch.ones_like(dd))
        L = torch.where(dd != 0, torch.round((x + dm) / safe).clamp(0, nmax), L)
        return (dd * L - dm).reshape(rows, n)
    x = w.reshape(rows, -1, 16, 16)  # make_qx_quants(16, 32, x, L, rmse_type=1): weights x^2
    top = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    top = torch.where(top == 0, torch.ones_like(top), top)
    scale, best = torch.zeros_like(top), torch.full_like(top, -1.0)
    for k in [0] + [k for k in range(-9, 10) if k]:
        c = torch.round(x * (-(32 + 0.1 * k) / top)).clamp(-32, 31)
        sx, s2 = (x.pow(2) * x * c).sum(-1, keepdim=True), (x.pow(2) * c * c).sum(-1, keepdim=True)
        cand = torch.where(s2 > 0, sx / s2.clamp_min(1e-30), torch.zeros_like(s2))
        better = (k == 0) | ((s2 > 0) & (sx * sx > best * s2))
        scale, best = torch.where(better, cand, scale), torch.where(better, cand * sx, best)
    scale = scale.squeeze(-1)
    max_scale = scale.gather(-1, scale.abs().argmax(-1, keepdim=True))
    iscale = -128 / torch.where(max_scale == 0, torch.ones_like(max_scale), max_scale)
    dd = ((1 / iscale).half().float() * torch.round(iscale * scale).clamp_max(127))[..., None]
    c = torch.round(x / torch.where(dd != 0, dd, torch.ones_like(dd))).clamp(-32, 31)
    return (dd * c).reshape(rows, n)


def _mse(a, b):
    return float((a - b).pow(2).mean())


@pytest.mark.parametrize("bits", [4, 5, 6])
@pytest.mark.parametrize("dist", ["normal", "student-t"])
def test_weight_error_beats_llama_cpp_recipe_and_rtn(bits, dist):
    g = torch.Generator().manual_seed(bits * 31 + len(dist))
    w = torch.randn(96, 1024, generator=g)
    if dist == "student-t":  # heavy tails, as LLM weights have
        w = w / (torch.rand(96, 1024, generator=g).clamp_min(1e-3) ** 0.25)
    w = w * 0.02
    ours = _mse(dequantize(scheme(bits), quantize(w, scheme(bits)), 1024), w)
    llama = _mse(llama_cpp_recipe(w, bits), w)
    assert ours <= 0.99 * llama, (ours, llama)  # measured 0.89-0.94x
    rtn = QuantScheme(bits=bits, group_size=256, method="rtn")
    assert ours < 0.7 * _mse(dequantize(rtn, quantize(w, rtn), 1024), w)


def test_gptq_lowers_output_error_and_keeps_the_block_parameters():
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(512, 512, generator=g) / 512**0.5 + torch.eye(512)
    x_cal, x_test = torch.randn(2048, 512, generator=g) @ mix, torch.randn(1024, 512, generator=g) @ mix
    weight = torch.randn(24, 512, generator=g) * 0.02
    for bits in (4, 6):
        s = scheme(bits, method="gptq")
        free = quantize(weight, s)
        calibrated = quantize(weight, s, hessian=x_cal.t() @ x_cal / x_cal.shape[0], settings=GPTQSettings())
        assert all(torch.equal(free[k], calibrated[k]) for k in free if k != "qweight")  # static groups
        errors = [float((x_test @ (dequantize(s, t, 512) - weight).t()).pow(2).mean()) for t in (free, calibrated)]
        assert errors[1] < 0.9 * errors[0], errors


# --- settings and shapes ---------------------------------------------------------------------------------------


def test_config_takes_the_fixed_group_size_and_refuses_others():
    assert HfQuantConfig(format="kquant", bits=4).default_scheme.describe() == "q4_k g256"
    mixed = HfQuantConfig(bits=4, group_size=32, overrides={r"down_proj": {"format": "kquant", "bits": 6}})
    assert mixed.scheme_for("model.layers.0.mlp.down_proj").describe() == "q6_k g256"
    with pytest.raises(ValueError, match=r"group_size=32 does not fit format='kquant'.*set group_size=256"):
        HfQuantConfig(format="kquant", group_size=32)
    with pytest.raises(ValueError, match=r"symmetric=True does not apply to format='kquant'.*leave symmetric=False"):
        HfQuantConfig(format="kquant", bits=6, symmetric=True)
    with pytest.raises(ValueError, match=r"bits=3 does not fit format='kquant'.*set bits to 4, 5 or 6"):
        HfQuantConfig(format="kquant", bits=3)


def test_rows_not_a_multiple_of_256_are_refused_naming_module_and_fix(tmp_path):
    with pytest.raises(ValueError, match=r"in_features=300 is not a multiple of 256.*Fix: .*overrides"):
        quantize(torch.randn(4, 300), scheme(4))
    torch.manual_seed(0)
    tiny_family("llama").save_pretrained(tmp_path)  # hidden size 64
    with pytest.raises(ValueError, match=r"model\.layers\.0\.[a-z_.]+\.weight: in_features=64 is not a multiple"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=HfQuantConfig(format="kquant"))


# --- whole models ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama256(tmp_path_factory):
    """A tiny Llama whose linears all have in_features a multiple of 256."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("kquant-llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=False)).save_pretrained(folder)
    byte_level_tokenizer(folder)
    return folder


MIXED = {r"mlp\.down_proj": {"bits": 6}, r"v_proj": {"bits": 5}}


@pytest.mark.parametrize("method", ["mse", "gptq"])
def test_model_saves_reloads_and_exports_bit_exact_gguf(llama256, tmp_path, method):
    calibration = dict(calibration=TEXTS, n_samples=4, seq_len=32) if method == "gptq" else {}
    model = gg.quantize_and_save(llama256, tmp_path / "q", format="kquant", bits=4, method=method, overrides=MIXED,
                                 **calibration)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    report = export(tmp_path / "q", to="gguf", out=tmp_path / "model.gguf")
    assert not report.added_error
    reader, tensors = gg.read_gguf(tmp_path / "model.gguf")
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedWeight)}
    assert len(packed) == 14
    kinds = set()
    for name, module in packed.items():
        t = tensors[names.get_name(name + ".weight", try_suffixes=(".weight",))]
        kind = KINDS[module.scheme.bits]
        kinds.add(kind)
        assert t.tensor_type == getattr(gguf.GGMLQuantizationType, kind), name
        ours = module.dequantize_weight(torch.float32)
        for proj, heads in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)):
            if name.endswith(proj):
                ours = gg.permute_rows(ours, heads)
        assert torch.equal(gg.decoded(t), ours), name
    assert kinds == {"Q4_K", "Q5_K", "Q6_K"}
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_S)


@pytest.mark.parametrize("to", ["compressed-tensors", "gptq"])
def test_targets_without_k_quant_blocks_refuse_them(llama256, tmp_path, to):
    gg.quantize_and_save(llama256, tmp_path / "q", format="kquant", bits=4)
    with pytest.raises(ExportRefusedModules, match=r"no K-quant super-blocks") as info:
        export(tmp_path / "q", to=to, out=tmp_path / "out")
    assert "model.layers.0." in str(info.value) and "export to gguf" in str(info.value)
