"""Shared by the extreme/mixed-precision tests: a tiny Llama checkpoint and the save/reload/generate round trip."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_quant.eval.storage import checkpoint_storage, model_storage


def tiny_llama_folder(path, layers: int = 2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def assert_reload_identical(model, folder, ids):
    """Save, reload: identical logits on `ids`; returns the reloaded model."""
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=0, atol=0)
    return reloaded


def check_round_trip(model, folder):
    """Save, reload (identical logits and storage), generate; returns the reloaded model."""
    model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 128, (1, 9))
    assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert reloaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 12)
    assert checkpoint_storage(folder).bits_per_weight == pytest.approx(model_storage(model).bits_per_weight)
    return reloaded
