"""Device maps, offloading, compute dtypes and memory behaviour of quantize-on-load, on a tiny Llama.

Every device map is exercised both ways: quantizing a float checkpoint while loading, and reloading a saved
quantized checkpoint. Outputs are compared with the plain (device_map=None) quantized model; on CPU the
offloaded forward runs the same kernels on the same packed tensors, so they match exactly.
"""

from __future__ import annotations

import gc
import os
import weakref
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_quant import HfQuantConfig, QuantLinear
from hf_quant.nn import PackedWeight
from hf_quant.quantizer import HfQuantQuantize

VOCAB = 128
N_LAYERS = 2
N_QUANTIZED = 7 * N_LAYERS
OFFLOAD_MAP = {  # layer 0 and the rest in RAM, layer 1 on disk
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}
DEVICE_MAPS = {"none": None, "cpu": "cpu", "auto": "auto", "cpu+disk": OFFLOAD_MAP}


pytestmark = pytest.mark.usefixtures("one_thread")


def config() -> HfQuantConfig:
    return HfQuantConfig(bits=4, group_size=32, lm_head="float")  # the head stays float: counts below are the blocks'



@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None and t.device.type != "meta")


def assert_no_float_copy(model) -> None:
    """Quantized layers hold only packed tensors (and their bias): no float weight, no nn.Linear left behind,
    and no float copy of the weight in a kernel's cached layout."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == N_QUANTIZED
    assert [n for n, m in model.named_modules() if type(m) is nn.Linear] == ["lm_head"]
    for name, module in quantized.items():
        assert [n for n, _ in module.named_parameters(recurse=False)] in ([], ["bias"]), name
        assert "weight" not in module.__dict__, name
        assert module._buffers["qweight"].dtype == torch.uint8
        assert all(not t.is_floating_point() or t.dtype == torch.float16 for t in module._buffers.values())
        for *_, state in module._kernel_cache.values():
            floats = [t for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
            assert all(t.numel() < module.in_features * module.out_features for t in floats), name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ).eval()
    float_dir = tmp_path_factory.mktemp("float")
    model.save_pretrained(float_dir)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    quantized = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config())
    quant_dir = tmp_path_factory.mktemp("quantized")
    quantized.save_pretrained(quant_dir)
    return SimpleNamespace(
        float_model=model, float_dir=float_dir, quant_dir=quant_dir, ids=ids, quantized=quantized,
        ref=logits(quantized, ids), state=quantized.state_dict(),
    )


def load(tiny, source: str, **kwargs):
    if source == "float":
        return AutoModelForCausalLM.from_pretrained(tiny.float_dir, quantization_config=config(), **kwargs)
    return AutoModelForCausalLM.from_pretrained(tiny.quant_dir, **kwargs)


@pytest.mark.parametrize("device_map", list(DEVICE_MAPS))
@pytest.mark.parametrize("source", ["float", "quantized"])
def test_device_map(tiny, source, device_map, tmp_path):
    model = load(tiny, source, device_map=DEVICE_MAPS[device_map], offload_folder=tmp_path / "offload")
    assert_no_float_copy(model)
    if device_map == "cpu+disk":
        assert model.hf_device_map == OFFLOAD_MAP
        # float params of the disk layer live on disk (meta in the model) ...
        assert model.model.layers[1].input_layernorm.weight.device.type == "meta"
        # ... and so are its packed tensors, with no offload_buffers=True (hf_quant.model.offload)
        assert model.model.layers[1].mlp.down_proj.qweight.device.type == "meta"
    else:
        assert all(t.device.type == "cpu" for t in model.state_dict().values())
        assert all(torch.equal(t, tiny.state[k]) for k, t in model.state_dict().items())
    assert torch.equal(logits(model, tiny.ids), tiny.ref)
    assert torch.equal(logits(model, tiny.ids), tiny.ref)  # a second pass (kernel caches warm) agrees too


@pytest.mark.parametrize("source", ["float", "quantized"])
def test_auto_device_map_is_sized_by_packed_sizes(tiny, source, tmp_path):
    """A CPU budget that holds the packed model but not the float one keeps every layer in RAM, whether quantizing
    while loading (sized by the packed tensors, not the float weights they replace) or reloading."""
    packed = sum(t.numel() * t.element_size() for t in tiny.state.values())
    floats = sum(p.numel() * p.element_size() for p in tiny.float_model.parameters())
    budget = int(packed * 1.3)
    assert budget < 0.6 * floats  # the float model would not fit: before sizing by packed sizes, layers went to disk
    model = load(tiny, source, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "offload")
    # (transformers sets no hf_device_map when everything lands on one device)
    assert set(getattr(model, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}, model.hf_device_map
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert torch.equal(logits(model, tiny.ids), tiny.ref)


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
@pytest.mark.parametrize("offload_buffers", [False, True], ids=["default", "offload_buffers"])
@pytest.mark.parametrize("source", ["float", "quantized"])
def test_disk_offload_of_packed_tensors(tiny, source, offload_buffers, tmp_path):
    """The packed tensors of the disk layer stay on disk between forwards, with or without offload_buffers=True:
    none of them, nor a kernel's repacked copy, is kept in RAM. Saving the offloaded model writes the same
    checkpoint."""
    offload = tmp_path / "offload"
    model = load(tiny, source, device_map=OFFLOAD_MAP, offload_folder=offload, offload_buffers=offload_buffers)
    disk_layers = [m for n, m in model.named_modules() if isinstance(m, PackedWeight) and ".layers.1." in f".{n}"]
    ram_layers = [m for n, m in model.named_modules() if isinstance(m, PackedWeight) and ".layers.0." in f".{n}"]
    assert len(disk_layers) == len(ram_layers) == 7
    if source == "float":  # tensors made while loading are written to the offload folder
        assert "model.layers.1.mlp.down_proj.qweight.safetensors" in os.listdir(offload)
    for _ in range(2):
        assert torch.equal(logits(model, tiny.ids), tiny.ref)
        for m in disk_layers:
            assert all(t.device.type == "meta" for t in m._buffers.values())
            assert not m._kernel_cache
        assert all(m._kernel_cache for m in ram_layers)
    model.save_pretrained(tmp_path / "resaved")
    with safe_open(str(tmp_path / "resaved" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(tiny.state)
        for key, tensor in tiny.state.items():
            assert torch.equal(f.get_tensor(key), tensor), key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    assert torch.equal(logits(reloaded, tiny.ids), tiny.ref)


# Bounds on the relative error against the float32-computed quantized model (measured value in the comment).
# Quantize-on-load: transformers casts each float weight to the requested dtype before handing it to the quantizer,
# so the packed tensors are those of the cast weights, an equally good but different rounding (its error against
# the float model stays that of float32: 0.089 bf16, 0.084 fp16, 0.085 fp32).
QOL_ERR = {torch.float32: 0.0, torch.bfloat16: 0.05, torch.float16: 0.03}  # bf16 0.025, fp16 0.016
# Reloading a float32-made checkpoint: the same packed tensors, so only the compute dtype's own error remains.
RELOAD_ERR = {torch.float32: 0.0, torch.bfloat16: 0.011, torch.float16: 0.0015}  # bf16 0.0055, fp16 0.00066


@pytest.mark.parametrize("dtype", list(QOL_ERR), ids=str)
def test_compute_dtype(tiny, dtype, tmp_path, monkeypatch):
    if dtype == torch.float32:
        ref = tiny.ref  # the same kernels on the same packed tensors: exactly equal
    else:
        # The fused CPU kernels compute float32 inputs in bfloat16 (declared precision), so tiny.ref carries
        # bfloat16 rounding; the 16-bit dtypes are measured against float32 math (the reference kernel).
        monkeypatch.setenv("HF_QUANT_KERNEL", "reference")
        ref = logits(load(tiny, "quantized"), tiny.ids)
        monkeypatch.delenv("HF_QUANT_KERNEL")
    model = load(tiny, "float", dtype=dtype)
    assert_no_float_copy(model)
    assert model.dtype == dtype and model.model.embed_tokens.weight.dtype == dtype
    out = logits(model, tiny.ids)
    assert out.dtype == dtype
    err = rel_err(ref, out)
    float_ref = logits(tiny.float_model, tiny.ids)
    print(f"{dtype}: quantize-on-load {err:.4f} against float32, {rel_err(float_ref, out):.4f} against the float model")
    assert err <= QOL_ERR[dtype]
    assert rel_err(float_ref, out) < 1.15 * rel_err(float_ref, ref)
    # A saved checkpoint reloads in the same dtype to the same tensors and outputs.
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert_no_float_copy(reloaded)
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in reloaded.state_dict().items())
    assert torch.equal(logits(reloaded, tiny.ids), out)
    # The float32-made checkpoint loaded in this dtype keeps its packed tensors exactly (no float cast touches them).
    again = load(tiny, "quantized", dtype=dtype)
    assert_no_float_copy(again)
    for name, module in again.named_modules():
        if isinstance(module, PackedWeight):
            for key, t in module.packed_tensors().items():
                assert torch.equal(t, tiny.state[f"{name}.{key}"])
    err = rel_err(ref, logits(again, tiny.ids))
    print(f"{dtype}: reloaded float32-made checkpoint {err:.5f} against float32")
    assert err <= RELOAD_ERR[dtype]


def test_quantize_on_load_holds_one_float_weight_at_a_time(tiny, monkeypatch):
    """Each convert call gets exactly one float weight; it is freed before the next one arrives; and the model
    never holds more than its final (quantized) size plus the largest float weight."""
    original = HfQuantQuantize.convert
    calls = []

    def spy(self, input_dict, full_layer_name=None, model=None, **kwargs):
        values = [v for vs in input_dict.values() for v in (vs if isinstance(vs, list) else [vs])]
        assert len(values) == 1 and values[0].is_floating_point(), full_layer_name
        weight = values[0]
        earlier_alive = [c["name"] for c in calls if c["ref"]() is not None]
        result = original(self, input_dict, full_layer_name=full_layer_name, model=model, **kwargs)
        placeholders = [m._parameters["weight"] for m in model.modules()
                        if isinstance(m, QuantLinear) and "weight" in m._parameters]
        calls.append({
            "name": full_layer_name,
            "bytes": weight.numel() * weight.element_size(),
            "ref": weakref.ref(weight),
            "earlier_alive": earlier_alive,
            "model_bytes": tensor_bytes([*model.parameters(), *model.buffers()]),
            "float_placeholder_bytes": tensor_bytes(placeholders),
        })
        return result

    monkeypatch.setattr(HfQuantQuantize, "convert", spy)
    model = load(tiny, "float")
    assert len(calls) == N_QUANTIZED
    assert sorted(c["name"] for c in calls) == sorted(f"{n}.weight" for n, m in model.named_modules()
                                                     if isinstance(m, QuantLinear))
    final = tensor_bytes([*model.parameters(), *model.buffers()])
    largest = max(c["bytes"] for c in calls)
    float_total = tensor_bytes([*tiny.float_model.parameters(), *tiny.float_model.buffers()])
    assert final + largest < float_total * 0.5  # so the bound below would catch a full float materialization
    for c in calls:
        assert c["earlier_alive"] == [], c["name"]
        assert c["float_placeholder_bytes"] == 0, c["name"]
        assert c["model_bytes"] <= final + largest, c["name"]
    del calls[:-1]
    gc.collect()
    assert calls[0]["ref"]() is None
    assert_no_float_copy(model)
    assert torch.equal(logits(model, tiny.ids), tiny.ref)
