"""HfQuantConfig(lm_head=...): the output head is 8-bit per channel by default ("int8"), kept float with "float", or
given the config's scheme with "same"; resolved once when a float model is quantized and recorded in the saved
config (overrides / modules_to_not_convert), so a reload, and a checkpoint saved before the field, never read it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from torch import nn

from hf_quant import HfQuantConfig, QuantLinear, QuantScheme
from hf_quant.formats.scheme import HEAD_INT8
from hf_quant.nn import QuantEmbedding, QuantTiedHead

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 320
INT8_CHANNEL = QuantScheme(bits=8, group_size=-1, symmetric=True, method="mse")
IDS = torch.tensor([[1, 5, 90, 17, 33, 65, 100, 3, 42, 7]])


def _llama(path, tied: bool):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    tf.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return _llama(tmp_path_factory.mktemp("untied"), tied=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _llama(tmp_path_factory.mktemp("tied"), tied=True)


def load(path, **kwargs):
    return tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=HfQuantConfig(**kwargs))


def saved_config(model, folder) -> dict:
    model.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def test_default_head_is_int8_per_channel_untied(untied, tmp_path):
    model = load(untied, bits=4, group_size=32)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.scheme == INT8_CHANNEL
    assert model.model.layers[0].mlp.down_proj.scheme.bits == 4
    with torch.no_grad():
        logits = model(IDS).logits
    qc = saved_config(model, tmp_path / "q")
    assert qc["lm_head"] == "int8"
    assert "lm_head" not in qc["modules_to_not_convert"]
    assert qc["overrides"] == [["^lm_head$", HEAD_INT8]]
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.lm_head, QuantLinear) and reloaded.lm_head.scheme == INT8_CHANNEL
    assert torch.equal(reloaded.lm_head.qweight, model.lm_head.qweight)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, logits)


def test_default_head_is_int8_per_channel_tied(tied, tmp_path):
    # a tied head is quantized from the embedding after loading and untied; the embedding stays float
    model = load(tied, bits=4, group_size=32)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.scheme == INT8_CHANNEL
    assert type(model.model.embed_tokens) is nn.Embedding and not model.config.tie_word_embeddings
    qc = saved_config(model, tmp_path / "q")
    assert qc["overrides"] == [["^lm_head$", HEAD_INT8]] and "lm_head" not in qc["modules_to_not_convert"]
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.lm_head, QuantLinear) and torch.equal(reloaded.lm_head.qweight, model.lm_head.qweight)


def test_tied_head_shares_a_quantized_embedding(tied):
    # quantize_embeddings=True: the head shares the embedding's packed table, as before the field (no override)
    model = load(tied, bits=4, group_size=32, quantize_embeddings=True)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantTiedHead)
    assert model.config.quantization_config.overrides == {}


@pytest.mark.parametrize("path_fixture", ["untied", "tied"])
def test_float_keeps_the_head_float(path_fixture, request):
    model = load(request.getfixturevalue(path_fixture), bits=4, group_size=32, lm_head="float")
    assert type(model.lm_head) is nn.Linear
    qc = model.config.quantization_config
    assert "lm_head" in qc.modules_to_not_convert and qc.overrides == {}
    if path_fixture == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_same_gives_the_head_the_config_scheme(untied):
    model = load(untied, bits=4, group_size=32, lm_head="same")
    assert isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.scheme == model.model.layers[0].mlp.down_proj.scheme
    assert model.config.quantization_config.overrides == {}


def test_user_overrides_and_modules_to_not_convert_win(untied):
    model = load(untied, bits=4, group_size=32, overrides={"lm_head": {"bits": 6}})
    assert model.lm_head.scheme.bits == 6 and model.lm_head.scheme.group_size == 32
    assert list(model.config.quantization_config.overrides) == ["lm_head"]
    model = load(untied, bits=4, group_size=32, overrides={"lm_head": None})
    assert type(model.lm_head) is nn.Linear
    # explicit modules_to_not_convert: nothing is resolved (as before the field)
    model = load(untied, bits=4, group_size=32, modules_to_not_convert=["lm_head"])
    assert type(model.lm_head) is nn.Linear and model.config.quantization_config.overrides == {}
    model = load(untied, bits=4, group_size=32, modules_to_not_convert=[])
    assert model.lm_head.scheme.bits == 4 and model.config.quantization_config.overrides == {}


@pytest.mark.parametrize("target, group_size", [("gguf", 32), ("vllm", -1)])
def test_target_gives_a_head_the_target_exports(untied, target, group_size):
    from hf_quant.formats.targets import SERVING_TARGETS

    model = load(untied, bits=4, target=target, group_size=32)
    head = model.lm_head.scheme
    assert (head.format, head.bits, head.symmetric, head.group_size) == ("int", 8, True, group_size)  # Q8_0 / int8
    SERVING_TARGETS[target].check_scheme("lm_head", head)


def test_vllm_keeps_a_head_gptq_readers_cannot_hold_float(tmp_path):
    # vocabulary 300: not a multiple of 32, which GPTQ readers need; gguf's Q8_0 blocks run along in_features only
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "f")
    model = load(tmp_path / "f", target="vllm", group_size=32)
    assert type(model.lm_head) is nn.Linear and "lm_head" in model.config.quantization_config.modules_to_not_convert
    assert model.config.quantization_config.overrides == {}
    assert load(tmp_path / "f", target="gguf").lm_head.scheme.group_size == 32


def test_kquant_gguf_recipe_gets_a_q8_0_head(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "f")
    model = load(tmp_path / "f", format="kquant", bits=4, target="gguf")
    assert model.model.layers[0].mlp.down_proj.scheme.format == "kquant"
    head = model.lm_head.scheme
    assert (head.format, head.bits, head.symmetric, head.group_size) == ("int", 8, True, 32)


def test_head_name_comes_from_get_output_embeddings(tmp_path):
    # BERT's output embedding is `cls.predictions.decoder` (tied to the word embeddings)
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128)
    tf.BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    model = tf.AutoModelForMaskedLM.from_pretrained(tmp_path / "bert",
                                                    quantization_config=HfQuantConfig(bits=4, group_size=32))
    head = model.get_output_embeddings()
    assert isinstance(head, QuantLinear) and head.scheme == INT8_CHANNEL
    assert list(model.config.quantization_config.overrides) == [r"^cls\.predictions\.decoder$"]


def test_old_saved_config_reloads_unchanged(untied, tmp_path):
    # a checkpoint saved before the field: config.json has a resolved modules_to_not_convert and no "lm_head" key
    model = load(untied, bits=4, group_size=32, lm_head="float")
    model.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    config = json.loads(path.read_text())
    del config["quantization_config"]["lm_head"]
    path.write_text(json.dumps(config))
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "old")
    assert type(reloaded.lm_head) is nn.Linear  # float, as saved
    assert reloaded.config.quantization_config.lm_head == "float"
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
    # and the dict alone: read as written, the head's placement in its recorded lists
    old = dict(config["quantization_config"])
    assert old["modules_to_not_convert"] == ["lm_head"] and "lm_head" not in old
    parsed = HfQuantConfig.from_dict(old)
    assert parsed.lm_head == "float" and parsed.modules_to_not_convert == ["lm_head"] and parsed.overrides == {}


def test_target_bits_keeps_an_int8_head_float(untied):
    # the budget covers the linears the allocator chooses or the user fixes: "int8" leaves the head out of it
    model = load(untied, target_bits=4.5)
    assert type(model.lm_head) is nn.Linear
    assert "lm_head" in model.config.quantization_config.modules_to_not_convert
    # "same": the allocator chooses the head's scheme too
    model = load(untied, target_bits=4.5, lm_head="same")
    assert isinstance(model.lm_head, QuantLinear)
    assert any("lm_head" in p for p in model.config.quantization_config.overrides)


def test_calibrated_config_rounds_the_head_data_free(tmp_path):
    from hf_quant.assets import smollm2_path

    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "f")
    tokenizer.save_pretrained(tmp_path / "f")
    texts = ["Calibration text for a tiny model, long enough for a few windows of tokens. " * 20]
    calib = dict(method="gptq", bits=4, group_size=32, calibration=texts, n_samples=2, seq_len=16)
    model = load(tmp_path / "f", **calib)
    assert model.lm_head.scheme == INT8_CHANNEL  # data-free (mse) after the blocks' GPTQ
    assert model.model.layers[0].mlp.down_proj.scheme.method == "gptq"
    model = load(tmp_path / "f", **calib, lm_head="same")
    assert model.lm_head.scheme == QuantScheme(bits=4, group_size=32, method="mse")
    assert model.config.quantization_config.overrides == {"^lm_head$": {"method": "mse"}}
