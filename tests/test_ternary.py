"""Ternary trit-planes (formats/ternary.py, kernels/ternary.py): 5-trit packing exact,
dequantize against a plain reference, BitNet-format weights reproduced, the sign-sum kernel against the reference
kernel, save/reload/generate."""

import pytest
import torch
from extreme_helpers import check_round_trip, tiny_llama_folder
from transformers import AutoModelForCausalLM

from hf_quant import HfQuantConfig
from hf_quant.algorithms import quantize_weight
from hf_quant.formats import QuantScheme, bits_per_weight, dequantize, tensor_specs
from hf_quant.formats.ternary import pack_trits, unpack_trits
from hf_quant.kernels import available_kernels, select_kernel
from hf_quant.nn import QuantLinear


def ternary(group: int = 64, planes: int = 1, **kw) -> QuantScheme:
    return QuantScheme(format="ternary", bits=2, group_size=group, planes=planes, **kw)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("n", [1, 4, 5, 6, 203])
def test_trit_packing_round_trips(n):
    g = torch.Generator().manual_seed(n)
    t = torch.randint(-1, 2, (3, 2, n), generator=g, dtype=torch.int8)
    packed = pack_trits(t)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, -(-n // 5))
    assert int(packed.max()) < 243
    assert torch.equal(unpack_trits(packed, n), t)


def test_trit_packing_rejects_bad_values():
    with pytest.raises(ValueError, match="-1, 0, 1"):
        pack_trits(torch.tensor([0, 2], dtype=torch.int8))
    with pytest.raises(ValueError, match="243"):
        unpack_trits(torch.tensor([[250]], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="does not hold"):
        unpack_trits(torch.zeros(1, 3, dtype=torch.uint8), 5)


def test_specs_and_true_bits():
    s = ternary(group=128, planes=2)
    specs = tensor_specs(s, (96, 203))
    assert specs == {"qweight": ((96, 2, 41), torch.uint8), "scales": ((96, 2, 2), torch.float16)}
    assert bits_per_weight(s, (96, 200)) == pytest.approx(2 * (8 * 40 / 200 + 16 * 2 / 200))
    assert bits_per_weight(ternary(group=128), (64, 640)) == pytest.approx(1.6 + 16 / 128)


@pytest.mark.parametrize("group, planes", [(32, 1), (64, 2), (-1, 2)])
def test_dequantize_matches_plain_reference(group, planes):
    torch.manual_seed(0)
    w = torch.randn(37, 203) * 0.02
    s = ternary(group, planes)
    t = quantize_weight(w, s)
    trits = unpack_trits(t["qweight"], 203).float()  # [out, planes, in]
    g = 203 if group == -1 else group
    expected = torch.zeros(37, 203)
    for p in range(planes):
        for col in range(203):
            expected[:, col] += trits[:, p, col] * t["scales"][:, p, col // g].float()
    assert torch.allclose(dequantize(s, t, 203), expected, rtol=0, atol=1e-7)


def test_bitnet_weights_are_reproduced():
    torch.manual_seed(0)
    trits = torch.randint(-1, 2, (48, 192)).float()
    scale = torch.rand(48, 3) * 0.1 + 0.01  # one scale per row and group of 64
    w = trits * scale.repeat_interleave(64, 1)
    s = ternary(64)
    err = (dequantize(s, quantize_weight(w, s), 192) - w).abs()
    assert float(err.max()) <= float(scale.max()) * 2**-10  # float16 rounding of the scale only


def test_two_planes_fit_far_better_than_one():
    torch.manual_seed(1)
    w = torch.randn(64, 256) * 0.02
    one = rel_err(dequantize(ternary(64), quantize_weight(w, ternary(64)), 256), w)
    two = rel_err(dequantize(ternary(64, 2), quantize_weight(w, ternary(64, 2)), 256), w)
    int2 = rel_err(dequantize(QuantScheme(bits=2, group_size=64), quantize_weight(w, QuantScheme(bits=2, group_size=64)), 256), w)
    assert two < 0.45 * one, (one, two)
    assert one < 1.1 * int2  # one plane (1.6 bits + scales) is about as good as 2-bit integers


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-2), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("group, planes", [(32, 1), (64, 2), (-1, 2)])
@pytest.mark.parametrize("tokens", [1, 33])
def test_kernel_matches_reference(dtype, bound, group, planes, tokens, one_thread):
    torch.manual_seed(tokens + planes)
    out, inp = 45, 203
    lin = torch.nn.Linear(inp, out)
    q = QuantLinear.from_float(lin, ternary(group, planes))
    assert q.kernel_name(dtype=dtype) == "cpu_ternary"
    x = torch.randn(tokens, inp, dtype=dtype)
    ref = x.float() @ q.dequantize_weight().t() + q.bias
    got = q(x)
    assert got.dtype == dtype and got.shape == (tokens, out)
    assert rel_err(got, ref) < bound
    # The reference kernel computes it in float32.
    reference = available_kernels()["reference"]
    state = reference.prepare(q.scheme, q.packed_tensors(), (out, inp), torch.float32)
    assert rel_err(reference.linear(x.float(), state) + q.bias, ref) < 1e-5


def test_kernel_sums_are_exact_for_exact_inputs(one_thread):
    """Integer activations and power-of-two scales: the sign sums and the scaling are exact in bfloat16 too."""
    torch.manual_seed(0)
    trits = torch.randint(-1, 2, (16, 64)).float()
    w = trits * 0.125
    q = QuantLinear.from_float(torch.nn.Linear(64, 16, bias=False), ternary(32))
    q.load_packed(quantize_weight(w, ternary(32)))
    x = torch.randint(-3, 4, (5, 64)).float()
    assert torch.equal(q(x), x @ w.t())


def test_scheme_validation():
    with pytest.raises(ValueError, match="planes"):
        QuantScheme(bits=4, planes=2)
    with pytest.raises(ValueError, match="planes must be 1 or 2"):
        ternary(planes=3)
    with pytest.raises(ValueError, match="double_quant"):
        ternary(double_quant=True)
    with pytest.raises(ValueError, match="planes"):
        HfQuantConfig(format="ternary", planes=0)
    # An override leaving ternary does not inherit its planes.
    config = HfQuantConfig(format="ternary", planes=2, overrides={"down_proj": {"format": "int", "bits": 4}})
    assert config.scheme_for("mlp.down_proj").planes == 1
    assert config.default_scheme == ternary(128, 2)


def test_select_kernel_never_sends_ternary_to_scalar_kernels():
    for dtype in (torch.float32, torch.bfloat16):
        assert select_kernel(ternary(), (32, 64), torch.device("cpu"), dtype).name == "cpu_ternary"


def test_save_reload_generate(tmp_path, one_thread):
    config = HfQuantConfig(format="ternary", planes=2, group_size=32,
                           overrides={"down_proj": {"format": "int", "bits": 4}, "q_proj": {"planes": 1}})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_folder(tmp_path / "float"), quantization_config=config)
    assert model.model.layers[0].self_attn.q_proj.scheme.planes == 1
    assert model.model.layers[0].mlp.down_proj.scheme.format == "int"
    reloaded = check_round_trip(model, tmp_path / "quant")
    assert torch.equal(reloaded.model.layers[1].mlp.up_proj.qweight, model.model.layers[1].mlp.up_proj.qweight)
    w = reloaded.model.layers[1].self_attn.v_proj.dequantize_weight()
    reloaded.dequantize()
    assert torch.equal(reloaded.model.layers[1].self_attn.v_proj.weight, w)
