"""hf_quant.export to GGUF: the gguf package (llama.cpp's gguf-py) decodes every quantized tensor to exactly
hf_quant's dequantized weight; transformers loads the file (`gguf_file=`) with hf_quant's logits, for tiny models of
each family llama.cpp's layout covers (Llama's permuted Q/K rows, Qwen2's biases, Qwen3's Q/K norms, Gemma 3's
shifted norms); the tokenizer round-trips; SmolLM2's export carries the same vocabulary as the GGUF it came from;
every refusal names the module, the reason and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hf_quant import HfQuantConfig
from hf_quant.export import ExportRefusedModules, export
from hf_quant.export.gguf import pack_blocks
from hf_quant.nn import PackedWeight
from tiny_families import VOCAB, byte_level_tokenizer, sentencepiece_style_tokenizer, tiny_family

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.usefixtures("one_thread")
# These tests are about the blocks' codes: the head stays float (the default 8-bit per-channel head, symmetric, is
# not a GGUF block and mixes symmetric with asymmetric GPTQ cases; test_targets and test_lm_head export heads).
PIN = {"lm_head": "float"}

@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    dirs = {}
    for kind in ("llama", "qwen2", "qwen3", "gemma3"):
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(f"gguf-{kind}")
        tiny_family(kind).save_pretrained(folder)
        byte_level_tokenizer(folder)
        dirs[kind] = folder
    return dirs


def quantize_and_save(folder, out, **settings):
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=HfQuantConfig(**PIN, **settings))
    model.save_pretrained(out)
    PreTrainedTokenizerFast.from_pretrained(folder).save_pretrained(out)
    return model


def read_gguf(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def decoded(tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))


def permute_rows(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


CASES = {
    "q4_0": (dict(bits=4, group_size=32, symmetric=True), "Q4_0"),
    "q8_0": (dict(bits=8, group_size=32, symmetric=True), "Q8_0"),
    "q5_0": (dict(bits=5, group_size=32, symmetric=True), "Q5_0"),
}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_package_decodes_our_weights_bit_for_bit(family_dirs, tmp_path, kind, case):
    settings, qtype = CASES[case]
    model = quantize_and_save(family_dirs[kind], tmp_path / "q", **settings)
    report = export(tmp_path / "q", to="gguf", out=tmp_path / "model.gguf")
    assert report.files == ["model.gguf"] and not report.added_error
    reader, tensors = read_gguf(tmp_path / "model.gguf")
    cfg = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, {"llama": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3",
                                                              "gemma3": "GEMMA3"}[kind]), cfg.num_hidden_layers)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedWeight)}
    assert len(packed) == 7 * cfg.num_hidden_layers
    for name, module in packed.items():
        t = tensors[names.get_name(name + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type == getattr(gguf.GGMLQuantizationType, qtype)
        ours = module.dequantize_weight(torch.float32)
        if kind == "llama" and name.endswith("q_proj"):
            ours = permute_rows(ours, cfg.num_attention_heads)
        if kind == "llama" and name.endswith("k_proj"):
            ours = permute_rows(ours, cfg.num_key_value_heads)
        assert torch.equal(decoded(t), ours), name
    # metadata llama.cpp reads
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.block_count"].contents() == cfg.num_hidden_layers
    assert reader.fields[f"{arch}.attention.head_count_kv"].contents() == cfg.num_key_value_heads
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert ("output.weight" in tensors) == (not cfg.tie_word_embeddings)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma3"])
def test_transformers_loads_our_gguf_with_our_logits(family_dirs, tmp_path, kind):
    model = quantize_and_save(family_dirs[kind], tmp_path / "q", bits=4, group_size=32, symmetric=True,
                              overrides={r"mlp\.down_proj": {"bits": 8}})
    export(tmp_path / "q", to="gguf", out=tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    reference = model.dequantize() if hasattr(model, "dequantize") else model
    torch.testing.assert_close(_logits(loaded, ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_tokenizer_round_trips_through_transformers_gguf_reader(family_dirs, tmp_path):
    quantize_and_save(family_dirs["qwen2"], tmp_path / "q", bits=4, group_size=32, symmetric=True)
    export(tmp_path / "q", to="gguf", out=tmp_path / "model.gguf")
    from transformers import AutoTokenizer

    ours = PreTrainedTokenizerFast.from_pretrained(family_dirs["qwen2"])
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    text = "the thin man ran in the 12 rain; then?"
    assert theirs(text)["input_ids"] == ours(text)["input_ids"]
    reader, _ = read_gguf(tmp_path / "model.gguf")
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == ours.eos_token_id


@pytest.mark.parametrize("bits,sym,kind", [(4, True, "Q4_0"), (4, False, "Q4_1"), (5, True, "Q5_0"),
                                           (5, False, "Q5_1"), (8, True, "Q8_0")])
def test_block_packing_matches_gguf_reference(bits, sym, kind):
    """Fresh random codes and float16-exact parameters at an awkward shape: our blocks decode, in gguf-py's
    dequantize, to (q - z) * s computed as hf_quant computes it."""
    g = torch.Generator().manual_seed(bits * 7 + sym)
    out, n = 7, 96
    codes = torch.randint(0, 1 << bits, (out, n), generator=g).to(torch.uint8)
    scale = (torch.rand(out, n // 32, generator=g) * 0.1 + 1e-3).half().float()
    zero = None
    if sym:
        zp = torch.full_like(scale, float(1 << (bits - 1)))
    else:  # zero-points whose offset -s*z is a float16 number: powers of two times small integers
        scale = 2.0 ** torch.randint(-10, -2, scale.shape, generator=g).float()
        zero = zp = torch.randint(0, 1 << bits, scale.shape, generator=g).float()
    blocks = pack_blocks(kind, codes, scale, zero)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    assert blocks.shape == (out, n // 32 * gguf.GGML_QUANT_SIZES[qtype][1])
    theirs = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype))
    ours = ((codes.float().view(out, -1, 32) - zp[..., None]) * scale[..., None]).view(out, n)
    assert torch.equal(theirs, ours)


REFUSALS = [
    (dict(bits=4, group_size=64, symmetric=True), "group_size=32"),
    (dict(bits=3, group_size=32), "K-quants"),
    (dict(bits=4, group_size=32), "not float16 numbers"),  # mse: fractional zero-points -> Q4_1 offsets
    (dict(format="nf4", group_size=32), "no affine integer weights|NF4|nf4"),
    (dict(bits=4, group_size=32, symmetric=True, rotation="hadamard"), "online input rotation"),
]


@pytest.mark.parametrize("settings,pattern", REFUSALS)
def test_refusals_name_module_reason_and_fix(family_dirs, tmp_path, settings, pattern):
    quantize_and_save(family_dirs["llama"], tmp_path / "q", **settings)
    with pytest.raises(ExportRefusedModules, match=pattern) as info:
        export(tmp_path / "q", to="gguf", out=tmp_path / "model.gguf")
    assert "model.layers.0." in str(info.value) and "fix" in str(info.value).lower()
    assert not (tmp_path / "model.gguf").exists()


def test_requantize_q4_1_reports_small_added_error(family_dirs, tmp_path):
    model = quantize_and_save(family_dirs["llama"], tmp_path / "q", bits=4, group_size=32)
    report = export(tmp_path / "q", to="gguf", out=tmp_path / "model.gguf", requantize=True)
    assert len(report.added_error) == 14
    # rounding the offset to float16 costs a tiny fraction of the 4-bit error itself (~1e-1 relative)
    assert 0 < max(report.added_error.values()) < 2e-3
    _, tensors = read_gguf(tmp_path / "model.gguf")
    w = model.model.layers[1].mlp.up_proj.dequantize_weight(torch.float32)
    theirs = decoded(tensors["blk.1.ffn_up.weight"])
    rel = float((theirs - w).norm() / w.norm())
    assert rel == pytest.approx(report.added_error["model.layers.1.mlp.up_proj"], rel=1e-6)


def test_missing_tokenizer_and_unknown_family_are_refused(family_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(family_dirs["llama"], quantization_config=HfQuantConfig(
        bits=4, group_size=32, symmetric=True, **PIN))
    model.save_pretrained(tmp_path / "q")  # no tokenizer saved
    with pytest.raises(ExportRefusedModules, match="tokenizer.save_pretrained"):
        export(tmp_path / "q", to="gguf", out=tmp_path / "model.gguf")
    from transformers import OlmoConfig, OlmoForCausalLM

    OlmoForCausalLM(OlmoConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=2)).save_pretrained(tmp_path / "o")
    byte_level_tokenizer(tmp_path / "o")
    quantize_and_save(tmp_path / "o", tmp_path / "oq", bits=4, group_size=32, symmetric=True)
    with pytest.raises(ExportRefusedModules, match="GGUF export knows the families .* 'olmo'"):
        export(tmp_path / "oq", to="gguf", out=tmp_path / "olmo.gguf")


@pytest.mark.real_model
def test_smollm2_gguf_export_has_the_source_vocabulary_and_our_logits(tmp_path):
    from hf_quant.assets import smollm2_gguf_path, smollm2_path

    src = smollm2_path()
    model = quantize_and_save(src, tmp_path / "q", bits=4, group_size=32, symmetric=True)
    export(tmp_path / "q", to="gguf", out=tmp_path / "model.gguf")
    ours, _ = read_gguf(tmp_path / "model.gguf")
    original, _ = read_gguf(smollm2_gguf_path())
    # The checkpoint's tokenizer.json is transformers' conversion of that GGUF, which keeps GPT-2's byte-level split
    # but drops SmolLM's split of digits (pre "smollm"): the export describes the tokenizer it was given.
    assert ours.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert original.fields["tokenizer.ggml.pre"].contents() == "smollm"
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "llama.rope.freq_base",
                "llama.attention.head_count_kv", "llama.context_length"):
        assert ours.fields[key].contents() == original.fields[key].contents(), key
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30, 2380]])
    torch.testing.assert_close(_logits(loaded, ids), _logits(model.dequantize(), ids), rtol=1e-4, atol=1e-4)
    assert json.loads(json.dumps(ours.fields["general.quantized_by"].contents())).startswith("hf_quant")


def test_cli_exports_gguf_or_refuses_with_status_2(family_dirs, tmp_path, capsys):
    from hf_quant.cli import main

    quantize_and_save(family_dirs["qwen2"], tmp_path / "sym", bits=4, group_size=32, symmetric=True)
    assert main(["export", str(tmp_path / "sym"), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.file_type"].contents() == \
        int(gguf.LlamaFileType.MOSTLY_Q4_0)
    quantize_and_save(family_dirs["qwen2"], tmp_path / "g128", bits=4, group_size=64, symmetric=True)
    assert main(["export", str(tmp_path / "g128"), "--to", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "group_size=32" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_gemma3_with_other_layer_pattern_is_refused(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              layer_types=["sliding_attention", "full_attention"])
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "f")
    byte_level_tokenizer(tmp_path / "f")
    quantize_and_save(tmp_path / "f", tmp_path / "q", bits=4, group_size=32, symmetric=True)
    with pytest.raises(ExportRefusedModules, match="every 6th layer global"):
        export(tmp_path / "q", to="gguf", out=tmp_path / "m.gguf")


@pytest.mark.parametrize("space_prefix", [True, False])
def test_sentencepiece_style_tokenizer_is_written_as_llama_vocab(tmp_path, space_prefix):
    """Gemma / Llama 2 style tokenizers (BPE with byte fallback): the "llama" vocabulary with every token, its type,
    and add_space_prefix read from the tokenizer itself (llama.cpp then tokenizes exactly as the tokenizer does:
    checked by hand with llama-cpp-python, BENCHMARKS.md; transformers' own GGUF tokenizer reader ignores the flag)."""
    torch.manual_seed(0)
    tiny_family("gemma3").save_pretrained(tmp_path / "f")
    ours = sentencepiece_style_tokenizer(tmp_path / "f", space_prefix=space_prefix)
    quantize_and_save(tmp_path / "f", tmp_path / "q", bits=4, group_size=32, symmetric=True)
    export(tmp_path / "q", to="gguf", out=tmp_path / "m.gguf")
    reader, _ = read_gguf(tmp_path / "m.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is space_prefix
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    vocab = ours.get_vocab()
    assert len(tokens) == VOCAB and all(tokens[i] == t for t, i in vocab.items())
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[vocab["<0x41>"]] == int(gguf.TokenType.BYTE) and types[vocab["▁the"]] == int(gguf.TokenType.NORMAL)
    assert all(t == int(gguf.TokenType.UNUSED) for t in types[len(vocab):])
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == ours.eos_token_id
