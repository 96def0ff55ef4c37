"""hf_quant.load_foreign: GPTQ, AWQ and compressed-tensors checkpoints imported onto hf_quant's packed modules without
dequantizing. Export -> import round trips bit-identically (packed tensors, logits) on two model families; the
compressed-tensors library's own checkpoint and decompression, and a hand-packed AWQ checkpoint, import to exactly
their decoded weights; every refusal names the file/module/tensor with its reason and fix."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from extreme_helpers import tiny_llama_folder
from export_cases import GPTQ_CASES
from hf_quant import HfQuantConfig, dequantize_model, export, load_foreign
from hf_quant.export.packing import pack_int32
from hf_quant.importers import ImportRefused, ImportRefusedModules
from hf_quant.nn import PackedWeight, QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")
# These tests are about the blocks' codes: the head stays float (the default 8-bit per-channel head, symmetric, is
# not a GGUF block and mixes symmetric with asymmetric GPTQ cases; test_targets and test_lm_head export heads).
PIN = {"lm_head": "float"}


def tiny_qwen2_folder(path):
    torch.manual_seed(1)  # q/k/v with biases, tied embeddings
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    return {"llama": tiny_llama_folder(root / "llama"), "qwen2": tiny_qwen2_folder(root / "qwen2")}


def quantized(folder, **settings):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=HfQuantConfig(**PIN, **settings))


def packed(model) -> dict[str, PackedWeight]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedWeight)}


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def assert_same_model(ours, imported):
    """Packed tensors, schemes' storage settings, float modules and logits identical."""
    a, b = packed(ours), packed(imported)
    assert sorted(a) == sorted(b)
    for name, m in a.items():
        n = b[name]
        s, t = m.scheme, n.scheme
        assert (s.format, s.bits, s.group_size, s.symmetric) == (t.format, t.bits, t.group_size, t.symmetric), name
        assert m.packed_names == n.packed_names, name
        for k in m.packed_names:
            assert torch.equal(getattr(m, k), getattr(n, k)), f"{name}.{k}"
    for name, m in ours.named_modules():
        if type(m) is torch.nn.Linear:
            assert type(imported.get_submodule(name)) is torch.nn.Linear, name
    for k, v in ours.state_dict().items():
        assert torch.equal(v, imported.state_dict()[k]), k
    assert torch.equal(logits(ours), logits(imported))


CT_CASES = {
    "int4-sym-g32": dict(bits=4, group_size=32, symmetric=True),
    "int4-asym-g32-rtn": dict(bits=4, group_size=32, method="rtn"),
    "int8-sym-channel": dict(bits=8, group_size=-1, symmetric=True),
    "int8-asym-channel-rtn": dict(bits=8, group_size=-1, method="rtn"),
    "int5-sym-g32": dict(bits=5, group_size=32, symmetric=True),
    "mixed": dict(bits=4, group_size=32, symmetric=True,
                  overrides={r"mlp\.down_proj": {"bits": 8, "group_size": -1},
                             r"self_attn\.v_proj": {"bits": 3, "symmetric": False, "method": "rtn"},
                             r"layers\.1\.self_attn\.o_proj": None}),
    "lm_head": dict(bits=4, group_size=32, symmetric=True, modules_to_not_convert=[]),
}
ROUND_TRIPS = ([("compressed-tensors", c, "llama") for c in CT_CASES] + [("gptq", c, "llama") for c in GPTQ_CASES]
               + [("compressed-tensors", "int4-asym-g32-rtn", "qwen2"), ("compressed-tensors", "mixed", "qwen2"),
                  ("gptq", "int4-sym-g32", "qwen2"), ("gptq", "mixed-bits", "qwen2")])


