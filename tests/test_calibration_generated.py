"""calibration="generated": the model writes its own calibration sequences (LLM-QAT's data-free generation).

Checked against a plain reference (every step re-runs the whole prefix, no KV cache) with the same generator, so the
cached sampling loop must condition each token on exactly the tokens before it; plus the refusals, the config field
and an end-to-end GPTQ run whose held-out error must beat data-free rounding."""

from __future__ import annotations

import json

import pytest
import torch
from extreme_helpers import assert_reload_identical
from transformers import AutoModelForCausalLM, BertConfig, BertModel

from hf_quant import HfQuantConfig, QuantLinear
from hf_quant.pipeline import calibration_text, calibration_token_ids, generated_token_ids
from hf_quant.pipeline.data import _GENERATION_BATCH

from test_calibration import CALIBRATION_TEXTS, IDS, smollm2_tokenizer, tiny_llama  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def reference_generation(model, tokenizer, n: int, length: int, seed: int) -> torch.Tensor:
    """The same sampling, written plainly: each step runs the model on the whole prefix (no cache)."""
    vocab = len(tokenizer)
    starts = [i for i in range(vocab) if i not in set(tokenizer.all_special_ids)]
    g = torch.Generator().manual_seed(seed)
    out = []
    for first in range(0, n, _GENERATION_BATCH):
        rows = min(_GENERATION_BATCH, n - first)
        ids = torch.tensor(starts)[torch.randint(len(starts), (rows, 1), generator=g)]
        for _ in range(length - 1):
            probs = torch.softmax(model(input_ids=ids).logits[:, -1, :vocab].float(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
        out.append(ids)
    return torch.cat(out)


@pytest.fixture(scope="module")
def float_llama(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.mark.parametrize("n", [3, _GENERATION_BATCH + 2])  # one batch; two batches, the second short
def test_generated_ids_match_the_uncached_reference(float_llama, smollm2_tokenizer, n):
    length = 13
    rng = torch.random.get_rng_state()
    ids = generated_token_ids(float_llama, smollm2_tokenizer, n, length, seed=5)
    assert torch.equal(torch.random.get_rng_state(), rng), "the global RNG must not move"
    assert ids.shape == (n, length) and ids.dtype == torch.long
    assert torch.equal(ids, reference_generation(float_llama, smollm2_tokenizer, n, length, seed=5))
    assert int(ids.max()) < len(smollm2_tokenizer)
    assert not set(ids[:, 0].tolist()) & set(smollm2_tokenizer.all_special_ids)
    assert torch.equal(ids, generated_token_ids(float_llama, smollm2_tokenizer, n, length, seed=5))
    assert not torch.equal(ids, generated_token_ids(float_llama, smollm2_tokenizer, n, length, seed=6))


def test_generation_restores_training_mode(float_llama, smollm2_tokenizer):
    float_llama.train()
    try:
        generated_token_ids(float_llama, smollm2_tokenizer, 1, 3)
        assert float_llama.training
    finally:
        float_llama.eval()


def test_generated_refusals(float_llama, smollm2_tokenizer):
    config = HfQuantConfig(method="gptq", calibration="generated", n_samples=2, seq_len=8)
    with pytest.raises(ValueError, match="pass the float model"):
        calibration_token_ids(smollm2_tokenizer, config)
    with pytest.raises(ValueError, match="has no text"):
        calibration_text(config)
    encoder = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64))
    with pytest.raises(ValueError, match="needs a causal LM; BertModel is not one"):
        generated_token_ids(encoder, smollm2_tokenizer, 1, 4)
    from transformers import T5Config, T5ForConditionalGeneration

    seq2seq = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                  num_heads=2))
    with pytest.raises(ValueError, match="needs a causal LM; T5ForConditionalGeneration is not one"):
        generated_token_ids(seq2seq, smollm2_tokenizer, 1, 4)

    class Short:  # a tokenizer with more tokens than the model scores
        all_special_ids = []

        def __len__(self):
            return float_llama.config.vocab_size + 1

    with pytest.raises(ValueError, match="tokenizer has .* tokens but the model scores only"):
        generated_token_ids(float_llama, Short(), 1, 4)
    with torch.device("meta"):
        on_meta = AutoModelForCausalLM.from_config(float_llama.config)
    with pytest.raises(ValueError, match="meta device"):
        generated_token_ids(on_meta, smollm2_tokenizer, 1, 4)
    with pytest.raises(ValueError, match="calibration_seed must be an int"):
        HfQuantConfig(method="gptq", calibration="generated", calibration_seed=-1)


