"""hf_quant.export: compressed-tensors and GPTQ checkpoints that decode, in the target library's own decoding (or an
independent reference written from the format's spec), to exactly hf_quant's dequantized weights; transformers
loading the compressed-tensors export with hf_quant's logits; every refusal with its message; requantize."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from extreme_helpers import tiny_llama_folder
from export_cases import GPTQ_CASES
from hf_quant import HfQuantConfig
from hf_quant.export import ExportRefused, ExportRefusedModules, export
from hf_quant.export.packing import pack_int32, unpack_int32
from hf_quant.nn import PackedWeight

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# These tests are about the blocks' codes: the head stays float (the default 8-bit per-channel head, symmetric, is
# not a GGUF block and mixes symmetric with asymmetric GPTQ cases; test_targets and test_lm_head export heads).
PIN = {"lm_head": "float"}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("export") / "float")


def quantized(folder, **settings):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=HfQuantConfig(**PIN, **settings))


def packed(model) -> dict[str, PackedWeight]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedWeight)}


def read_export(folder):
    config = json.loads((folder / "config.json").read_text())
    return config, load_file(str(folder / "model.safetensors"))


def module_tensors(state, name):
    return {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}


# ---------------------------------------------------------------------------------------------------------------
# compressed-tensors, decoded by the compressed-tensors library itself
# ---------------------------------------------------------------------------------------------------------------

CT_CASES = {
    "int4-asym-g32-rtn": dict(bits=4, group_size=32, method="rtn"),
    "int4-sym-g32": dict(bits=4, group_size=32, symmetric=True),
    "int8-sym-channel": dict(bits=8, group_size=-1, symmetric=True),
    "int8-asym-channel-rtn": dict(bits=8, group_size=-1, method="rtn"),
    "int3-asym-g32": dict(bits=3, group_size=32),  # <= 3 bits: integer zero-points with the default mse search
    "int2-asym-g32": dict(bits=2, group_size=32),
    "int5-sym-g32": dict(bits=5, group_size=32, symmetric=True),  # dense packing: codes straddle int32 words
    "int6-asym-g32-rtn": dict(bits=6, group_size=32, method="rtn"),
    "fp8-g32": dict(format="fp8", group_size=32),
    "fp8-channel": dict(format="fp8", group_size=-1),
    "mixed": dict(bits=4, group_size=32, symmetric=True,
                  overrides={r"mlp\.down_proj": {"bits": 8, "group_size": -1},
                             r"self_attn\.v_proj": {"bits": 3, "symmetric": False, "method": "rtn"},
                             r"layers\.1\.self_attn\.o_proj": None}),
    "int4-sym-g32-lm_head": dict(bits=4, group_size=32, symmetric=True, modules_to_not_convert=[]),
    "mixed-sym": dict(bits=4, group_size=32, symmetric=True,
                      overrides={r"mlp\.down_proj": {"bits": 8, "group_size": -1},
                                 r"self_attn\.v_proj": {"bits": 3, "group_size": 64},
                                 r"layers\.1\.self_attn\.o_proj": None}),
}


def ct_decompress(config, state, name, scale_dtype=None):
    """The library's own decompression of one module (its QuantizationConfig, compressor registry, decompress)."""
    qconfig = QuantizationConfig.model_validate(config["quantization_config"])
    [scheme] = [g for g in qconfig.config_groups.values() if name in g.targets]
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    local = module_tensors(state, name)
    if scale_dtype is not None:
        local["weight_scale"] = local["weight_scale"].to(scale_dtype)
    return compressor.decompress(local, scheme)["weight"]


