"""A format is one object: this file registers a hypothetical one ("sign", 1 bit per weight times a per-group scale,
XNOR-Net style) from a test, touching no hf_quant file, and runs it through everything a built-in format goes
through: scheme and config validation, quantize-on-load, the packed forward (reference kernel), save and reload
with the checkpoint checks, storage accounting, dequantize, and GPTQ calibration with its own rounding step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_quant import HfQuantConfig, QuantLinear
from hf_quant.eval.storage import checkpoint_storage, model_storage
from hf_quant.formats import (
    Format,
    QuantScheme,
    bits_per_weight,
    dequantize,
    format_names,
    quantize,
    register_format,
    unregister_format,
)
from hf_quant.formats.packing import pack_bits, packed_length, unpack_bits
from hf_quant.solvers.gptq import gptq_blockwise

TINY = torch.finfo(torch.float16).tiny


class SignFormat(Format):
    """w = scale[group] * (+1 if bit else -1), scale = the group's mean |w| (the l2-optimal scale for fixed signs)."""

    name = "sign"
    bits = (1,)

    def specs(self, scheme, shape):
        *lead, out, in_features = shape
        n_groups = scheme.group_layout(in_features)[1]
        return {"qweight": ((*lead, out, packed_length(in_features, 1)), torch.uint8),
                "scales": ((*lead, out, n_groups), torch.float16)}

    def dequantize(self, scheme, tensors, in_features):
        g = scheme.group_layout(in_features)[0]
        signs = unpack_bits(tensors["qweight"], 1, in_features).float() * 2 - 1
        return signs * tensors["scales"].float().repeat_interleave(g, -1)[..., :in_features]

    def value_checks(self, scheme, tensors, shape):
        s = tensors["scales"].float()
        return [("scales", s, torch.isfinite(s) & (s > 0), "finite and > 0")]

    def _scales(self, weight, scheme):
        in_features = weight.shape[-1]
        g, n_groups, padded = scheme.group_layout(in_features)
        absw = torch.nn.functional.pad(weight.abs().float(), (0, padded - in_features))
        counts = torch.tensor([min(g, in_features - i * g) for i in range(n_groups)], dtype=torch.float32)
        mean = absw.view(*weight.shape[:-1], n_groups, g).sum(-1) / counts
        return mean.clamp(TINY, 65504).half()

    def quantize(self, weight, scheme):
        return {"qweight": pack_bits((weight >= 0).to(torch.uint8), 1), "scales": self._scales(weight, scheme)}

    def gptq(self, weight, hessian, scheme, settings):
        scales = self._scales(weight, scheme)
        g = scheme.group_layout(weight.shape[1])[0]
        bits = torch.zeros(weight.shape, dtype=torch.uint8)

        def round_block(j, x, metric):  # width 1: the nearest of +-scale
            s = scales[:, j // g].float()
            bits[:, j] = (x[:, 0] >= 0).to(torch.uint8)
            return (torch.where(x[:, 0] >= 0, s, -s)).unsqueeze(1)

        gptq_blockwise(weight.float(), hessian, 1, round_block, damp=settings.damp, act_order=settings.act_order)
        return {"qweight": pack_bits(bits, 1), "scales": scales}


@pytest.fixture
def sign_format():
    fmt = register_format(SignFormat())
    try:
        yield fmt
    finally:
        unregister_format("sign")


def test_registering_a_format_makes_it_a_choice_everywhere(sign_format):
    assert "sign" in format_names()
    scheme = QuantScheme(format="sign", bits=1, group_size=32)
    assert scheme.codec is sign_format and scheme.label == "sign"
    config = HfQuantConfig(format="sign", group_size=64)  # bits default: the format's own width
    assert config.bits == 1 and config.default_scheme.format == "sign"
    mixed = HfQuantConfig(bits=4, overrides={"down_proj": {"format": "sign"}})
    assert mixed.scheme_for("model.layers.0.mlp.down_proj").bits == 1
    with pytest.raises(ValueError, match="does not fit format='sign'"):
        QuantScheme(format="sign", bits=4)
    with pytest.raises(ValueError, match="double_quant=True does not apply to format='sign'"):
        QuantScheme(format="sign", bits=1, double_quant=True)


def test_an_unregistered_format_is_refused_with_the_choices():
    assert "sign" not in format_names()
    with pytest.raises(ValueError, match=r"format must be one of \['int', 'nf4', 'fp4', 'fp8', 'ternary', 'vq', 'kquant'\]"):
        HfQuantConfig(format="sign")


def test_format_coding_against_its_plain_definition(sign_format):
    torch.manual_seed(0)
    w = torch.randn(3, 40, 100)  # stacked (experts) and a short last group
    scheme = QuantScheme(format="sign", bits=1, group_size=32)
    tensors = quantize(w, scheme)
    expected = torch.empty_like(w)
    for c0 in range(0, 100, 32):
        block = w[..., c0 : c0 + 32]
        expected[..., c0 : c0 + 32] = torch.where(block >= 0, 1.0, -1.0) * block.abs().mean(-1, keepdim=True).half().float()
    torch.testing.assert_close(dequantize(scheme, tensors, 100), expected, rtol=0, atol=0)
    assert bits_per_weight(scheme, (3, 40, 100)) == pytest.approx((3 * 40 * (13 * 8 + 4 * 16)) / (3 * 40 * 100))


def test_a_registered_format_quantizes_saves_and_reloads_a_model(sign_format, tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float",
                                                 quantization_config=HfQuantConfig(format="sign", group_size=32,
                                                                                   lm_head="float"))
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]  # the blocks' linears (head kept float)
    assert len(linears) == 2 * 7 and all(m.scheme.format == "sign" for m in linears)
    assert "sign, g32" in repr(linears[0]) and linears[0].kernel_name() == "reference"
    x = torch.randn(5, 64)
    q = linears[0]
    torch.testing.assert_close(q(x), x @ q.dequantize_weight().t(), rtol=1e-5, atol=1e-5)

    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "sign")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sign")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    assert checkpoint_storage(tmp_path / "sign").bits_per_weight == pytest.approx(model_storage(model).bits_per_weight)
    assert {m.format for m in checkpoint_storage(tmp_path / "sign").modules} == {"sign g32"}


def test_gptq_drives_a_registered_format_rounding(sign_format):
    """GPTQ's error feedback through the format's own rounding step lowers the output error on held-out inputs."""
    torch.manual_seed(0)
    mix = torch.randn(96, 96) / 96**0.5 + torch.eye(96)  # correlated inputs, where error feedback pays
    x_cal, x_test = torch.randn(2048, 96) @ mix, torch.randn(1024, 96) @ mix
    weight = torch.randn(48, 96)
    scheme = QuantScheme(format="sign", bits=1, group_size=32, method="gptq")

    def output_error(tensors):
        return float((x_test @ (dequantize(scheme, tensors, 96) - weight).t()).pow(2).mean())

    calibrated = quantize(weight, scheme, hessian=x_cal.t() @ x_cal / x_cal.shape[0])
    assert output_error(calibrated) < 0.9 * output_error(quantize(weight, scheme))
