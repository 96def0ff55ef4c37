"""Quantized embeddings (HfQuantConfig.quantize_embeddings): a lookup decodes only the gathered rows, equal to the
whole table's dequantization; quantize -> save -> reload gives identical logits on tiny Llama / Qwen2 / Gemma 3; a tied
lm_head shares the embedding's packed table (stored once, logits equal to an untied dequantized reference); the
default keeps embeddings float; LoRA on them is refused by name; bad settings name the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from hf_quant import HfQuantConfig
from hf_quant.formats import QuantScheme, packed_length, unpack_bits
from hf_quant.model.checkpoint import CheckpointError, check_packed_values
from hf_quant.nn import QuantEmbedding, QuantLinear, QuantTiedHead, gather_rows
from tiny_families import VOCAB, byte_level_tokenizer, tiny_family

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMES = [
    dict(bits=4, group_size=64),
    dict(bits=8, group_size=128, symmetric=True),
    dict(bits=4, group_size=32, double_quant=True),
    dict(bits=3, group_size=32, symmetric=True, double_quant=True),
    dict(bits=8, group_size=-1),
    dict(format="nf4", group_size=64, double_quant=True),
    dict(format="fp4", group_size=32),
    dict(format="fp8", bits=8, group_size=128),
]


# --- the gathered decode against a plain-PyTorch reference --------------------------------------------------------


def reference_table(scheme: QuantScheme, tensors: dict, dim: int) -> torch.Tensor:
    """The whole table decoded in plain PyTorch, independently of hf_quant's decoders (scalar layout of
    formats/scalar.py: codes, per-group scales/zero-points, double quant in blocks of 64 values)."""
    def read(name):
        t = tensors[name]
        if not scheme.double_quant:
            return t.float()
        flat = t.reshape(-1).float()
        meta = tensors[f"{name}_dq"].float()
        block = torch.arange(flat.numel()) // 64
        return (flat * meta[block, 0] + meta[block, 1]).reshape(t.shape)

    codes = unpack_bits(tensors["qweight"], scheme.bits, dim).long()
    scale = read("scales")
    g = dim if scheme.group_size == -1 else scheme.group_size
    col_group = torch.arange(dim) // g
    s = scale[:, col_group]
    if scheme.codec.codebook:
        return scheme.codec.table()[codes] * s
    zero = read("zeros")[:, col_group] if scheme.has_zero else torch.full_like(s, 2 ** (scheme.bits - 1))
    return (codes.float() - zero) * s


@pytest.mark.parametrize("settings", SCHEMES, ids=lambda s: QuantScheme(**s).describe())
@pytest.mark.parametrize("vocab,dim", [(301, 100), (97, 72), (5, 40)])
def test_gathered_rows_equal_the_dequantized_table(settings, vocab, dim):
    torch.manual_seed(vocab + dim)
    scheme = QuantScheme(**settings)
    float_emb = nn.Embedding(vocab, dim)
    q = QuantEmbedding.from_float(float_emb, scheme)
    ids = torch.randint(0, vocab, (3, 11))
    ids[0, 0], ids[0, 1] = 0, vocab - 1
    table = q.dequantize_weight(torch.float32)
    torch.testing.assert_close(table, reference_table(scheme, q.packed_tensors(), dim), rtol=1e-6, atol=1e-6)
    out = q(ids)
    assert out.shape == (3, 11, dim) and torch.equal(out, table[ids])
    assert torch.equal(gather_rows(scheme, q.packed_tensors(), ids.reshape(-1), dim), table[ids.reshape(-1)])
    # the quantization is close to the float table (a wrong row or group would not be)
    err = (out - float_emb.weight.detach()[ids]).norm() / float_emb.weight.detach()[ids].norm()
    assert err < (0.35 if scheme.bits <= 4 else 0.05)


def test_lookup_reads_only_the_gathered_rows():
    """The lookup indexes the packed tensors with the ids: rows it does not gather may hold anything."""
    q = QuantEmbedding.from_float(nn.Embedding(64, 48), QuantScheme(bits=4, group_size=32))
    ids = torch.tensor([3, 7, 3])
    expected = q(ids)
    with torch.no_grad():
        rest = torch.ones(64, dtype=torch.bool)
        rest[ids] = False
        q.scales[rest] = float("nan")
        q.zeros[rest] = float("nan")
    assert torch.equal(q(ids), expected)
    with pytest.raises(IndexError, match="out of range"):
        q(torch.tensor([64]))


def test_scaled_word_embedding_keeps_its_scale():
    model = tiny_family("gemma3")
    emb = model.model.embed_tokens
    q = QuantEmbedding.from_float(emb, QuantScheme(bits=8, group_size=-1))
    ids = torch.randint(0, VOCAB, (2, 5))
    ref = nn.functional.embedding(ids, q.dequantize_weight()) * emb.embed_scale
    assert torch.equal(q(ids), ref)
    back = q.to_float(torch.float32)
    assert type(back) is type(emb) and torch.equal(back(ids), ref)


# --- whole models ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    out = {}
    for kind in ("llama", "qwen2", "gemma3"):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(kind)
        tiny_family(kind).save_pretrained(path)
        byte_level_tokenizer(path)  # (calibration tokenises its text)
        out[kind] = path
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_quantize_save_reload_identical_logits(families, kind, tmp_path):
    config = HfQuantConfig(quantize_embeddings=True, overrides={"embed_tokens": {"bits": 8, "group_size": 64}})
    model = AutoModelForCausalLM.from_pretrained(families[kind], quantization_config=config)
    emb = model.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and emb.scheme.bits == 8 and emb.scheme.group_size == 64
    tied = model.config.tie_word_embeddings
    assert isinstance(model.get_output_embeddings(), QuantTiedHead if tied else QuantLinear)  # untied: 8-bit head
    ids = torch.randint(0, VOCAB, (2, 9))
    logits = _logits(model, ids)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        modules = json.loads(f.metadata()["hf_quant_modules"])
    assert "model.embed_tokens.weight" not in keys and "model.embed_tokens.qweight" in keys
    assert modules["model.embed_tokens"]["kind"] == "QuantEmbedding"
    assert "lm_head.weight" not in keys and ("lm_head.qweight" in keys) is not tied  # tied: nothing of its own
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.get_input_embeddings(), QuantEmbedding)
    if tied:
        head = reloaded.get_output_embeddings()
        assert isinstance(head, QuantTiedHead) and head.embedding is reloaded.get_input_embeddings()
    assert torch.equal(_logits(reloaded, ids), logits)
    assert reloaded.generate(ids[:1], max_new_tokens=3, do_sample=False).shape == (1, 12)


def test_tied_head_shares_one_stored_table(families, tmp_path, monkeypatch):
    # the reference kernel computes x @ W^T exactly from the decoded table (the CPU int4 kernel rounds its scales
    # to bfloat16, for the tied head as for every QuantLinear; checked against the exact product below)
    monkeypatch.setenv("HF_QUANT_KERNEL", "reference")
    config = HfQuantConfig(quantize_embeddings=True, overrides={"embed_tokens": {"bits": 4, "group_size": 32,
                                                                                 "double_quant": True}})
    model = AutoModelForCausalLM.from_pretrained(families["qwen2"], quantization_config=config)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(head, QuantTiedHead) and head.embedding is emb
    assert not list(head.parameters()) and not list(head.buffers())
    assert [k for k in model.state_dict() if k.startswith("lm_head")] == []
    assert model.config.tie_word_embeddings  # tied, not untied into two copies
    # logits equal an untied reference: the float model with the dequantized table as both embedding and head
    ids = torch.randint(0, VOCAB, (2, 7))
    ref = AutoModelForCausalLM.from_pretrained(families["qwen2"], quantization_config=HfQuantConfig())
    table = emb.dequantize_weight(torch.float32)
    ref.model.embed_tokens = nn.Embedding.from_pretrained(table.clone(), freeze=True)
    ref.lm_head = nn.Linear(64, VOCAB, bias=False)
    ref.lm_head.weight = nn.Parameter(table.clone(), requires_grad=False)
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)
    # the head's product is x @ W^T with W the very table the lookup decodes, on the selected kernel too
    x = torch.randn(3, 64)
    torch.testing.assert_close(head(x), x @ table.t(), rtol=1e-5, atol=1e-5)
    monkeypatch.delenv("HF_QUANT_KERNEL")
    emb._kernel_cache.clear()
    assert ((head(x) - x @ table.t()).norm() / (x @ table.t()).norm()).item() < 0.01
    # stored once: the checkpoint is smaller than with an untied quantized head
    model.save_pretrained(tmp_path / "shared")
    untied = AutoModelForCausalLM.from_pretrained(
        families["qwen2"], quantization_config=HfQuantConfig(modules_to_not_convert=[]))
    assert isinstance(untied.lm_head, QuantLinear) and not untied.config.tie_word_embeddings
    untied.save_pretrained(tmp_path / "untied")
    size = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("shared", "untied")}
    table_bytes = VOCAB * 64 * 4  # the float embedding the untied form keeps
    assert size["untied"] - size["shared"] > table_bytes * 0.9
    # dequantize() ties the float head to the float embedding again
    model.dequantize()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_default_keeps_embeddings_float(families, tmp_path):
    for kind in ("llama", "qwen2"):
        model = AutoModelForCausalLM.from_pretrained(families[kind], quantization_config=HfQuantConfig())
        assert type(model.get_input_embeddings()) is nn.Embedding
        assert type(model.get_output_embeddings()) is QuantLinear  # the default 8-bit head (lm_head="int8")
        assert not any(isinstance(m, (QuantEmbedding, QuantTiedHead)) for m in model.modules())
        assert model.config.quantization_config.quantize_embeddings is False
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quantize_embeddings"] is False
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "model.embed_tokens.weight" in set(f.keys())


def test_overrides_choose_the_scheme_or_keep_float(families):
    keep = HfQuantConfig(quantize_embeddings=True, overrides={"embed_tokens": None})
    model = AutoModelForCausalLM.from_pretrained(families["qwen2"], quantization_config=keep)
    assert type(model.model.embed_tokens) is nn.Embedding
    nf4 = HfQuantConfig(quantize_embeddings=True, overrides={"embed_tokens": {"format": "nf4", "group_size": 64}})
    model = AutoModelForCausalLM.from_pretrained(families["llama"], quantization_config=nf4)
    assert model.model.embed_tokens.scheme.format == "nf4"
    assert model.model.layers[0].self_attn.q_proj.scheme.format == "int"


def test_calibrated_method_quantizes_embeddings_after_loading(families, tmp_path):
    config = HfQuantConfig(quantize_embeddings=True, method="gptq", calibration=["some text to calibrate on " * 20],
                           n_samples=1, seq_len=16)
    model = AutoModelForCausalLM.from_pretrained(families["qwen2"], quantization_config=config)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantTiedHead)
    ids = torch.randint(0, VOCAB, (1, 6))
    logits = _logits(model, ids)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), logits)


# --- untrusted checkpoints ------------------------------------------------------------------------------------------


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=meta)


def test_damaged_embedding_tensors_are_refused(families, tmp_path):
    config = HfQuantConfig(quantize_embeddings=True)
    AutoModelForCausalLM.from_pretrained(families["qwen2"], quantization_config=config).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    original = file.read_bytes()

    def bad_scale(t):
        t["model.embed_tokens.scales"][3, 0] = float("nan")

    def wrong_shape(t):
        t["model.embed_tokens.qweight"] = t["model.embed_tokens.qweight"][:-1].clone()

    def float_head(t):
        t["lm_head.weight"] = torch.zeros(VOCAB, 64)

    for edit, match in [(bad_scale, "'model.embed_tokens'.*not the bytes saved"), (wrong_shape, "embed_tokens.qweight"),
                        (float_head, "lm_head.weight")]:
        file.write_bytes(original)
        _rewrite(file, edit)
        with pytest.raises(CheckpointError, match=match):
            AutoModelForCausalLM.from_pretrained(tmp_path)
    # the value checks of every packed module run on embeddings too (here without a recorded digest)
    file.write_bytes(original)
    q = AutoModelForCausalLM.from_pretrained(tmp_path).model.embed_tokens
    with torch.no_grad():
        q.scales[3, 0] = float("nan")
    with pytest.raises(CheckpointError, match="embed_tokens.scales"):
        check_packed_values(q, "model.embed_tokens")
    # config.json claiming float embeddings for packed ones
    file.write_bytes(original)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["quantize_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="embed_tokens"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


# --- PEFT -----------------------------------------------------------------------------------------------------------


def test_lora_on_a_quantized_embedding_is_refused_by_name(families):
    from peft import LoraConfig, get_peft_model

    config = HfQuantConfig(quantize_embeddings=True)
    for targets, match in [(["embed_tokens"], "quantized embedding"), (["lm_head"], "tied to the quantized embedding")]:
        model = AutoModelForCausalLM.from_pretrained(families["qwen2"], quantization_config=config)
        with pytest.raises(ValueError, match=f"(?s){match}.*target_modules.*quantize_embeddings=False"):
            get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    # LoRA on the linears of the same model trains
    model = AutoModelForCausalLM.from_pretrained(families["qwen2"], quantization_config=config)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, VOCAB, (1, 6))
    peft_model(ids, labels=ids).loss.backward()
    assert any(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)


# --- bad settings ---------------------------------------------------------------------------------------------------


def test_bad_settings_name_the_field(families):
    with pytest.raises(ValueError, match="quantize_embeddings must be a bool"):
        HfQuantConfig(quantize_embeddings="yes")
    with pytest.raises(ValueError, match="quantize_embeddings=True.*set quantize_embeddings=False"):
        HfQuantConfig(target="vllm", quantize_embeddings=True)
    # an override that only reaches embeddings while they stay float would do nothing
    with pytest.raises(ValueError, match=r"overrides\['embed_tokens'\].*quantize_embeddings=True"):
        AutoModelForCausalLM.from_pretrained(families["llama"], quantization_config=HfQuantConfig(
            overrides={"embed_tokens": {"bits": 8}}))
    # formats without per-row scalar codes, and additive terms, are refused naming the module and the fix
    for settings, match in [({"format": "vq"}, "format='vq'"), ({"format": "ternary"}, "format='ternary'"),
                            ({"lowrank_rank": 4}, "lowrank_rank=4")]:
        config = HfQuantConfig(quantize_embeddings=True, overrides={"embed_tokens": settings})
        with pytest.raises(ValueError, match=rf"(?s)'model.embed_tokens'.*{match}.*overrides="):
            AutoModelForCausalLM.from_pretrained(families["llama"], quantization_config=config)