@pytest.mark.parametrize("case", list(CT_CASES))
def test_compressed_tensors_library_decompresses_our_weights(float_dir, tmp_path, case):
    model = quantized(float_dir, **CT_CASES[case])
    report = export(model, to="compressed-tensors", out=tmp_path / "ct")
    config, state = read_export(tmp_path / "ct")
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    modules = packed(model)
    assert set(report.modules) == set(modules) and report.added_error == {}
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(modules)  # every module in exactly one group, by its exact name
    schemes = {m.scheme for m in modules.values()}
    assert len(qc["config_groups"]) == len(schemes)  # one group per distinct scheme
    assert qc["ignore"] == sorted(n for n, m in model.named_modules() if type(m) is torch.nn.Linear)
    assert ("lm_head" in qc["ignore"]) == ("lm_head" not in modules)
    if case == "mixed":
        assert "model.layers.1.self_attn.o_proj" in qc["ignore"] and qc["format"] == "pack-quantized"
    for name, module in modules.items():
        ours = module.dequantize_weight(torch.float32)
        stored = ct_decompress(config, state, name)
        assert stored.dtype == torch.float16
        assert torch.equal(stored, ours.half()), name  # the library decodes in the scales' dtype (float16)
        assert torch.equal(ct_decompress(config, state, name, torch.float32), ours), name  # exact in float32
    # the float rest is copied unchanged
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    if "lm_head" not in modules:
        assert torch.equal(state["lm_head.weight"], model.lm_head.weight)
    assert torch.equal(state["model.norm.weight"], model.model.norm.weight)


def test_packing_matches_compressed_tensors_and_round_trips():
    torch.manual_seed(0)
    for bits in range(1, 9):
        for n in (7, 32, 96, 100):
            codes = torch.randint(0, 1 << bits, (3, n))
            signed = (codes - (1 << (bits - 1))).to(torch.int8)
            assert torch.equal(pack_int32(codes, bits), pack_to_int32(signed, bits))
            assert torch.equal(pack_int32(codes.t(), bits, dim=0), pack_to_int32(signed.t(), bits, packed_dim=0))
            assert torch.equal(unpack_int32(pack_int32(codes, bits), bits, n), codes)


def test_compressed_tensors_float32_scales_hold_double_quant_exactly(float_dir, tmp_path):
    model = quantized(float_dir, bits=4, group_size=32, symmetric=True, double_quant=True)
    with pytest.raises(ExportRefusedModules, match=r"(?s)scale_dtype=torch.float32.*not exact in torch.float16"):
        export(model, to="compressed-tensors", out=tmp_path / "f16")
    export(model, to="compressed-tensors", out=tmp_path / "f32", scale_dtype=torch.float32)
    config, state = read_export(tmp_path / "f32")
    for name, module in packed(model).items():
        assert state[f"{name}.weight_scale"].dtype == torch.float32
        assert torch.equal(ct_decompress(config, state, name), module.dequantize_weight(torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# transformers loads the compressed-tensors export: hf_quant's logits
# ---------------------------------------------------------------------------------------------------------------


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", ["int4-sym-g32", "int8-sym-channel", "int4-asym-g32-rtn", "fp8-channel",
                                  "int4-sym-g32-lm_head", "mixed-sym"])
def test_transformers_loads_compressed_tensors_export(float_dir, tmp_path, monkeypatch, case):
    from transformers import CompressedTensorsConfig

    monkeypatch.setenv("HF_QUANT_KERNEL", "reference")  # float32 math: F.linear(x, dequantized W)
    model = quantized(float_dir, **CT_CASES[case])
    asym = not CT_CASES[case].get("symmetric", False) and CT_CASES[case].get("format", "int") == "int"
    # transformers 5.25's compressed load path (compressed-tensors 0.20 compressing the empty model on the meta
    # device) sizes asymmetric zero-points unpacked, while the library's own compress() and vLLM pack them, so
    # asymmetric exports load with dequantize=True, which runs the library's decompress() per module in the stored
    # scales' dtype (float32 scales: our weights exactly). That path reads every dense module with one config
    # group's scheme, so mixed precision loads through the compressed path (symmetric groups).
    export(model, to="compressed-tensors", out=tmp_path / "ct", scale_dtype=torch.float32 if asym else None)
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym else {}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", **kwargs)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    # (compressed modules are decompressed by the library on the first forward)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    for name, module in packed(model).items():
        assert torch.equal(loaded.get_submodule(name).weight, module.dequantize_weight(torch.float32)), name