def test_generated_calibration_disables_streaming(tiny_llama):
    from hf_quant.pipeline.streaming import streaming_disabled_reason

    files = sorted(str(p) for p in tiny_llama.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    generated = HfQuantConfig(method="gptq", calibration="generated")
    assert "to write its own calibration sequences" in streaming_disabled_reason(model, generated, files, "cpu")
    assert streaming_disabled_reason(model, HfQuantConfig(method="gptq"), files, "cpu") is None


def _logits_error(model, reference, ids) -> float:
    with torch.no_grad():
        return float((model(ids).logits - reference).pow(2).mean())


def test_tiny_llama_gptq_on_generated_text(tiny_llama, float_llama, smollm2_tokenizer, tmp_path):
    settings = dict(method="gptq", bits=3, group_size=32, n_samples=8, seq_len=48, lm_head="float")
    config = HfQuantConfig(calibration="generated", calibration_seed=3, **settings)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    # Held out: other sequences the model writes (seed 11), which the calibration never saw. GPTQ calibrated on the
    # model's own text must beat GPTQ calibrated on text from elsewhere (a broken sampler, e.g. one that ignores the
    # model, calibrates on tokens unlike the model's and loses this).
    held_out = generated_token_ids(float_llama, smollm2_tokenizer, 4, 48, seed=11)
    with torch.no_grad():
        reference = float_llama(held_out).logits
    error = _logits_error(model, reference, held_out)
    on_text = AutoModelForCausalLM.from_pretrained(
        tiny_llama, quantization_config=HfQuantConfig(calibration=CALIBRATION_TEXTS, **settings))
    baseline = _logits_error(on_text, reference, held_out)
    # Measured 0.61x.
    assert error < 0.8 * baseline, (error, baseline)
    saved = json.loads(json.dumps(model.config.quantization_config.to_dict()))
    assert saved["calibration"] == "generated" and saved["calibration_seed"] == 3
    assert_reload_identical(model, tmp_path / "q", IDS)


def test_model_card_says_the_calibration_was_generated():
    from hf_quant.integrations.hub import _calibration_description

    config = HfQuantConfig(method="gptq", calibration="generated", calibration_seed=7, n_samples=4, seq_len=64)
    text = _calibration_description({**config.to_dict(), "quant_method": "hf_quant"})
    assert "wrote itself" in text and "seed 7" in text and "4 sequences of 64 tokens" in text


def test_awq_on_generated_text(tiny_llama, float_llama, smollm2_tokenizer):
    """AWQ takes the generated tokens too. (On this random 2-layer model AWQ's scales barely matter, so the bound only
    says the run is sound: within 1.25x of data-free rounding, measured 1.06x.)"""
    settings = dict(bits=3, group_size=32, lm_head="float")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=HfQuantConfig(
        method="awq", calibration="generated", n_samples=4, seq_len=32, **settings))
    report = model.hf_quantizer.calibration_report
    assert (report.n_samples, report.seq_len) == (4, 32)
    held_out = generated_token_ids(float_llama, smollm2_tokenizer, 2, 32, seed=11)
    with torch.no_grad():
        reference = float_llama(held_out).logits
    data_free = AutoModelForCausalLM.from_pretrained(
        tiny_llama, quantization_config=HfQuantConfig(method="mse", **settings))
    error, baseline = _logits_error(model, reference, held_out), _logits_error(data_free, reference, held_out)
    assert error < 1.25 * baseline, (error, baseline)


def test_cli_sensitivity_on_generated_text(tiny_llama, tmp_path):
    from hf_quant.cli import main

    rc = main(["quantize", str(tiny_llama), "--out", str(tmp_path / "q"), "--target-bits", "3.0",
               "--sensitivity", "fisher", "--calibration", "generated", "--calibration-seed", "2", "--n-samples", "2",
               "--seq-len", "16", "--group-size", "32", "--eval-tokens", "0", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["bits_per_weight"] <= 3.0 and report["config"]["overrides"]
    assert report["config"]["calibration"] == "generated" and report["config"]["calibration_seed"] == 2