@pytest.mark.parametrize("target,case,family", ROUND_TRIPS, ids=[f"{t}-{c}-{f}" for t, c, f in ROUND_TRIPS])
def test_export_import_round_trip_is_bit_identical(folders, tmp_path, target, case, family):
    settings = (CT_CASES if target == "compressed-tensors" else GPTQ_CASES)[case]
    ours = quantized(folders[family], **settings)
    export(ours, to=target, out=tmp_path / "exported")
    imported = load_foreign(tmp_path / "exported")
    assert_same_model(ours, imported)
    assert isinstance(imported.config.quantization_config, HfQuantConfig)
    if case == "mixed-bits":  # GPTQModel's dynamic "-:" keeps the module float
        qc = json.loads((tmp_path / "exported" / "config.json").read_text())["quantization_config"]
        assert "-:^model\\.layers\\.0\\.mlp\\.up_proj$" in qc["dynamic"]
        assert type(imported.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_imported_model_saves_reloads_reexports_and_dequantizes(folders, tmp_path):
    ours = quantized(folders["llama"], bits=4, group_size=32, symmetric=True)
    export(ours, to="gptq", out=tmp_path / "gptq")
    imported = load_foreign(tmp_path / "gptq")
    imported.save_pretrained(tmp_path / "hfq")  # an hf_quant checkpoint now
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hfq")
    assert torch.equal(logits(reloaded), logits(ours))
    export(imported, to="gptq", out=tmp_path / "again")  # re-export: the same tensors
    first, again = load_file(str(tmp_path / "gptq" / "model.safetensors")), load_file(
        str(tmp_path / "again" / "model.safetensors"))
    assert sorted(first) == sorted(again) and all(torch.equal(first[k], again[k]) for k in first)
    weights = {n: m.dequantize_weight() for n, m in packed(imported).items()}
    floats = dequantize_model(imported, torch.float32)
    for n, w in weights.items():
        assert torch.equal(floats.get_submodule(n).weight, w)


def test_imported_model_trains_a_lora_adapter(folders, tmp_path):
    peft = pytest.importorskip("peft")
    export(quantized(folders["llama"], bits=4, group_size=32, symmetric=True), to="compressed-tensors",
           out=tmp_path / "ct")
    model = peft.get_peft_model(load_foreign(tmp_path / "ct"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------------------------
# independent writers: the compressed-tensors library itself, and AutoAWQ's GEMM packing written from its source
# ---------------------------------------------------------------------------------------------------------------


def _float_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("symmetric,bits,strategy", [(False, 4, "group"), (True, 8, "channel"), (True, 4, "group"),
                                                     (False, 3, "group")])
def test_compressed_tensors_library_checkpoint_imports_to_its_own_decompression(folders, tmp_path, symmetric, bits,
                                                                                 strategy):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=32 if strategy == "group" else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    model = _float_model(folders["qwen2"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight")  # tied to the embedding
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    maxq = (1 << bits) - 1
    for name in names:
        w = state.pop(f"{name}.weight")
        g = 32 if strategy == "group" else w.shape[1]
        wg = w.view(w.shape[0], -1, g)
        if symmetric:
            scale = (wg.abs().amax(-1) / (maxq // 2)).half()
            zp = None
        else:
            lo, hi = wg.amin(-1).clamp_max(0), wg.amax(-1).clamp_min(0)
            scale = ((hi - lo) / maxq).half()
            zp = (torch.round(-lo / scale.float()) - (1 << (bits - 1))).clamp(-(1 << (bits - 1)), maxq // 2)
            zp = zp.to(torch.int8)
        local = {"weight": w, "weight_scale": scale}
        if zp is not None:
            local["weight_zero_point"] = zp
        out = compressor.compress(local, scheme)  # the library's own quantize + pack
        state.update({f"{name}.{k}": v for k, v in out.items()})
    folder = tmp_path / "ct"
    shutil.copytree(folders["qwen2"], folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                 quantization_status="compressed", ignore=["lm_head"])
    config["quantization_config"] = json.loads(qconfig.model_dump_json())
    (folder / "config.json").write_text(json.dumps(config))
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"

    imported = load_foreign(folder)
    assert sorted(packed(imported)) == sorted(names)
    for name in names:
        local = {k.rpartition(".")[2]: v for k, v in state.items() if k.rpartition(".")[0] == name}
        theirs = compressor.decompress(local, scheme)["weight"]  # float16, the scales' dtype
        ours = imported.get_submodule(name).dequantize_weight(torch.float32)
        assert torch.equal(theirs, ours.half()), name
        local["weight_scale"] = local["weight_scale"].float()
        assert torch.equal(compressor.decompress(local, scheme)["weight"], ours), name  # exact in float32
    assert imported.get_submodule(names[0]).scheme.symmetric == symmetric


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's WQLinear_GEMM.from_linear order_map


def awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM pack loop: codes [rows, cols] -> int32 [rows, cols / 8], word col's field i holding column
    8 col + AWQ_ORDER[i]."""
    rows, cols = codes.shape
    q = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for col in range(cols // 8):
        for i in range(8):
            q[:, col] |= codes[:, col * 8 + AWQ_ORDER[i]].to(torch.int64) << (i * 4)
    return torch.where(q >= 1 << 31, q - (1 << 32), q).to(torch.int32)


def awq_reference_decode(qweight, qzeros, scales, group_size):
    """AutoAWQ's unpack_awq + reverse_awq_order + dequantize_gemm ([in, out], float16 arithmetic)."""
    shifts = torch.arange(0, 32, 4)
    rev = torch.arange(qweight.shape[1] * 8).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    iw = (torch.bitwise_right_shift(qweight[:, :, None], shifts).view(qweight.shape[0], -1)[:, rev]) & 15
    iz = (torch.bitwise_right_shift(qzeros[:, :, None], shifts).view(qzeros.shape[0], -1)[:, rev]) & 15
    return (iw - iz.repeat_interleave(group_size, 0)) * scales.repeat_interleave(group_size, 0)


def hand_built_awq(folder_in, out, group_size=32, version="gemm", bits=4):
    torch.manual_seed(3)
    model = _float_model(folder_in)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {}
    for name, m in model.named_modules():
        if type(m) is not torch.nn.Linear or name == "lm_head":
            continue
        o, i = m.weight.shape
        codes = torch.randint(0, 16, (o, i))
        zeros = torch.randint(0, 16, (o, i // group_size))
        scales = (torch.rand(o, i // group_size) * 0.01 + 1e-3).half()
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = awq_pack(codes.t())
        state[f"{name}.qzeros"] = awq_pack(zeros.t())
        state[f"{name}.scales"] = scales.t().contiguous()
        expected[name] = (codes - zeros.repeat_interleave(group_size, 1)).float() * scales.float().repeat_interleave(
            group_size, 1)
    shutil.copytree(folder_in, out)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group_size,
                                     "zero_point": True, "version": version, "modules_to_not_convert": None}
    (out / "config.json").write_text(json.dumps(config))
    return expected, state


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hand_packed_awq_checkpoint_imports_to_the_expected_weights(folders, tmp_path, family):
    expected, state = hand_built_awq(folders[family], tmp_path / "awq")
    imported = load_foreign(tmp_path / "awq")
    assert sorted(packed(imported)) == sorted(expected)
    for name, w in expected.items():
        module = imported.get_submodule(name)
        assert module.scheme.bits == 4 and module.scheme.group_size == 32 and not module.scheme.symmetric
        ours = module.dequantize_weight(torch.float32)
        assert torch.equal(ours, w), name
        ref = awq_reference_decode(state[f"{name}.qweight"], state[f"{name}.qzeros"], state[f"{name}.scales"], 32)
        assert ref.dtype == torch.float16 and torch.equal(ref.t(), ours.half()), name  # AutoAWQ decodes in float16
    assert torch.isfinite(logits(imported)).all()


# ---------------------------------------------------------------------------------------------------------------
# refusals: file / module / tensor named, with the reason and the fix
# ---------------------------------------------------------------------------------------------------------------


def _edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _refusal(folder, pattern, where=None):
    with pytest.raises(ImportRefused) as info:
        load_foreign(folder)
    message = str(info.value)
    # each refusal reads "where: reason. Fix: fix"; a checkpoint's refusals are listed together, grouped by fix
    texts = [message] + [str(r) for r in getattr(info.value, "refusals", [])]
    assert any(re.search(pattern, t, re.S) for t in texts), message
    assert "Fix:" in message or "fix:" in message
    if where is not None:
        assert where in message, message
    return info.value


@pytest.fixture(scope="module")
def exports(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, target, settings in [
        ("gptq-sym", "gptq", dict(bits=4, group_size=32, symmetric=True)),
        ("gptq-asym", "gptq", dict(bits=4, group_size=32, method="rtn")),
        ("ct-sym", "compressed-tensors", dict(bits=4, group_size=32, symmetric=True)),
        ("ct-fp8", "compressed-tensors", dict(format="fp8", group_size=-1)),
    ]:
        export(quantized(folders["llama"], **settings), to=target, out=root / name)
        out[name] = root / name
    return out


def fresh(exports, name, tmp_path):
    shutil.copytree(exports[name], tmp_path / name)
    return tmp_path / name


Q = "model.layers.0.self_attn.q_proj"


def test_gptq_act_order_g_idx_is_refused(exports, tmp_path):
    folder = fresh(exports, "gptq-sym", tmp_path)
    _edit_config(folder, lambda qc: qc.update(desc_act=True))
    # desc_act with groups still i // g (static groups) is exact
    assert packed(load_foreign(folder))[Q].scheme.bits == 4
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    _edit_tensors(folder, lambda s: s.__setitem__(f"{Q}.g_idx", (perm // 32).to(torch.int32)))
    _refusal(folder, r"activation-order \(desc_act\).*Fix: use a checkpoint quantized without desc_act", f"{Q}.g_idx")


def test_gptq_inconsistent_g_idx_is_refused(exports, tmp_path):
    folder = fresh(exports, "gptq-sym", tmp_path)
    _edit_tensors(folder, lambda s: s[f"{Q}.g_idx"].__setitem__(3, 7))
    _refusal(folder, r"group indices outside \[0, 2\).*Fix:", f"{Q}.g_idx")
    folder = fresh(exports, "gptq-asym", tmp_path / "b")
    _edit_tensors(folder, lambda s: s[f"{Q}.g_idx"].__setitem__(3, 1))
    _refusal(folder, r"inconsistent group indices", f"{Q}.g_idx")


def test_gptq_sym_with_other_zero_points_imports_as_asymmetric(folders, exports, tmp_path):
    folder = fresh(exports, "gptq-asym", tmp_path)
    _edit_config(folder, lambda qc: qc.update(sym=True))  # zero-points are not all 8: asymmetric, exactly
    imported = load_foreign(folder)
    assert_same_model(quantized(folders["llama"], bits=4, group_size=32, method="rtn"), imported)


def test_gptq_negative_scales_import_exactly(exports, tmp_path):
    """AutoRound's symmetric GPTQ export signs its scales; a group with scale -s decodes to minus its weights, and
    imports exactly (flipped codes and zero-point, asymmetric)."""
    folder = fresh(exports, "gptq-sym", tmp_path)
    before = load_foreign(folder).get_submodule(Q).dequantize_weight()  # [64 out, 64 in], groups of 32
    flip = torch.zeros(2, 64, dtype=torch.bool)  # [groups, out] as GPTQ stores scales
    flip[0, ::3] = flip[1, 5:40] = True
    _edit_tensors(folder, lambda s: s.__setitem__(f"{Q}.scales", torch.where(flip, -s[f"{Q}.scales"],
                                                                             s[f"{Q}.scales"])))
    layer = load_foreign(folder).get_submodule(Q)
    expected = torch.where(flip.t().repeat_interleave(32, dim=1), -before, before)
    assert torch.equal(layer.dequantize_weight(), expected)
    assert not layer.scheme.symmetric


def test_gptq_refusals(exports, tmp_path):
    folder = fresh(exports, "gptq-sym", tmp_path / "bits")
    _edit_config(folder, lambda qc: qc.update(bits=5))
    _refusal(folder, r"5-bit codes: hf_quant imports 2, 3, 4, 8-bit.*Fix:", Q)
    folder = fresh(exports, "gptq-sym", tmp_path / "fmt")
    _edit_config(folder, lambda qc: qc.update(checkpoint_format="marlin", format="marlin"))
    _refusal(folder, r"checkpoint_format 'marlin'.*Fix: convert", "config.json")
    folder = fresh(exports, "gptq-sym", tmp_path / "group")
    _edit_config(folder, lambda qc: qc.update(group_size=16))
    _refusal(folder, r"group size 16 .*hf_quant's group sizes", Q)
    folder = fresh(exports, "gptq-sym", tmp_path / "regex")
    _edit_config(folder, lambda qc: qc.update(dynamic={"+:(a|aa)*b": {"bits": 8}}))
    _refusal(folder, r"nested repetition", "config.json")
    # a zero-point of 0 written as v1's -1: readers disagree on what it means
    folder = fresh(exports, "gptq-asym", tmp_path / "zero")
    _edit_tensors(folder, lambda s: s[f"{Q}.qzeros"].__setitem__((0, 0), s[f"{Q}.qzeros"][0, 0] | 0xF))
    _refusal(folder, r"a zero field is 15 .*Fix: re-export with GPTQModel in its 'gptq_v2'", f"{Q}.qzeros")


def test_tampered_tensors_are_refused_naming_the_tensor(exports, tmp_path):
    cases = [
        ("shape", lambda s: s.__setitem__(f"{Q}.qweight", s[f"{Q}.qweight"][:-1]), r"has shape \[7, 64\], expected "
         r"\[8, 64\]", f"{Q}.qweight"),
        ("dtype", lambda s: s.__setitem__(f"{Q}.qweight", s[f"{Q}.qweight"].float()), r"stored as torch.float32, "
         "expected torch.int32", f"{Q}.qweight"),
        ("scale", lambda s: s[f"{Q}.scales"].__setitem__((0, 0), 0.0), r"a scale is 0.0 .*must be finite and > 0",
         f"{Q}.scales"),
        ("nan", lambda s: s[f"{Q}.scales"].__setitem__((0, 0), float("nan")), r"a scale is nan", f"{Q}.scales"),
        ("stray", lambda s: s.__setitem__(f"{Q}.input_scale", torch.ones(1)), "a tensor the GPTQ layout does not have",
         f"{Q}.input_scale"),
        ("missing", lambda s: s.pop("model.norm.weight"), r"missing_keys: \['model.norm.weight'\].*nothing is left "
         "randomly initialised", None),
        ("unknown", lambda s: s.__setitem__("model.layers.0.mlp.bogus.qweight", torch.zeros(1, 1, dtype=torch.int32)),
         "not a linear layer of LlamaForCausalLM", "model.layers.0.mlp.bogus"),
    ]
    for tag, edit, pattern, where in cases:
        folder = fresh(exports, "gptq-sym", tmp_path / tag)
        _edit_tensors(folder, edit)
        _refusal(folder, pattern, where)
    folder = fresh(exports, "ct-sym", tmp_path / "ct-shape")
    _edit_tensors(folder, lambda s: s.__setitem__(f"{Q}.weight_shape", torch.tensor([64, 96])))
    _refusal(folder, r"is \[64, 96\], but the model's config makes this weight \[64, 64\]", f"{Q}.weight_shape")
    folder = fresh(exports, "ct-sym", tmp_path / "ct-zp")  # a symmetric scheme's stored zero-point must be 0
    _edit_tensors(folder, lambda s: s.__setitem__(f"{Q}.weight_zero_point", torch.ones(64, 2, dtype=torch.int8)))
    _refusal(folder, "a symmetric scheme with non-zero zero-points", f"{Q}.weight_zero_point")
    folder = fresh(exports, "ct-sym", tmp_path / "ct-scale")  # float32 scales must be exact float16 values
    _edit_tensors(folder, lambda s: s.__setitem__(f"{Q}.weight_scale", s[f"{Q}.weight_scale"].float() * (1 + 1e-6)))
    _refusal(folder, "is not a normal float16 value", f"{Q}.weight_scale")


def test_compressed_tensors_refusals(exports, tmp_path):
    folder = fresh(exports, "ct-fp8", tmp_path / "fp8")
    _refusal(folder, r"float weights in format 'naive-quantized'.*Fix: load it with", Q)
    for tag, act in (("static", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                                 "dynamic": False}),
                     ("dynamic", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                  "dynamic": True})):
        folder = fresh(exports, "ct-sym", tmp_path / tag)
        _edit_config(folder, lambda qc: qc["config_groups"]["group_0"].update(input_activations=act))
        _refusal(folder, rf"{tag} input activations quantization.*importing the weights alone would change", Q)
    folder = fresh(exports, "ct-sym", tmp_path / "nvfp4")
    _edit_config(folder, lambda qc: qc["config_groups"]["group_0"].update(
        format="nvfp4-pack-quantized", weights={"num_bits": 4, "type": "float", "strategy": "tensor_group",
                                                "group_size": 16, "symmetric": True, "dynamic": False}))
    _refusal(folder, r"float weights in format 'nvfp4-pack-quantized'", Q)
    folder = fresh(exports, "ct-sym", tmp_path / "sparse")
    _edit_config(folder, lambda qc: qc.update(sparsity_config={"format": "sparse-24-bitmask",
                                                               "sparsity_structure": "2:4"}))
    _refusal(folder, r"a sparsity config \(e.g. 2:4\)", "config.json")
    folder = fresh(exports, "ct-sym", tmp_path / "bits7")
    _edit_config(folder, lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=7))
    _refusal(folder, r"7-bit codes", Q)
    folder = fresh(exports, "ct-sym", tmp_path / "ignored")
    _edit_config(folder, lambda qc: qc.update(ignore=qc["ignore"] + ["re:.*q_proj$"]))
    _refusal(folder, r"`ignore` list keeps this module in float but the checkpoint stores it packed", Q)
    folder = fresh(exports, "ct-sym", tmp_path / "uncompressed")
    _edit_config(folder, lambda qc: qc.update(quantization_status="frozen"))
    _refusal(folder, r"quantization_status 'frozen'", "config.json")


def test_compressed_tensors_class_and_regex_targets(folders, exports, tmp_path):
    folder = fresh(exports, "ct-sym", tmp_path)
    _edit_config(folder, lambda qc: qc["config_groups"]["group_0"].update(targets=["Linear"]))
    imported = load_foreign(folder)
    assert_same_model(quantized(folders["llama"], bits=4, group_size=32, symmetric=True), imported)
    _edit_config(folder, lambda qc: qc["config_groups"]["group_0"].update(targets=["re:.*_proj$"]))
    assert sorted(packed(load_foreign(folder))) == sorted(packed(imported))


def test_awq_refusals(folders, tmp_path):
    for tag, kwargs, pattern in [("gemv", dict(version="gemv"), r"AWQ version 'gemv'.*GEMM layout only"),
                                 ("bits", dict(bits=8), r"8-bit codes: hf_quant imports 4-bit")]:
        hand_built_awq(folders["llama"], tmp_path / tag, **kwargs)
        _refusal(tmp_path / tag, pattern)
    hand_built_awq(folders["llama"], tmp_path / "skip")
    _edit_config(tmp_path / "skip", lambda qc: qc.update(modules_to_not_convert=["q_proj"]))
    _refusal(tmp_path / "skip", "modules_to_not_convert keeps this module in float", Q)


def test_untrusted_files_are_refused(folders, exports, tmp_path):
    folder = fresh(exports, "gptq-sym", tmp_path / "bin")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    _refusal(folder, r"only pytorch_model.bin.*safetensors only", str(folder))
    folder = fresh(exports, "gptq-sym", tmp_path / "index")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../model.safetensors"}}))
    _refusal(folder, r"weight_map names '../model.safetensors'", "model.safetensors.index.json")
    folder = fresh(exports, "gptq-sym", tmp_path / "method")
    _edit_config(folder, lambda qc: qc.update(quant_method="bitsandbytes"))
    _refusal(folder, r"quant_method 'bitsandbytes'", "config.json")
    _refusal(folders["llama"], "not a quantized checkpoint", "config.json")
    with pytest.raises(ValueError, match="decides `quantization_config`"):
        load_foreign(folder, quantization_config=HfQuantConfig())


def test_every_refused_module_is_listed(exports, tmp_path):
    folder = fresh(exports, "gptq-sym", tmp_path)
    _edit_config(folder, lambda qc: qc.update(group_size=16))
    with pytest.raises(ImportRefusedModules) as info:
        load_foreign(folder)
    assert len(info.value.refusals) == 14 and "and 6 more" in str(info.value)
    assert all(isinstance(r, ImportRefused) and r.fix for r in info.value.refusals)


def test_load_foreign_is_lazy():
    import subprocess
    import sys

    code = "import sys, hf_quant; print('hf_quant.importers' in sys.modules, callable(hf_quant.load_foreign))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
    assert isinstance(QuantLinear, type)


@pytest.mark.real_model
def test_smollm2_export_import_round_trips(tmp_path, monkeypatch):
    """SmolLM2-135M int4 g64 (576 in-features: not a multiple of 128): GPTQ and compressed-tensors asymmetric."""
    from hf_quant.assets import smollm2_path

    monkeypatch.setenv("HF_QUANT_KERNEL", "reference")
    for target, settings in (("gptq", dict(bits=4, group_size=64, symmetric=True, method="rtn")),
                             ("compressed-tensors", dict(bits=4, group_size=64, method="rtn"))):
        ours = quantized(smollm2_path(), **settings)
        export(ours, to=target, out=tmp_path / target)
        imported = load_foreign(tmp_path / target)
        assert len(packed(imported)) == 30 * 7
        assert_same_model(ours, imported)
