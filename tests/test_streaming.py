"""Calibration in bounded memory (hf_quant/pipeline/streaming.py): from_pretrained with a calibration method on a
safetensors checkpoint reads one decoder block's float weights at a time.

Every streamed result is compared with the whole-float-model path (HF_QUANT_STREAM_CALIBRATION=0): the packed tensors
must be bit-identical. The memory bound is measured: when each block is read, no float linear weight of an earlier
block is alive any more."""

from __future__ import annotations

import gc
import json
import logging
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                          MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from hf_quant import HfQuantConfig, QuantLinear
from hf_quant.pipeline.streaming import ENV_DISABLE, BlockStreamer
from tiny_families import VOCAB, byte_level_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 8,
         "Quantization maps each weight to a small set of values; calibration shows which errors matter. " * 8]
CAL = dict(bits=4, group_size=32, calibration=TEXTS, n_samples=4, seq_len=32)
N_LAYERS = 3
MOE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128)


def save(model, folder, shard="60KB"):
    model.save_pretrained(folder, max_shard_size=shard)  # sharded: blocks straddle files
    byte_level_tokenizer(folder)
    assert (folder / "model.safetensors.index.json").exists()
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
                                         num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128))
    return save(model, tmp_path_factory.mktemp("llama"))


def load(path, monkeypatch, stream: bool, **settings):
    monkeypatch.setenv(ENV_DISABLE, "1" if stream else "0")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=HfQuantConfig(**settings))
    monkeypatch.delenv(ENV_DISABLE)
    assert model.hf_quantizer.calibration_report.streamed == stream
    return model


def assert_identical(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key, t in sa.items():
        assert t.dtype == sb[key].dtype and torch.equal(t, sb[key]), key


@pytest.mark.parametrize("settings", [
    dict(method="gptq"),
    dict(method="gptq", rotation="hadamard"),
    dict(method="awq"),
    dict(method="gptq", token_weighting="attention", overrides={r"layers\.2\.": None}),
], ids=["gptq", "gptq-hadamard", "awq", "rsq-float-block"])
def test_streaming_is_bit_identical_to_the_full_model(llama_dir, settings, monkeypatch, tmp_path):
    streamed = load(llama_dir, monkeypatch, True, **CAL, **settings)
    full = load(llama_dir, monkeypatch, False, **CAL, **settings)
    assert_identical(streamed, full)
    assert not any(p.device.type == "meta" for p in streamed.parameters())
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, full(ids).logits)
    # a streamed model saves and reloads like any other
    streamed.save_pretrained(tmp_path)
    assert_identical(AutoModelForCausalLM.from_pretrained(tmp_path), streamed)


def test_streaming_holds_one_block_of_float_weights(llama_dir, monkeypatch):
    """When each block is read, every float linear weight read for earlier blocks is garbage, and the blocks hold
    no float linear weight but that block's."""
    original = BlockStreamer.load
    seen = []

    def linear_weights(model):
        return [m.weight for n, m in model.named_modules() if type(m) is nn.Linear and ".layers." in n
                and m.weight.device.type != "meta"]

    def spy(self, index):
        gc.collect()
        alive_before = [r for refs in seen for r in refs if r() is not None]
        held_before = sum(w.numel() * w.element_size() for w in linear_weights(self.model))
        original(self, index)
        weights = linear_weights(self.model)
        seen.append([weakref.ref(w) for w in weights])
        stats.append((index, len(alive_before), held_before, sum(w.numel() * w.element_size() for w in weights)))

    stats = []
    monkeypatch.setattr(BlockStreamer, "load", spy)
    model = load(llama_dir, monkeypatch, True, **CAL, method="gptq")
    block = (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 160) * 4  # q, o; k, v (2 kv heads of 16); gate, up, down (fp32)
    assert [s[0] for s in stats] == list(range(N_LAYERS))
    for index, alive, held_before, held_after in stats:
        assert alive == 0, f"float weights of an earlier block alive when block {index} is read"
        assert held_before == 0
        assert held_after <= block
    report = model.hf_quantizer.calibration_report
    assert report.largest_block_bytes < 1.1 * block and report.largest_tensor_bytes == 64 * 160 * 4
    assert "streamed block by block" in report.summary()
    # + the default 8-bit head, rounded data-free outside the streamed blocks
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * N_LAYERS + 1


