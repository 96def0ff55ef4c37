"""Vector quantization (formats/vq.py): layout and true bits, dequantize against a plain
reference, residual codebooks, nearest-code assignment, forward, save/reload/generate."""

import pytest
import torch
from extreme_helpers import check_round_trip, tiny_llama_folder
from transformers import AutoModelForCausalLM

from hf_quant import HfQuantConfig
from hf_quant.algorithms import quantize_weight
from hf_quant.formats import QuantScheme, bits_per_weight, dequantize, tensor_specs
from hf_quant.nn import QuantLinear


def vq(group: int = 64, planes: int = 1) -> QuantScheme:
    return QuantScheme(format="vq", bits=8, group_size=group, planes=planes)


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_specs_and_true_bits():
    s = vq(128, 2)
    assert tensor_specs(s, (576, 203)) == {
        "qweight": ((576, 2, 26), torch.uint8),
        "codebook": ((2, 256, 8), torch.float16),
        "scales": ((576, 2), torch.float16),
    }
    expected = (576 * 2 * 72 * 8 + 2 * 256 * 8 * 16 + 576 * 5 * 16) / (576 * 576)
    assert bits_per_weight(s, (576, 576)) == pytest.approx(expected)
    assert bits_per_weight(s, (576, 576)) < 2.4  # ~2 bits all-in on a real-sized layer


def test_dequantize_matches_plain_reference(one_thread):
    torch.manual_seed(0)
    w = torch.randn(23, 203)
    s = vq(32, 2)
    t = quantize_weight(w, s)
    cb, idx, scales = t["codebook"].float(), t["qweight"].long(), t["scales"].float()
    expected = torch.zeros(23, 26 * 8)
    for o in range(23):
        for v in range(26):
            expected[o, 8 * v : 8 * v + 8] = cb[0, idx[o, 0, v]] + cb[1, idx[o, 1, v]]
    expected = expected[:, :203] * scales.repeat_interleave(32, 1)[:, :203]
    assert torch.allclose(dequantize(s, t, 203), expected, rtol=1e-6, atol=1e-7)


def test_codes_are_nearest_for_the_stored_codebook(one_thread):
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    s = vq(-1, 1)
    t = quantize_weight(w, s)
    u = (w / t["scales"].float()).reshape(-1, 8)
    dist = torch.cdist(u, t["codebook"][0].float())
    chosen = dist.gather(1, t["qweight"].long().reshape(-1, 1)).squeeze(1)
    assert torch.all(chosen <= dist.min(1).values + 1e-5)


def test_residual_codebook_halves_the_error(one_thread):
    torch.manual_seed(2)
    w = torch.randn(256, 256)
    one = rel_err(dequantize(vq(64, 1), quantize_weight(w, vq(64, 1)), 256), w)
    two = rel_err(dequantize(vq(64, 2), quantize_weight(w, vq(64, 2)), 256), w)
    assert two < 0.6 * one, (one, two)


@pytest.mark.parametrize("tokens", [1, 17])
def test_forward_matches_reference(tokens, one_thread):
    torch.manual_seed(tokens)
    q = QuantLinear.from_float(torch.nn.Linear(203, 45), vq(64, 2))
    x = torch.randn(tokens, 203)
    assert rel_err(q(x), x @ q.dequantize_weight().t() + q.bias) < 1e-5


@pytest.mark.parametrize("shape, group, planes", [((48, 203), 32, 2), ((33, 100), -1, 1), ((64, 256), 128, 2),
                                                  ((17, 96), 64, 1), ((40, 200), 64, 2)])
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 33])
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_vq_kernel_matches_reference(shape, group, planes, tokens, dtype, bound, one_thread):
    """The lookup-table path (<= LUT_MAX_TOKENS tokens) and the decode path (more), at odd shapes: short last
    vectors (in 203, 100), short last groups (200 at group 64), one per-channel group."""
    from hf_quant.kernels.registry import select_kernel
    from hf_quant.kernels.vq import LUT_MAX_TOKENS

    torch.manual_seed(tokens)
    out, n = shape
    w = torch.randn(out, n)
    s = vq(group, planes)
    t = quantize_weight(w, s)
    kernel = select_kernel(s, shape, torch.device("cpu"), dtype)
    assert kernel.name == "cpu_vq"
    state = kernel.prepare(s, t, shape, dtype)
    x = torch.randn(tokens, n).to(dtype)
    y = kernel.linear(x, state)
    assert y.dtype == dtype and y.shape == (tokens, out)
    reference = x.double() @ dequantize(s, t, n).double().t()
    assert rel_err(y, reference) < bound, (tokens <= LUT_MAX_TOKENS, rel_err(y, reference))


def test_cpu_vq_lut_op_opcheck():
    from hf_quant.kernels.vq import vq_lut_linear

    torch.manual_seed(0)
    args = (torch.randn(2, 64), torch.randn(2, 256, 8), torch.randint(0, 8 * 256, (2, 5 * 8), dtype=torch.int32),
            torch.randn(5, 2))
    torch.library.opcheck(vq_lut_linear, args)


def test_validation():
    with pytest.raises(ValueError, match="planes must be 1 or 2"):
        vq(planes=3)
    with pytest.raises(ValueError, match="double_quant"):
        QuantScheme(format="vq", bits=8, double_quant=True)
    with pytest.raises(ValueError, match="bits"):
        HfQuantConfig(format="vq", bits=4)


def test_save_reload_generate(tmp_path, one_thread):
    config = HfQuantConfig(format="vq", planes=2, group_size=32, overrides={"k_proj|v_proj": {"planes": 1}})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_folder(tmp_path / "float"), quantization_config=config)
    assert model.model.layers[0].self_attn.k_proj.codebook.shape == (1, 256, 8)
    reloaded = check_round_trip(model, tmp_path / "quant")
    assert torch.equal(reloaded.model.layers[1].mlp.up_proj.codebook, model.model.layers[1].mlp.up_proj.codebook)
