"""A linear tied to another parameter (lm_head tied to the input embedding) is quantized when asked to, untied,
saved with its own packed tensors and reloaded packed; with lm_head="float" it stays float and tied (the default,
lm_head="int8", is tested in test_lm_head.py)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors import safe_open

from hf_quant import HfQuantConfig, QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 320


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )
    model = tf.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tied")
    model.save_pretrained(path)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
    return path, ids, logits


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def default_quantized_logits(tied_checkpoint):
    path, ids, _ = tied_checkpoint
    qc = HfQuantConfig(bits=4, group_size=32, lm_head="float")
    model = tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=qc)
    assert type(model.lm_head) is torch.nn.Linear  # lm_head="float": the tied lm_head stays float and tied
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings
    with torch.no_grad():
        return model(ids).logits


# Bounds on the change the quantized lm_head alone makes to the logits (measured 0.0063 and 0.081: ~1.6x margin);
# an lm_head that lost its tie to the trained embedding (random or zero weight) changes them by ~1.
@pytest.mark.parametrize("settings, bound", [({"bits": 8, "group_size": -1}, 0.01), ({"bits": 4, "group_size": 32}, 0.13)])
def test_tied_lm_head_quantized_untied_saved_and_reloaded(tied_checkpoint, default_quantized_logits, tmp_path,
                                                          settings, bound):
    path, ids, _ = tied_checkpoint
    qc = HfQuantConfig(bits=4, group_size=32, modules_to_not_convert=[], overrides={"lm_head": settings})
    model = tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=qc)
    assert isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.scheme.bits == settings["bits"]
    assert type(model.model.embed_tokens) is torch.nn.Embedding  # the embedding it was tied to stays float
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        logits = model(ids).logits
    assert rel_err(logits, default_quantized_logits) < bound

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"lm_head.qweight", "lm_head.scales", "model.embed_tokens.weight"} <= keys
    assert "lm_head.weight" not in keys

    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.lm_head, QuantLinear)
    assert torch.equal(reloaded.lm_head.qweight, model.lm_head.qweight)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def test_cli_lm_head_int8(tied_checkpoint, tmp_path):
    from hf_quant.cli import main

    path, _, _ = tied_checkpoint
    out = tmp_path / "q"
    assert main(["quantize", str(path), "--out", str(out), "--bits", "4", "--group-size", "32", "--method", "rtn",
                 "--lm-head", "int8", "--eval-tokens", "0"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False
    # the head left transformers' default list (the tied embedding stays in it: float) and got its recorded override
    assert saved["quantization_config"]["modules_to_not_convert"] == ["model.embed_tokens"]
    assert saved["quantization_config"]["overrides"][-1][0] == "^lm_head$"
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.scheme.bits == 8
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear) and model.model.layers[0].mlp.down_proj.scheme.bits == 4