def test_float_blocks_and_hybrid_attention_stream(tmp_path, monkeypatch):
    """Gemma 3 (sliding and full attention layers): the capture pass runs the float blocks before the last one,
    each read and dropped in turn; a block kept in float keeps its float weights."""
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                               max_position_embeddings=256, sliding_window=8, num_hidden_layers=3,
                                               layer_types=["sliding_attention", "full_attention",
                                                            "sliding_attention"]))
    folder = save(model, tmp_path / "gemma3")
    settings = dict(**CAL, method="gptq", overrides={r"layers\.1\.mlp": None})
    streamed = load(folder, monkeypatch, True, **settings)
    assert_identical(streamed, load(folder, monkeypatch, False, **settings))
    assert type(streamed.model.layers[1].mlp.down_proj) is nn.Linear
    assert torch.equal(streamed.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_streams_and_all_experts_option(arch, tmp_path, monkeypatch):
    """Fused experts (Mixtral's checkpoint is in the legacy per-expert layout, merged while loading): streamed codes
    are identical; moe_calibrate_all_experts gives every expert every token's statistics, and the report says how
    many tokens the router sent each expert."""
    torch.manual_seed(0)
    if arch == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**MOE, num_local_experts=4, num_experts_per_tok=1))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**MOE, moe_intermediate_size=64, num_experts=4,
                                                   num_experts_per_tok=1, head_dim=16))
    folder = save(model, tmp_path / arch, shard="100KB")
    routed = load(folder, monkeypatch, True, **CAL, method="gptq")
    assert_identical(routed, load(folder, monkeypatch, False, **CAL, method="gptq"))
    tokens = CAL["n_samples"] * CAL["seq_len"]
    report = routed.hf_quantizer.calibration_report
    assert len(report.expert_tokens) == 2
    for routed_counts, stats_counts in report.expert_tokens.values():
        assert sum(routed_counts) == tokens  # top-1
        assert stats_counts == routed_counts

    all_experts = load(folder, monkeypatch, True, **CAL, method="gptq", moe_calibrate_all_experts=True)
    assert_identical(all_experts, load(folder, monkeypatch, False, **CAL, method="gptq",
                                       moe_calibrate_all_experts=True))
    report = all_experts.hf_quantizer.calibration_report
    for name, (routed_counts, stats_counts) in report.expert_tokens.items():
        assert stats_counts == [tokens] * 4
        assert routed_counts == routed.hf_quantizer.calibration_report.expert_tokens[name][0]
    assert "statistics from 128-128 tokens per expert" in report.summary()
    # first block: same inputs, so only the statistics differ (experts with fewer routed tokens change codes)
    experts = "model.layers.0.mlp.experts.gate_up_proj.qweight"
    assert not torch.equal(routed.state_dict()[experts], all_experts.state_dict()[experts])


