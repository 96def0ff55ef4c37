"""GPTQ for the formats below 3 bits (issue 8): the blockwise error-feedback driver, GPTVQ, ternary trit-planes,
and GPTQ codes under sparse outliers and low-rank corrections; single layers on held-out inputs, then a tiny Llama
quantized, saved and reloaded through from_pretrained."""

import pytest
import torch
from extreme_helpers import assert_reload_identical
from test_calibration import CALIBRATION_TEXTS, correlated_inputs, smollm2_tokenizer, tiny_llama  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM

from hf_quant import HfQuantConfig
from hf_quant.algorithms import quantize_weight
from hf_quant.algorithms.gptq import gptq_weight
from hf_quant.algorithms.gptq import gptq_blockwise, gptq_quantize
from hf_quant.formats import QuantScheme, dequantize
from hf_quant.nn import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def output_error(weight, scheme, tensors, x) -> float:
    """Relative squared output error of the stored tensors on inputs x."""
    w_q = dequantize(scheme, tensors, weight.shape[1])
    return float(((x @ (weight - w_q).t()) ** 2).mean() / ((x @ weight.t()) ** 2).mean())


def layer(out_f: int, in_f: int, seed: int = 0):
    torch.manual_seed(seed)
    weight = torch.randn(out_f, in_f)
    x_cal, x_test = correlated_inputs(2048, in_f, 1), correlated_inputs(1024, in_f, 2)
    return weight, x_cal.t() @ x_cal / x_cal.shape[0], x_test


@pytest.mark.parametrize("act_order", [True, False])
def test_blockwise_driver_with_scalar_rounding_reproduces_gptq(act_order):
    """Width-1 blocks rounding to the integer grid of fixed (static) group scales are exactly GPTQ."""
    weight, hessian, _ = layer(24, 96)
    scheme = QuantScheme(bits=3, group_size=32, method="gptq")
    reference = gptq_quantize(weight, hessian, scheme, act_order=act_order, static_groups=True)
    scale, zero = reference.scale, reference.zero
    rounder = scheme.codec.column_rounder(scheme, weight.device)
    codes = torch.empty_like(reference.codes)

    def round_block(j, x, metric):
        q, deq = rounder(x[:, 0], scale[:, j // 32], zero[:, j // 32])
        codes[:, j] = q
        return deq.unsqueeze(1)

    gptq_blockwise(weight, hessian, 1, round_block, act_order=act_order)
    assert torch.equal(codes, reference.codes)


@pytest.mark.parametrize("shape, group", [((96, 256), 64), ((40, 100), 32), ((33, 200), -1)])
@pytest.mark.parametrize("planes", [1, 2])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptvq_beats_data_free_vq_on_held_out_inputs(shape, group, planes, act_order):
    """in=100 and 200: a short last 8-vector (and group); measured 0.1-0.3x the data-free error."""
    weight, hessian, x_test = layer(*shape)
    scheme = QuantScheme(format="vq", bits=8, group_size=group, planes=planes, method="gptq")
    calibrated = gptq_weight(weight, hessian, scheme, act_order=act_order)
    data_free = quantize_weight(weight, QuantScheme(format="vq", bits=8, group_size=group, planes=planes))
    assert calibrated["codebook"].shape == data_free["codebook"].shape
    assert output_error(weight, scheme, calibrated, x_test) < 0.6 * output_error(weight, scheme, data_free, x_test)


@pytest.mark.parametrize("planes, group", [(1, 32), (2, 64), (2, -1)])
def test_gptq_ternary_beats_data_free_on_held_out_inputs(planes, group):
    weight, hessian, x_test = layer(48, 200)
    scheme = QuantScheme(format="ternary", bits=2, group_size=group, planes=planes, method="gptq")
    calibrated = gptq_weight(weight, hessian, scheme)
    data_free = quantize_weight(weight, QuantScheme(format="ternary", bits=2, group_size=group, planes=planes))
    assert torch.equal(calibrated["scales"], data_free["scales"])  # GPTQ re-chooses the trits only
    assert output_error(weight, scheme, calibrated, x_test) < 0.8 * output_error(weight, scheme, data_free, x_test)


@pytest.mark.parametrize("extra", [dict(lowrank_rank=8), dict(outliers_per_row=4),
                                   dict(lowrank_rank=4, outliers_per_row=2)])
def test_gptq_codes_under_additive_terms_beat_data_free(extra):
    weight, hessian, x_test = layer(48, 192)
    scheme = QuantScheme(bits=2, group_size=64, method="gptq", **extra)
    calibrated = gptq_weight(weight, hessian, scheme)
    data_free = quantize_weight(weight, QuantScheme(bits=2, group_size=64, **extra))
    assert calibrated.keys() == data_free.keys()
    plain = gptq_weight(weight, hessian, QuantScheme(bits=2, group_size=64, method="gptq"))
    error = output_error(weight, scheme, calibrated, x_test)
    assert error < 0.8 * output_error(weight, scheme, data_free, x_test)
    # The additive term still helps on top of GPTQ codes.
    assert error < output_error(weight, QuantScheme(bits=2, group_size=64, method="gptq"), plain, x_test)


def test_gptq_outliers_are_exact_at_their_positions():
    weight, hessian, _ = layer(16, 64)
    scheme = QuantScheme(bits=2, group_size=32, method="gptq", outliers_per_row=3)
    tensors = gptq_weight(weight, hessian, scheme)
    cols = tensors["outlier_cols"].long()
    torch.testing.assert_close(dequantize(scheme, tensors, 64).gather(1, cols), weight.gather(1, cols),
                               rtol=1e-3, atol=1e-3)  # float16 residuals


@pytest.mark.parametrize("extra", [dict(format="vq", planes=2), dict(format="ternary", planes=1),
                                   dict(format="ternary", planes=2), dict(bits=2, lowrank_rank=4),
                                   dict(bits=2, outliers_per_row=2)],
                         ids=["vq2", "ternary1", "ternary2", "int2+lowrank", "int2+outliers"])
def test_tiny_llama_gptq_extreme_formats_save_reload(tiny_llama, tmp_path, extra):  # noqa: F811
    config = HfQuantConfig(method="gptq", group_size=32, calibration=CALIBRATION_TEXTS, n_samples=6, seq_len=32,
                           **extra)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config)
    linears = [m for m in model.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 14 and all(m.scheme.method == "gptq" for m in linears)
    # the default 8-bit head, outside the blocks calibration covers, is rounded data-free
    assert model.lm_head.scheme == QuantScheme(bits=8, group_size=-1, symmetric=True, method="mse")
    ids = torch.randint(0, 1000, (1, 12))
    reloaded = assert_reload_identical(model, tmp_path / "q", ids)
    assert reloaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 15)


def test_gptq_weight_scalar_path_is_plain_gptq():
    """gptq_weight on a plain scalar scheme packs exactly what gptq_quantize returns (no extra processing)."""
    from hf_quant.formats import pack

    weight, hessian, _ = layer(16, 64)
    scheme = QuantScheme(bits=4, group_size=32, method="gptq")
    tensors = gptq_weight(weight, hessian, scheme)
    expected = pack(scheme, gptq_quantize(weight, hessian, scheme))
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
