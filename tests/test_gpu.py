"""Quantized models on a CUDA GPU, end to end (skipped where torch sees no GPU; CI has none, so these run on a lent
GPU machine: `python -m pytest tests/test_gpu.py tests/triton_interpreter_cases.py`, the second file then running
the Triton kernel cases compiled for the GPU instead of in the interpreter).

Each case compares the GPU model (Triton or the format's GPU kernel, float16/bfloat16) with the same packed tensors
run by the plain-PyTorch reference on the CPU in float32: equal codes, outputs within the 16-bit bound.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_quant import HfQuantConfig, QuantLinear
from hf_quant.formats import QuantScheme, dequantize
from hf_quant.nn import PackedWeight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 128
# Relative error of 16-bit GPU outputs against the float32 CPU reference of the same codes (a wrong code, scale or
# group gives 0.1 and more).
BOUND = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double().cpu(), ref.double().cpu()
    return ((y - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ).eval()
    folder = tmp_path_factory.mktemp("float")
    model.save_pretrained(folder)
    ids = torch.randint(3, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    return SimpleNamespace(folder=folder, ids=ids)


CONFIGS = {
    "int4-g64": dict(bits=4, group_size=64),
    "int3-g32-dq": dict(bits=3, group_size=32, double_quant=True),
    "nf4-g64": dict(format="nf4", group_size=64),
    "fp8-channel": dict(format="fp8", group_size=-1),
    "int8-sym-channel": dict(bits=8, group_size=-1, symmetric=True),
    "int4-outliers-lowrank": dict(bits=4, group_size=64, outliers_per_row=4, lowrank_rank=8),
    "vq2-g64": dict(format="vq", bits=8, planes=2, group_size=64),
    "ternary2-g64": dict(format="ternary", planes=2, group_size=64),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_on_gpu_matches_cpu_reference(tiny, name, dtype, tmp_path, monkeypatch):
    config = HfQuantConfig(method="rtn", **CONFIGS[name])
    gpu = AutoModelForCausalLM.from_pretrained(tiny.folder, quantization_config=config, device_map="cuda",
                                               dtype=dtype).eval()
    layers = [m for m in gpu.modules() if isinstance(m, QuantLinear)]
    # 2 blocks x 7 linears and the 8-bit head (lm_head="int8", the default)
    assert len(layers) == 15 and all(m.qweight.device.type == "cuda" for m in layers)
    with torch.no_grad():
        y = gpu(tiny.ids.cuda()).logits
    gpu.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_QUANT_KERNEL", "reference")
    cpu = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for (n, a), (_, b) in zip(gpu.state_dict().items(), cpu.state_dict().items()):
        if not a.is_floating_point():  # codes quantized on the GPU reload bit for bit
            assert torch.equal(a.cpu(), b), n
    with torch.no_grad():
        ref = cpu(tiny.ids).logits
    assert rel_err(y, ref) < BOUND[dtype]


@pytest.mark.parametrize("name", ["int4-g64", "vq2-g64", "ternary2-g64", "int4-outliers-lowrank"])
def test_reload_on_gpu_and_generate(tiny, name, tmp_path):
    config = HfQuantConfig(method="rtn", **CONFIGS[name])
    AutoModelForCausalLM.from_pretrained(tiny.folder, quantization_config=config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda", dtype=torch.float16).eval()
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, PackedWeight) and layer.qweight.device.type == "cuda"
    ids = tiny.ids[:1].cuda()
    out = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    assert out.shape == (1, ids.shape[1] + 8)
    # greedy decoding token by token agrees with one forward over the generated sequence
    with torch.no_grad():
        assert torch.equal(model(out).logits[0, ids.shape[1] - 1:-1].argmax(-1), out[0, ids.shape[1]:])


def test_layers_offloaded_to_cpu_beside_gpu_layers(tiny, tmp_path):
    config = HfQuantConfig(bits=4, group_size=64, method="rtn")
    AutoModelForCausalLM.from_pretrained(tiny.folder, quantization_config=config).save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.norm": 0, "lm_head": 0}
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map, dtype=torch.float16).eval()
    whole = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda", dtype=torch.float16).eval()
    ids = tiny.ids.cuda()
    with torch.no_grad():
        assert rel_err(model(ids).logits, whole(ids).logits) < BOUND[torch.float16]


@pytest.mark.parametrize("scheme", [
    QuantScheme(bits=4, group_size=128, method="rtn"),
    QuantScheme(format="vq", bits=8, planes=2, group_size=128, method="rtn"),
    QuantScheme(format="ternary", bits=2, planes=1, group_size=128, method="rtn"),
], ids=lambda s: f"{s.format}-{s.planes}")
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_layer_at_awkward_shapes(scheme, tokens):
    """One layer with in 1000 (a short last group) and out 300, on the GPU, against the float64 product of the
    dequantized weight; the kernel the registry picks is named in the failure."""
    gen = torch.Generator().manual_seed(tokens)
    layer = torch.nn.Linear(1000, 300, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(300, 1000, generator=gen) * 0.05)
    q = QuantLinear.from_float(layer, scheme).cuda().half()
    w = dequantize(scheme, {k: v.cpu() for k, v in q.packed_tensors().items()}, 1000).double()
    x = torch.randn(tokens, 1000, generator=gen)
    with torch.no_grad():
        y = q(x.cuda().half())
    kernel = q.kernel_name("cuda", torch.float16)
    assert kernel == {"vq": "triton_vq", "ternary": "triton_ternary"}.get(scheme.format, "triton")
    assert rel_err(y, x.double() @ w.T) < BOUND[torch.float16], kernel


def test_streamed_calibration_runs_each_block_on_the_gpu(tmp_path, monkeypatch):
    """GPTQ with device_map="cuda" streams: each block is read on the host and calibrated on the GPU, which holds the
    packed model and one float block (peak allocated well under the float model); the codes equal those of the
    whole float model loaded on the GPU and calibrated there."""
    from hf_quant.pipeline.streaming import ENV_DISABLE
    from tiny_families import VOCAB as BYTE_VOCAB
    from tiny_families import byte_level_tokenizer

    torch.manual_seed(0)
    layers = 12
    model = LlamaForCausalLM(LlamaConfig(vocab_size=BYTE_VOCAB, hidden_size=512, intermediate_size=1536,
                                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2))
    float_bytes = sum(p.numel() * 4 for p in model.model.layers.parameters())
    model.save_pretrained(tmp_path, max_shard_size="20MB")
    byte_level_tokenizer(tmp_path)
    del model
    texts = ["The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 8]
    settings = dict(bits=4, group_size=64, method="gptq", calibration=texts, n_samples=4, seq_len=64)

    def load(stream: bool):
        monkeypatch.setenv(ENV_DISABLE, "1" if stream else "0")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        m = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda", dtype=torch.float32,
                                                 quantization_config=HfQuantConfig(**settings))
        assert m.hf_quantizer.calibration_report.streamed == stream
        return m, torch.cuda.max_memory_allocated()

    streamed, streamed_peak = load(True)
    full, full_peak = load(False)
    assert {p.device.type for p in streamed.state_dict().values()} == {"cuda"}
    sa, sb = streamed.state_dict(), full.state_dict()
    assert sorted(sa) == sorted(sb)
    codes = [k for k in sa if k.endswith("qweight")]
    assert codes and all(torch.equal(sa[k], sb[k]) for k in codes), [k for k in codes if not torch.equal(sa[k], sb[k])]
    # Both peaks share a fixed part (cuBLAS/cuSOLVER workspaces, ~0.1 GB on an H200); streaming saves the float
    # blocks but one (12 blocks: 11/12 of float_bytes) less their packed form (~1/7). Measured on an H200: 125 MB
    # streamed, 266 MB whole, float blocks 151 MB.
    assert full_peak - streamed_peak > 0.7 * float_bytes, (streamed_peak, full_peak, float_bytes)

    # device_map="auto" with a GPU budget for part of the packed model: every block is still calibrated on the GPU
    # (same codes), then the blocks past the budget go to the CPU behind accelerate's offload hooks.
    del full
    torch.cuda.empty_cache()
    packed_block = sum(t.numel() * t.element_size() for t in streamed.model.layers[0].state_dict().values())
    budget = int(streamed.model.embed_tokens.weight.numel() * 4 + 5 * packed_block)
    spread = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto", dtype=torch.float32,
                                                  max_memory={0: budget, "cpu": 2**34},
                                                  quantization_config=HfQuantConfig(**settings))
    assert spread.hf_quantizer.calibration_report.streamed
    placed = {spread.hf_device_map.get(f"model.layers.{i}", spread.hf_device_map.get("model.layers"))
              for i in range(layers)}
    assert placed == {0, "cpu"}, spread.hf_device_map
    sc = spread.state_dict()
    on_gpu = [k for k in codes if sc[k].device.type == "cuda"]
    assert on_gpu and all(torch.equal(sc[k].cpu(), sa[k].cpu()) for k in on_gpu)
    ids = torch.randint(0, BYTE_VOCAB, (2, 32), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(spread(ids).logits, streamed(ids).logits, rtol=1e-4, atol=1e-4)