def test_missing_block_tensor_is_named(llama_dir, tmp_path, monkeypatch):
    folder = tmp_path / "damaged"
    folder.mkdir()
    for f in llama_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.up_proj.weight"
    shard = folder / index["weight_map"][key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    del index["weight_map"][key]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"no tensor for \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=HfQuantConfig(**CAL, method="gptq"))


def test_residual_rotation_loads_the_whole_model_and_says_why(llama_dir, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_quant.quantizer"):
        model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=HfQuantConfig(
            **CAL, method="gptq", rotation="residual"))
    assert not model.hf_quantizer.calibration_report.streamed
    assert "rotation='residual'" in caplog.text and "whole float model" in caplog.text


def test_device_maps_stream(llama_dir, monkeypatch, tmp_path):
    """Named and dict device maps stream too: "auto" on this CPU machine gives the codes of the plain CPU stream, bit
    for bit; a tight max_memory puts packed blocks on disk (sized by their packed size), and the model so placed
    computes exactly what the in-memory one does, with the disk blocks' packed buffers off RAM."""
    from hf_quant.pipeline.streaming import block_placement, single_device

    assert single_device(None) == torch.device("cpu") == single_device({"": "cpu"}) == single_device("cpu")
    assert single_device("cuda") == torch.device("cuda") and single_device({"": 0}) == torch.device("cuda", 0)
    assert single_device(0) == torch.device("cuda", 0)
    for spread in ("auto", "balanced", {"model.embed_tokens": "cpu", "model.layers": "disk"}, {"a": 0, "b": "cpu"}):
        assert single_device(spread) is None, spread
    assert block_placement({"model.layers.0": 0, "model.layers": "disk", "": "cpu"}, "model.layers", 2) == [0, "disk"]
    with pytest.raises(ValueError, match=r"parts of model.layers.1 separately.*give 'model.layers.1' one device"):
        block_placement({"": "cpu", "model.layers.1.mlp": "disk"}, "model.layers", 2)

    config = HfQuantConfig(**CAL, method="gptq")
    plain = load(llama_dir, monkeypatch, True, **CAL, method="gptq")
    auto = AutoModelForCausalLM.from_pretrained(llama_dir, device_map="auto", quantization_config=config)
    assert auto.hf_quantizer.calibration_report.streamed
    assert_identical(plain, auto)

    # 150 KB: one packed block fits beside the embedding (a float32 block is 172 KB: none would)
    folder = tmp_path / "offload"
    tight = AutoModelForCausalLM.from_pretrained(llama_dir, device_map="auto", max_memory={"cpu": "150KB"},
                                                 offload_folder=str(folder), quantization_config=config)
    assert tight.hf_quantizer.calibration_report.streamed
    placed = tight.hf_device_map
    assert placed["model.layers.0"] == "cpu" and placed["model.layers.2"] == "disk", placed
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, tight(ids).logits)
    packed = {n: b.device.type for n, b in tight.named_buffers() if n.endswith("qweight")}
    assert packed["model.layers.0.mlp.down_proj.qweight"] == "cpu"
    assert packed["model.layers.2.mlp.down_proj.qweight"] == packed["lm_head.qweight"] == "meta"
    assert (folder / "model.layers.packed" / "index.json").exists()

    # a dict map names the blocks' devices itself
    explicit = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapped = AutoModelForCausalLM.from_pretrained(llama_dir, device_map=explicit, offload_folder=str(tmp_path / "o2"),
                                                  quantization_config=config)
    assert mapped.hf_quantizer.calibration_report.streamed
    packed = {n: b.device.type for n, b in mapped.named_buffers() if n.endswith("down_proj.qweight")}
    assert packed == {f"model.layers.{i}.mlp.down_proj.qweight": d for i, d in enumerate(["meta", "cpu", "meta"])}
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, mapped(ids).logits)


def test_bfloat16_moe_calibrates(tmp_path, monkeypatch):
    """A bfloat16 MoE checkpoint (as published) calibrates its experts with GPTQ: the layout check compares the
    experts' own bf16 output with a float32 rebuild, which differ by bf16 rounding (~5e-3), not by a layout error.
    GPTQ must then beat data-free rounding on text like its calibration text (the fix also gives quantize-on-load's
    experts the model's dtype: they dequantized to float32 under a bfloat16 model, and its forward failed)."""
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**MOE, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                               head_dim=16)).to(torch.bfloat16)
    folder = save(model, tmp_path / "moe", shard="100KB")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(TEXTS[1], return_tensors="pt").input_ids[:, :64]  # in distribution
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
    errors = {}
    for method in ("gptq", "mse"):
        quantized = load(folder, monkeypatch, method == "gptq", **{**CAL, "bits": 3}, method=method) \
            if method == "gptq" else AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=HfQuantConfig(**{**CAL, "bits": 3}, method=method))
        assert quantized.dtype == torch.bfloat16
        with torch.no_grad():
            errors[method] = float((quantized(ids).logits.float() - ref).norm() / ref.norm())
    assert errors["gptq"] < errors["mse"], errors
