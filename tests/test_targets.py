"""HfQuantConfig(target=...): the preset's defaults, every conflicting choice refused naming the field and the fix,
shapes checked before quantizing, and — the point of it — calibrated recipes made under a target export exactly
(no requantize, no added error) to that target's formats."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_quant import HfQuantConfig
from hf_quant.export import export
from tiny_families import byte_level_tokenizer, tiny_family

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 6,
         "Quantization maps each weight to a small set of values; calibration shows which errors matter. " * 6]


def test_presets_fill_what_is_not_given_and_round_trip():
    gguf = HfQuantConfig(target="gguf", method="gptq")
    assert (gguf.group_size, gguf.symmetric, gguf.quantize_experts, gguf.bits) == (32, True, False, 4)
    vllm = HfQuantConfig(target="vllm", group_size=64, bits=8)
    assert (vllm.group_size, vllm.symmetric, vllm.bits) == (64, True, 8)
    assert HfQuantConfig.from_dict(vllm.to_dict()) == vllm
    assert HfQuantConfig(target="vllm").group_size == 128


@pytest.mark.parametrize("target,settings,pattern", [
    ("gguf", dict(group_size=128), "default scheme has group_size=128"),
    ("gguf", dict(bits=3), "bits=3"),
    ("gguf", dict(symmetric=False), "symmetric=False"),
    ("vllm", dict(bits=5), "bits=5"),
    ("vllm", dict(format="nf4"), "default scheme has format=.nf4."),
    ("vllm", dict(double_quant=True), "double_quant=True"),
    ("vllm", dict(outliers_per_row=2), "outliers_per_row=2"),
    ("vllm", dict(overrides={"down_proj": {"bits": 3}}), r"overrides\['down_proj'\] has bits=3"),
    ("gguf", dict(rotation="hadamard", method="gptq"), "rotation='residual'"),
    ("gguf", dict(format="nf4"), r"format=.nf4.*or format='kquant'"),
    ("gguf", dict(overrides={"down_proj": {"format": "kquant", "lowrank_rank": 4}}),
     r"overrides\['down_proj'\] has lowrank_rank=4"),
    ("vllm", dict(quantize_experts=True), "quantize_experts=False"),
    ("vllm", dict(target_bits=4.5), "allocation_candidates"),
    ("cuda", dict(), "target must be"),
])
def test_choices_outside_the_target_are_refused_with_the_fix(target, settings, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        HfQuantConfig(target=target, **settings)
    assert target == "cuda" or "fix" in str(info.value) or "use " in str(info.value) or "set " in str(info.value) \
        or "give " in str(info.value)


def test_update_cannot_leave_the_target():
    config = HfQuantConfig(target="gguf")
    with pytest.raises(ValueError, match="group_size=64"):
        config.update(group_size=64)
    assert config.group_size == 32


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("targets")
    tiny_family("llama").save_pretrained(folder)  # hidden 64, intermediate 96
    byte_level_tokenizer(folder)
    return folder


def test_shapes_the_target_cannot_hold_are_refused_before_quantizing(llama_dir):
    # down_proj has in_features 96: not a multiple of 64
    with pytest.raises(ValueError, match=r"down_proj: in_features=96 is not a multiple of group_size=64.*Fix"):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=HfQuantConfig(target="vllm",
                                                                                          group_size=64))


@pytest.mark.parametrize("target,settings,formats", [
    ("gguf", dict(method="gptq", rotation="residual"), ["gguf"]),
    ("gguf", dict(method="gptq", bits=8), ["gguf"]),
    ("gguf", dict(method="awq", overrides={r"down_proj": {"bits": 5}}), ["gguf"]),
    ("vllm", dict(method="gptq", group_size=32, rotation="residual"), ["gptq", "compressed-tensors"]),
    ("vllm", dict(method="gptq", group_size=-1, bits=8), ["gptq", "compressed-tensors"]),
])
def test_calibrated_recipes_under_a_target_export_exactly(llama_dir, tmp_path, target, settings, formats):
    config = HfQuantConfig(target=target, calibration=TEXTS, n_samples=4, seq_len=32, **settings)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config)
    model.save_pretrained(tmp_path / "q")
    byte_level_tokenizer(tmp_path / "q")
    for fmt in formats:
        out = tmp_path / ("m.gguf" if fmt == "gguf" else fmt)
        report = export(tmp_path / "q", to=fmt, out=out)  # no requantize: refusals would raise
        # 14 linears in the blocks + the default 8-bit head (lm_head="int8": the target's 8-bit scheme), but for
        # vllm, whose GPTQ readers need a vocabulary that is a multiple of 32 (here 300): the head stays float
        head = target == "gguf"
        assert len(report.modules) == 14 + head and ("lm_head" in report.modules) is head and not report.added_error


def test_k_quant_mixes_under_the_gguf_target_export_exactly(tmp_path):
    """llama.cpp's Q4_K_M-style mix: K-quant super-blocks where the rows are multiples of 256, Q4_0/Q5_0 elsewhere;
    format='kquant' alone takes its own layout (no symmetric/group_size defaults from the target)."""
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    src = tmp_path / "float"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(src)
    byte_level_tokenizer(src)
    alone = HfQuantConfig(target="gguf", format="kquant")
    assert (alone.format, alone.bits, alone.group_size, alone.quantize_experts) == ("kquant", 4, 256, False)
    config = HfQuantConfig(target="gguf", method="gptq", calibration=TEXTS, n_samples=4, seq_len=32, bits=5,
                           overrides={"down_proj": {"format": "kquant", "bits": 6},
                                      r"(gate|up)_proj": {"format": "kquant", "bits": 4}})
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config)
    model.save_pretrained(tmp_path / "q")
    byte_level_tokenizer(tmp_path / "q")
    report = export(tmp_path / "q", to="gguf", out=tmp_path / "m.gguf")  # no requantize: refusals would raise
    assert len(report.modules) == 15 and not report.added_error  # with the default Q8_0 head
    types = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["output.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.1.ffn_gate.weight"] == "Q4_K"
    assert types["blk.0.attn_q.weight"] == "Q5_0"
