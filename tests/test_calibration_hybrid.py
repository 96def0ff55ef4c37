"""Calibration on hybrid-attention models (layer_types mixing sliding-window and full attention: Gemma 2/3): each
block is calibrated with the attention mask and rotary embeddings the model gives that block, not the first
block's; GPTQ runs on them, with and without the Hadamard rotation, and beats data-free rounding on the calibration
text. (AWQ refuses Gemma's 1 + w norms with its own message: its scales cannot fold into them.)"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from hf_quant import HfQuantConfig
from hf_quant.model import decoder_blocks
from hf_quant.pipeline.loop import _capture_block_inputs, _mixed_layer_types
from tiny_families import VOCAB, byte_level_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 8,
         "Quantization maps each weight to a small set of values; calibration shows which errors matter. " * 8]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, max_position_embeddings=256, sliding_window=8)


def gemma3():
    return Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, num_hidden_layers=3,
                                              layer_types=["sliding_attention", "full_attention",
                                                           "sliding_attention"]))


def gemma2():
    return Gemma2ForCausalLM(Gemma2Config(**COMMON, num_hidden_layers=2))


@pytest.fixture(scope="module", params=["gemma3", "gemma2"])
def hybrid_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    model = {"gemma3": gemma3, "gemma2": gemma2}[request.param]()
    assert _mixed_layer_types(model)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    byte_level_tokenizer(folder)
    return folder


def test_each_block_gets_its_own_mask_and_rotary_embeddings():
    torch.manual_seed(0)
    model = gemma3().eval()
    _, blocks = decoder_blocks(model)
    ids = torch.randint(0, 256, (2, 20))
    first, per_block = _capture_block_inputs(model, blocks, ids, 2, every_block=True)
    assert len(first) == 1 and [len(b) for b in per_block] == [1, 1, 1]
    masks = [kw["attention_mask"] for _, kw in (b[0] for b in per_block)]
    rope = [kw["position_embeddings"][0] for _, kw in (b[0] for b in per_block)]
    # sliding vs full attention: the full layer's causal mask may be implicit (None, SDPA's is_causal)
    assert masks[0] is masks[2] and masks[0] is not None and masks[1] is not masks[0]
    assert masks[1] is None or not torch.equal(masks[0], masks[1])
    assert torch.equal(rope[0], rope[2]) and not torch.equal(rope[0], rope[1])  # Gemma 3: local vs global RoPE
    _, none = _capture_block_inputs(model, blocks, ids, 2, every_block=False)
    assert none is None


def _error(model, reference, ids) -> float:
    with torch.no_grad():
        out = model(ids).logits
    return float((out - reference).norm() / reference.norm())


@pytest.mark.parametrize("method", ["gptq", "gptq+hadamard"])
def test_calibration_runs_and_beats_round_to_nearest(hybrid_dir, method):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(hybrid_dir)
    ids = torch.tensor([tok(TEXTS[0])["input_ids"][:48]])
    float_model = AutoModelForCausalLM.from_pretrained(hybrid_dir, dtype=torch.float32)
    with torch.no_grad():
        reference = float_model(ids).logits
    common = dict(bits=3, group_size=32, calibration=TEXTS, n_samples=4, seq_len=48)
    extra = {"rotation": "hadamard"} if method.endswith("hadamard") else {}
    calibrated = AutoModelForCausalLM.from_pretrained(hybrid_dir, quantization_config=HfQuantConfig(
        method="gptq", **extra, **common))
    rtn = AutoModelForCausalLM.from_pretrained(hybrid_dir, quantization_config=HfQuantConfig(method="rtn", **common))
    report = calibrated.hf_quantizer.calibration_report
    assert report.quantized_modules == 7 * calibrated.config.num_hidden_layers
    assert _error(calibrated, reference, ids) < _error(rtn, reference, ids)


def test_awq_refuses_gemma_norms_clearly(hybrid_dir):
    with pytest.raises(ValueError, match="AWQ cannot fold scales into Gemma.RMSNorm.*Use method='gptq'"):
        AutoModelForCausalLM.from_pretrained(hybrid_dir, quantization_config=HfQuantConfig(
            method="awq", bits=4, group_size=32, calibration=TEXTS, n_samples=4, seq_len=48))