@pytest.mark.real_model
def test_smollm2_compressed_tensors_export_loads_with_our_logits(tmp_path, monkeypatch):
    """SmolLM2-135M int4 symmetric g64 (576 in-features: not a multiple of 128)."""
    from hf_quant.assets import smollm2_path

    monkeypatch.setenv("HF_QUANT_KERNEL", "reference")
    model = quantized(smollm2_path(), bits=4, group_size=64, symmetric=True, method="rtn")
    report = export(model, to="compressed-tensors", out=tmp_path / "ct")
    assert len(report.modules) == 30 * 7
    assert (tmp_path / "ct" / "tokenizer.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    export(model, to="gptq", out=tmp_path / "gptq")
    _, state = read_export(tmp_path / "gptq")
    for name, module in packed(model).items():
        assert torch.equal(gptq_reference_weight(module_tensors(state, name), 4), module.dequantize_weight()), name


# ---------------------------------------------------------------------------------------------------------------
# GPTQ, decoded by a reference written from AutoGPTQ's QuantLinear (pack / dequantize), independent of the exporter
# ---------------------------------------------------------------------------------------------------------------


def gptq_unpack_rows(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's unpacking of qweight [in * bits / 32, out] -> codes [in, out]: 2/4/8 bits are 32 // bits fields of
    each word; 3 bits are 32 codes per 3 words with codes 10 and 21 split across the words (its `wf` shifts)."""
    q = qweight.to(torch.int64) & 0xFFFFFFFF
    if bits in (2, 4, 8):
        shifts = torch.arange(0, 32, bits)
        codes = (q.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
        return codes.reshape(-1, q.shape[1])
    assert bits == 3
    w = q.view(-1, 3, q.shape[1])
    out = []
    for block in w:
        a, b, c = block
        vals = [(a >> (3 * j)) & 7 for j in range(10)]
        vals.append(((a >> 30) & 3) | ((b & 1) << 2))
        vals += [(b >> (3 * j + 1)) & 7 for j in range(10)]
        vals.append(((b >> 31) & 1) | ((c & 3) << 1))
        vals += [(c >> (3 * j + 2)) & 7 for j in range(10)]
        out.append(torch.stack(vals))
    return torch.cat(out)


def autogptq_pack_rows(codes: list[list[int]], bits: int) -> list[list[int]]:
    """AutoGPTQ's `QuantLinear.pack` loop (qlinear_cuda_old), on python ints: codes [in][out] -> uint32 words
    [in * bits / 32][out]."""
    n_in, n_out = len(codes), len(codes[0])
    rows = [[0] * n_out for _ in range(n_in // 32 * bits)]
    i = row = 0
    while row < len(rows):
        for o in range(n_out):
            def put(r, v, shift):  # numpy uint32: bits shifted past 31 are dropped
                rows[r][o] |= (v << shift) & 0xFFFFFFFF

            if bits in (2, 4, 8):
                for j in range(32 // bits):
                    put(row, codes[i + j][o], bits * j)
            else:
                for j in range(10):
                    put(row, codes[i + j][o], 3 * j)
                put(row, codes[i + 10][o], 30)
                put(row + 1, (codes[i + 10][o] >> 2) & 1, 0)
                for j in range(10):
                    put(row + 1, codes[i + 11 + j][o], 3 * j + 1)
                put(row + 1, codes[i + 21][o], 31)
                put(row + 2, (codes[i + 21][o] >> 1) & 3, 0)
                for j in range(10):
                    put(row + 2, codes[i + 22 + j][o], 3 * j + 2)
        i, row = (i + 32 // bits, row + 1) if bits in (2, 4, 8) else (i + 32, row + 3)
    return rows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_packing_matches_autogptq_pack_loop(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (64, 5))
    words = torch.tensor(autogptq_pack_rows(codes.tolist(), bits), dtype=torch.int64)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    assert torch.equal(pack_int32(codes, bits, dim=0), words)
    assert torch.equal(gptq_unpack_rows(words, bits), codes)


def gptq_reference_weight(tensors: dict, bits: int, dtype=torch.float32) -> torch.Tensor:
    """w[out, in] = scales[g_idx[i]] * (q - (qzeros field + 1)), the v1 convention."""
    codes = gptq_unpack_rows(tensors["qweight"], bits)  # [in, out]
    zeros = gptq_unpack_rows(tensors["qzeros"].t().contiguous(), bits).t() + 1  # [groups, out]
    g_idx = tensors["g_idx"].long()
    scales = tensors["scales"].to(dtype)
    return (scales[g_idx] * (codes - zeros[g_idx]).to(dtype)).t()




@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_gptq_export_unpacks_to_our_weights(float_dir, tmp_path, case):
    settings = GPTQ_CASES[case]
    model = quantized(float_dir, **settings)
    export(model, to="gptq", out=tmp_path / "gptq")
    config, state = read_export(tmp_path / "gptq")
    qc = config["quantization_config"]
    assert qc == json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["desc_act"] is False
    assert qc["sym"] == settings.get("symmetric", False) and qc["lm_head"] is False
    from transformers import GPTQConfig

    parsed = GPTQConfig.from_dict(qc)  # transformers reads it (loading needs gptqmodel, which needs torch >= 2.14)
    assert (parsed.bits, parsed.group_size, parsed.sym, parsed.format) == (qc["bits"], qc["group_size"], qc["sym"],
                                                                           "gptq")
    for name, module in packed(model).items():
        s = module.scheme
        t = module_tensors(state, name)
        out, in_features = module.quantized_shape
        groups = 1 if s.group_size == -1 else in_features // s.group_size
        assert t["qweight"].shape == (in_features * s.bits // 32, out) and t["qweight"].dtype == torch.int32
        assert t["qzeros"].shape == (groups, out * s.bits // 32) and t["scales"].shape == (groups, out)
        assert t["scales"].dtype == torch.float16 and t["g_idx"].dtype == torch.int32
        ours = module.dequantize_weight(torch.float32)
        assert torch.equal(gptq_reference_weight(t, s.bits), ours), name
        assert torch.equal(gptq_reference_weight(t, s.bits, torch.float16), ours.half()), name
        if (s.bits, s.group_size) != (qc["bits"], qc["group_size"]):
            assert qc["dynamic"][f"+:^{name.replace('.', chr(92) + '.')}$"] == {"bits": s.bits,
                                                                              "group_size": s.group_size}
    if case == "mixed-bits":
        assert qc["dynamic"]["-:^model\\.layers\\.0\\.mlp\\.up_proj$"] == {}
        assert state["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# refusals: each names the module, the reason and the fix
# ---------------------------------------------------------------------------------------------------------------

REFUSALS = [
    # (settings, target, a module refused, message pattern)
    (dict(bits=4, group_size=32), "compressed-tensors", "model.layers.0.self_attn.q_proj",
     r"zero-points are fractional .*method='mse'.*Fix: quantize with integer zero-points.*requantize=True"),
    (dict(bits=4, group_size=32), "gptq", "model.layers.1.mlp.down_proj", "zero-points are fractional"),
    (dict(bits=4, group_size=64, symmetric=True), "compressed-tensors", "model.layers.0.mlp.down_proj",
     r"in_features=96 is not a multiple of group_size=64.*requantize=True cannot change the group layout"),
    (dict(bits=4, group_size=64, symmetric=True), "gptq", "model.layers.1.mlp.down_proj",
     "in_features=96 is not a multiple of group_size=64"),
    (dict(format="nf4", group_size=32), "compressed-tensors", "model.layers.0.self_attn.q_proj",
     r"compressed-tensors has no nf4 weights.*format='int'"),
    (dict(format="fp4", group_size=32), "gptq", "model.layers.0.self_attn.q_proj", "gptq has no fp4 weights"),
    (dict(format="fp8", group_size=32), "gptq", "model.layers.0.self_attn.q_proj",
     "gptq has no float8 .*export to compressed-tensors"),
    (dict(format="ternary", planes=2, group_size=32), "compressed-tensors", "model.layers.0.self_attn.q_proj",
     "has no export mapping"),
    (dict(format="vq", group_size=32), "gptq", "model.layers.0.self_attn.q_proj", "has no export mapping"),
    (dict(bits=4, group_size=32, symmetric=True, double_quant=True), "gptq", "model.layers.0.self_attn.q_proj",
     r"scales are not exact in torch.float16 .*\(double_quant.*Fix: quantize without double_quant.*; or export "
     r"with requantize=True"),
    (dict(bits=4, group_size=32, symmetric=True, outliers_per_row=2), "compressed-tensors",
     "model.layers.0.self_attn.q_proj", r"outliers_per_row=2.*Fix: quantize this module without them"),
    (dict(bits=4, group_size=32, symmetric=True, lowrank_rank=4), "gptq", "model.layers.0.mlp.up_proj",
     r"lowrank_rank=4.*lowrank_rank=0"),
    (dict(bits=4, group_size=32, symmetric=True, rotation="hadamard"), "compressed-tensors",
     "model.layers.0.self_attn.q_proj", r"online input rotation.*rotation='residual'"),
    (dict(bits=5, group_size=32, symmetric=True), "gptq", "model.layers.0.self_attn.q_proj",
     r"GPTQ has 2, 3, 4, 8-bit codes, not 5.*compressed-tensors"),
]


@pytest.mark.parametrize("settings,target,module,pattern", REFUSALS,
                         ids=[f"{r[1]}-{'-'.join(f'{k}={v}' for k, v in r[0].items())}" for r in REFUSALS])
def test_refusals_name_module_reason_and_fix(float_dir, tmp_path, settings, target, module, pattern):
    model = quantized(float_dir, **settings)
    out = tmp_path / "out"
    with pytest.raises(ExportRefusedModules) as info:
        export(model, to=target, out=out)
    refused = {r.module: r for r in info.value.refusals}
    assert module in refused
    assert all(isinstance(r, ExportRefused) and r.reason and r.fix for r in refused.values())
    assert refused[module].fix in str(info.value)  # the message groups the modules by fix
    assert list(refused)[0] in str(info.value) and list(refused.values())[0].reason in str(info.value)
    import re

    assert re.search(pattern, str(refused[module]), re.S), str(refused[module])
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, no temporary folder left


def _all_positive_row_model(float_dir, tmp_path):
    """A checkpoint whose q_proj row 0 is all >= 0: its groups' zero-point is 0 (asymmetric RTN)."""
    model = LlamaForCausalLM.from_pretrained(float_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0].abs_()
    model.save_pretrained(tmp_path / "positive")
    return quantized(tmp_path / "positive", bits=4, group_size=32, method="rtn")


def test_gptq_refuses_zero_point_zero_and_requantize_moves_it(float_dir, tmp_path):
    model = _all_positive_row_model(float_dir, tmp_path)
    name = "model.layers.0.self_attn.q_proj"
    assert (packed(model)[name].zeros[0] == 0).all()
    with pytest.raises(ExportRefusedModules, match=r"outside \[1, 15\].*GPTQ v1 stores zero-point - 1") as info:
        export(model, to="gptq", out=tmp_path / "gptq")
    assert [r.module for r in info.value.refusals] == [name]
    export(model, to="compressed-tensors", out=tmp_path / "ct")  # compressed-tensors holds zero-point 0
    config, state = read_export(tmp_path / "ct")
    assert torch.equal(ct_decompress(config, state, name, torch.float32), packed(model)[name].dequantize_weight())
    report = export(model, to="gptq", out=tmp_path / "gptq", requantize=True)
    assert list(report.added_error) == [name] and 0 < report.added_error[name] < 0.05
    _, state = read_export(tmp_path / "gptq")
    t = module_tensors(state, name)
    assert (gptq_unpack_rows(t["qzeros"].t().contiguous(), 4).t() + 1 >= 1).all()
    ours = packed(model)[name].dequantize_weight()
    w = gptq_reference_weight(t, 4)
    assert (w - ours).norm() / ours.norm() == pytest.approx(report.added_error[name], rel=1e-5)


def test_gptq_refuses_mixed_symmetry(float_dir, tmp_path):
    model = quantized(float_dir, bits=4, group_size=32, symmetric=True, overrides={r"mlp": {"symmetric": False,
                                                                                          "method": "rtn"}})
    with pytest.raises(ExportRefusedModules, match=r"one `sym` per checkpoint.*model.layers.0.mlp.down_proj"):
        export(model, to="gptq", out=tmp_path / "gptq")
    export(model, to="compressed-tensors", out=tmp_path / "ct")  # one config group per scheme


def test_conv1d_modules_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    model = quantized(tmp_path / "gpt2", bits=4, group_size=32, symmetric=True)
    with pytest.raises(ExportRefusedModules, match=r"transformer.h.0.attn.c_attn: GPT-2 Conv1D"):
        export(model, to="compressed-tensors", out=tmp_path / "out")


def test_fused_experts_are_refused(tmp_path):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         num_experts=4, num_experts_per_tok=2)
    Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    model = quantized(tmp_path / "moe", bits=4, group_size=32, symmetric=True)
    with pytest.raises(ExportRefusedModules,
                       match=r"(?s)quantize_experts=False.*mlp.experts.gate_up_proj: fused MoE experts"):
        export(model, to="compressed-tensors", out=tmp_path / "out")


def test_existing_output_folder_needs_overwrite(float_dir, tmp_path):
    model = quantized(float_dir, bits=4, group_size=32, symmetric=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export(model, to="gptq", out=tmp_path / "out")
    export(model, to="gptq", out=tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------------------------
# requantize, and export from a checkpoint folder
# ---------------------------------------------------------------------------------------------------------------


def test_requantize_reports_added_error_and_decompresses_consistently(float_dir, tmp_path):
    model = quantized(float_dir, bits=4, group_size=32)  # mse: fractional zero-points
    modules = packed(model)
    ct_report = export(model, to="compressed-tensors", out=tmp_path / "ct", requantize=True)
    gptq_report = export(model, to="gptq", out=tmp_path / "gptq", requantize=True)
    assert set(ct_report.added_error) == set(modules) == set(gptq_report.added_error)
    assert all(0 < e < 0.05 for e in ct_report.added_error.values())
    assert "requantized 14 modules" in ct_report.summary()
    config, state = read_export(tmp_path / "ct")
    _, gstate = read_export(tmp_path / "gptq")
    for name, module in modules.items():
        ours = module.dequantize_weight()
        w = ct_decompress(config, state, name, torch.float32)
        assert float((w - ours).norm() / ours.norm()) == pytest.approx(ct_report.added_error[name], rel=1e-5)
        wq = gptq_reference_weight(module_tensors(gstate, name), 4)
        assert float((wq - ours).norm() / ours.norm()) == pytest.approx(gptq_report.added_error[name], rel=1e-5)
        # never worse than plain re-rounding: our codes under integer zero-points round(z) and float16 scales
        s, z = module.scales.float().repeat_interleave(32, 1), module.zeros.float().round().repeat_interleave(32, 1)
        nearest = ((ours / s + z).round().clamp(0, 15) - z) * s
        assert ct_report.added_error[name] <= float((nearest - ours).norm() / ours.norm()) + 1e-7
    # double-quantized scales: GPTQ's float16 scales cost little
    dq = quantized(float_dir, bits=4, group_size=32, symmetric=True, double_quant=True)
    report = export(dq, to="gptq", out=tmp_path / "dq", requantize=True)
    assert set(report.added_error) == set(packed(dq)) and max(report.added_error.values()) < 0.02
    # exact modules are not re-rounded: a requantize export of an exact model reports nothing
    exact = quantized(float_dir, bits=4, group_size=32, symmetric=True)
    assert export(exact, to="gptq", out=tmp_path / "exact", requantize=True).added_error == {}


def test_export_from_checkpoint_folder_copies_tokenizer_and_config(float_dir, tmp_path):
    model = quantized(float_dir, bits=4, group_size=32, symmetric=True)
    model.save_pretrained(tmp_path / "hfq")
    (tmp_path / "hfq" / "tokenizer.json").write_text('{"fake": true}')
    (tmp_path / "hfq" / "README.md").write_text("hf_quant model card")
    report = export(str(tmp_path / "hfq"), to="compressed-tensors", out=tmp_path / "ct")
    assert (tmp_path / "ct" / "tokenizer.json").read_text() == '{"fake": true}'
    assert not (tmp_path / "ct" / "README.md").exists()
    assert "tokenizer.json" in report.files and "generation_config.json" in report.files
    config, state = read_export(tmp_path / "ct")
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["model_type"] == "llama" and config["hidden_size"] == 64
    assert not any(k.endswith((".qweight", ".scales")) for k in state)
    for name, module in packed(model).items():
        assert torch.equal(ct_decompress(config, state, name, torch.float32), module.dequantize_weight())


def test_unknown_target_and_bad_options(float_dir, tmp_path):
    model = quantized(float_dir, bits=4, group_size=32, symmetric=True)
    with pytest.raises(ValueError, match="to must be one of"):
        export(model, to="onnx", out=tmp_path / "x")
    with pytest.raises(ValueError, match="scale_dtype applies to compressed-tensors only"):
        export(model, to="gptq", out=tmp_path / "x", scale_dtype=torch.float32)
    with pytest.raises(ValueError, match="no hf_quant packed module"):
        export(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2)), to="gptq",
               out=tmp_path / "x")


def test_cli_export_writes_the_target_or_refuses_with_status_2(float_dir, tmp_path, capsys):
    from hf_quant.cli import main

    quantized(float_dir, bits=4, group_size=32, symmetric=True).save_pretrained(tmp_path / "sym")
    assert main(["export", str(tmp_path / "sym"), "--to", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    quantized(float_dir, bits=4, group_size=32).save_pretrained(tmp_path / "asym")  # mse: fractional zero-points
    assert main(["export", str(tmp_path / "asym"), "--to", "gptq", "--out", str(tmp_path / "g")]) == 2
    assert "zero-point" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_requantize_reports_the_whole_models_perplexity_change(tmp_path, monkeypatch, capsys):
    """`requantize` measures the model's perplexity with hf_quant's weights and with the re-fitted ones; the latter is
    what the target's own reader gives (transformers loading the compressed-tensors export)."""
    from transformers import AutoTokenizer

    from hf_quant.eval import perplexity
    from tiny_families import byte_level_tokenizer, tiny_family

    monkeypatch.setenv("HF_QUANT_KERNEL", "reference")
    torch.manual_seed(0)
    src, ckpt = tmp_path / "float", tmp_path / "hfq"
    tiny_family("llama").save_pretrained(src)
    byte_level_tokenizer(src)
    # double-quantized scales are not float16 numbers: re-fitted, symmetric (transformers' compressed load path)
    model = quantized(src, bits=4, group_size=32, symmetric=True, double_quant=True)
    model.save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(src).save_pretrained(ckpt)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog; " * 40)
    report = export(ckpt, to="compressed-tensors", out=tmp_path / "ct", requantize=True, perplexity_text=str(text),
                    perplexity_tokens=300)
    assert report.added_error and report.perplexity_note is None
    p = report.perplexity
    assert (p["text"], p["tokens"]) == ("text.txt", 300) and p["after"] != p["before"]
    tok = AutoTokenizer.from_pretrained(ckpt)
    body = text.read_text()
    assert p["before"] == pytest.approx(perplexity(AutoModelForCausalLM.from_pretrained(ckpt), tok, body,
                                                   max_tokens=300), rel=1e-6)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert p["after"] == pytest.approx(perplexity(loaded, tok, body, max_tokens=300), rel=1e-5)
    assert f"{p['before']:.4f} with hf_quant's weights -> {p['after']:.4f}" in report.summary()
    # skipped on request; a source without a tokenizer says why
    assert export(ckpt, to="compressed-tensors", out=tmp_path / "ct2", requantize=True,
                  perplexity_text=None).perplexity is None
    bare = quantized(src, bits=4, group_size=32, symmetric=True, double_quant=True)
    bare.save_pretrained(tmp_path / "bare")
    report = export(tmp_path / "bare", to="compressed-tensors", out=tmp_path / "ct3", requantize=True,
                    perplexity_text=str(text))
    assert report.perplexity is None and "no tokenizer" in report.perplexity_note
    assert "perplexity change not measured: no tokenizer" in report.summary()
    with pytest.raises(FileNotFoundError, match="perplexity_text 'nope.txt'"):
        export(ckpt, to="compressed-tensors", out=tmp_path / "ct4", requantize=True, perplexity_text="nope.txt")
    # the CLI prints it
    from hf_quant.cli import main

    assert main(["export", str(ckpt), "--to", "gptq", "--out", str(tmp_path / "cli"), "--requantize",
                 "--perplexity-text", str(text), "--perplexity-tokens", "300"]) == 0
    printed = capsys.readouterr().out
    assert f"perplexity (text.txt, 300 tokens): {p['before']:.4f} with hf_quant's weights -> " in printed
