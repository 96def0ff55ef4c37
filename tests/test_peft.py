"""LoRA (PEFT) on hf_quant-quantized modules: forward, gradients, merge/unmerge, save/load, training, init."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

import hf_quant
from hf_quant import HfQuantConfig, QuantLinear, QuantScheme
from hf_quant.integrations.peft import (
    QuantLoraExperts,
    QuantLoraLinear,
    init_lora_from_residual,
    lora_layer_errors,
    set_merge_target,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
LLAMA = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
# Formats with their kernels on CPU: int4 -> cpu_int4pack, int8 per-channel -> cpu_int8pack, the rest -> reference.
SCHEMES = {
    "int4-g32": QuantScheme(bits=4, group_size=32),
    "int3-sym-g64": QuantScheme(bits=3, group_size=64, symmetric=True),
    "int2-g32-dq": QuantScheme(bits=2, group_size=32, double_quant=True),
    "int8-channel": QuantScheme(bits=8, group_size=-1, symmetric=True),
    "nf4-g32": QuantScheme(format="nf4", bits=4, group_size=32),
    "fp8-g64": QuantScheme(format="fp8", bits=8, group_size=64),
    "int2-g32-lowrank4": QuantScheme(bits=2, group_size=32, lowrank_rank=4),  # stored low-rank correction term
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


class TwoLayer(nn.Module):
    """proj (LoRA target) -> gelu -> out (quantized, not a target): gradients must cross `out`'s packed weight."""

    def __init__(self, scheme: QuantScheme, d_in=72, d_hidden=40, d_out=24, bias=True):
        super().__init__()
        self.proj = QuantLinear.from_float(nn.Linear(d_in, d_hidden, bias=bias), scheme)
        self.out = QuantLinear.from_float(nn.Linear(d_hidden, d_out, bias=bias), scheme)

    def forward(self, x):
        return self.out(nn.functional.gelu(self.proj(x)))


def lora_two_layer(scheme, **lora):
    torch.manual_seed(0)
    # init_lora_weights=False: A and B both random, so the low-rank term is not zero
    return get_peft_model(TwoLayer(scheme), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                       init_lora_weights=False, **lora))


def float_twin(model) -> TwoLayer:
    """The same network with float layers holding the dequantized weights, and LoRA applied by hand."""
    layer = model.base_model.model.proj
    base = layer.get_base_layer()
    out = model.base_model.model.out
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]

    def forward(x):
        h = nn.functional.linear(x, base.dequantize_weight(), base.bias) + scaling * (x @ a.t() @ b.t())
        return nn.functional.linear(nn.functional.gelu(h), out.dequantize_weight(), out.bias)

    return forward


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_forward_is_base_plus_scaled_low_rank(name, tokens):
    model = lora_two_layer(SCHEMES[name])
    layer = model.base_model.model.proj
    assert isinstance(layer, QuantLoraLinear)
    x = torch.randn(2, tokens, 72)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.get_base_layer()(x) + layer.scaling["default"] * (x @ a.t() @ b.t())
    with torch.no_grad():
        got = layer(x)
    assert rel(got, expected) < 1e-6
    assert rel(expected, layer.get_base_layer()(x)) > 1e-2  # the adapter term is not negligible


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("kernel", ["reference", None])
def test_gradients_match_float_reference_on_dequantized_weights(name, kernel, monkeypatch):
    if kernel:
        monkeypatch.setenv("HF_QUANT_KERNEL", kernel)
    model = lora_two_layer(SCHEMES[name])
    layer = model.base_model.model.proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 7, 72, requires_grad=True)
    g = torch.randn(3, 7, 24)
    (model(x) * g).sum().backward()
    got = [x.grad.clone(), a.grad.clone(), b.grad.clone()]
    for t in (x, a, b):
        t.grad = None
    (float_twin(model)(x) * g).sum().backward()
    # Reference kernel: float32 throughout. The fused CPU kernels compute the forward in bfloat16 (declared
    # precision), which moves the activations the gradients are taken at by ~0.3%.
    bound = 1e-5 if kernel else 2e-2
    for got_t, ref_t in zip(got, [x.grad, a.grad, b.grad]):
        assert rel(got_t, ref_t) < bound
    for base in (layer.get_base_layer(), model.base_model.model.out):
        assert all(getattr(base, n).grad is None for n in base.packed_names)


def test_backward_keeps_no_float_copy_of_the_base_weight():
    model = lora_two_layer(SCHEMES["int4-g32"])
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    x = torch.randn(4, 72, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    assert (40, 72) not in saved_shapes and (24, 40) not in saved_shapes, saved_shapes
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _tiny_llama(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA))
    model.save_pretrained(tmp_path / "float")
    return tmp_path / "float"


def _quantized(path, **cfg):
    cfg = {"group_size": 32, **({} if "format" in cfg else {"bits": 4}), **cfg}
    return tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=HfQuantConfig(**cfg))


def _randomize_adapters(model, seed=1, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * std


def _packed_state(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{t}": getattr(m, t).clone() for n, m in hf_quant.packed_modules(model).items() for t in m.packed_names}


TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="module")
def float_llama(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("cfg", [{}, {"bits": 3, "group_size": 64, "double_quant": True}, {"format": "nf4"},
                                 {"format": "fp8", "group_size": 64}])
def test_merge_requantizes_and_unmerge_restores_exact_codes(float_llama, cfg):
    model = get_peft_model(_quantized(float_llama, **cfg), LoraConfig(r=4, target_modules=TARGETS))
    _randomize_adapters(model)
    ids = torch.randint(0, VOCAB, (2, 11))
    packed = _packed_state(model)
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(ids).logits
        lora_logits = model(ids).logits
        model.merge_adapter()
        merged = _packed_state(model)
        merged_logits = model(ids).logits
        model.unmerge_adapter()
        restored = _packed_state(model)
        restored_logits = model(ids).logits
    assert any(not torch.equal(packed[k], merged[k]) for k in packed)  # the merge changed codes
    assert all(torch.equal(packed[k], restored[k]) for k in packed)  # bit-identical after unmerge
    assert torch.equal(restored_logits, lora_logits)
    # the merged (re-quantized) model follows the adapter: clearly closer to the LoRA logits than the base is
    assert rel(merged_logits, lora_logits) < 0.6 * rel(base_logits, lora_logits)


def test_merge_and_unload_quantized_and_float(float_llama, monkeypatch):
    monkeypatch.setenv("HF_QUANT_KERNEL", "reference")  # float32 math, so the float merge is exact up to rounding
    ids = torch.randint(0, VOCAB, (2, 9))
    results = {}
    for target in ("quantized", "float"):
        model = get_peft_model(_quantized(float_llama), LoraConfig(r=4, target_modules=TARGETS))
        _randomize_adapters(model)
        set_merge_target(model, target)
        with torch.no_grad():
            with model.disable_adapter():
                base_logits = model(ids).logits
            lora_logits = model(ids).logits
            merged = model.merge_and_unload()
            # the merged model's distance to the LoRA model, relative to the base model's distance to it
            results[target] = rel(merged(ids).logits, lora_logits) / rel(base_logits, lora_logits)
        q_proj = merged.model.layers[0].self_attn.q_proj
        assert type(q_proj) is (QuantLinear if target == "quantized" else nn.Linear)
        assert type(merged.model.layers[0].self_attn.k_proj) is QuantLinear  # not targeted: untouched
        assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert results["float"] < 1e-5
    assert results["quantized"] < 0.6
    with pytest.raises(ValueError, match="target must be one of"):
        set_merge_target(model, "fp16")


def test_adapter_save_load_on_reloaded_quantized_checkpoint(float_llama, tmp_path):
    base = _quantized(float_llama)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=4, target_modules=TARGETS))
    _randomize_adapters(model)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                         tmp_path / "adapter")
    assert isinstance(reloaded.base_model.model.model.layers[1].mlp.down_proj, QuantLoraLinear)
    with torch.no_grad():
        got = reloaded(ids).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("checkpointing", [None, {"use_reentrant": True}, {"use_reentrant": False}])
def test_training_lowers_loss_and_never_changes_codes(float_llama, checkpointing):
    model = _quantized(float_llama)
    if checkpointing is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    packed = _packed_state(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=2e-2)
    ids = torch.randint(0, VOCAB, (4, 16))
    model.train()
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses  # ln(96) = 4.56 at the start
    assert all(torch.equal(v, _packed_state(model)[k]) for k, v in packed.items())


def test_trainer_runs_on_quantized_lora_model(float_llama, tmp_path):
    model = get_peft_model(_quantized(float_llama), LoraConfig(r=4, target_modules=TARGETS))
    torch.manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (8, 12))]
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                                gradient_checkpointing=True, use_cpu=True)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))


@pytest.mark.parametrize("bits", [2, 3])
def test_residual_init_lowers_layer_error(float_llama, bits):
    cfg = {"bits": bits, "group_size": 32}
    ids = torch.randint(0, VOCAB, (2, 12))
    reference = tf.AutoModelForCausalLM.from_pretrained(float_llama)
    with torch.no_grad():
        float_logits = reference(ids).logits
    errors = {}
    for iterations in (0, 3):
        model = get_peft_model(_quantized(float_llama, **cfg), LoraConfig(r=8, target_modules=TARGETS))
        with torch.no_grad():
            zero_init = rel(model(ids).logits, float_logits)  # B = 0: exactly the quantized base
        zero_errors = lora_layer_errors(model, float_llama)
        report = init_lora_from_residual(model, float_llama, iterations=iterations)
        assert len(report) == len(TARGETS) * LLAMA["num_hidden_layers"]
        after_errors = lora_layer_errors(model, float_llama)
        for name, (before, after) in report.items():
            assert abs(zero_errors[name] - before) < 1e-6 and abs(after_errors[name] - after) < 1e-5
        assert all(after < before for before, after in report.values()), report
        with torch.no_grad():
            errors[iterations] = rel(model(ids).logits, float_logits)
        assert errors[iterations] < zero_init
        errors[(iterations, "layers")] = sum(after for _, after in report.values())
    assert errors[(3, "layers")] <= errors[(0, "layers")]


def test_unsupported_lora_options_fail_clearly(float_llama):
    model = _quantized(float_llama)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*init_lora_from_residual"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    model = _quantized(float_llama)
    with pytest.raises(ValueError, match="plain LoRA only"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model = get_peft_model(_quantized(float_llama), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="has no tensor"):
        init_lora_from_residual(model, {})


def test_moe_expert_lora(tmp_path):
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(**{**LLAMA, "intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2})
    tf.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "float")
    model = get_peft_model(_quantized(tmp_path / "float"),
                           LoraConfig(r=4, target_modules=["q_proj", "gate_up_proj", "down_proj"]))
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, QuantLoraExperts)
    _randomize_adapters(model)
    # indexing an expert = its dequantized weight + its own scaled low-rank delta
    layer = experts.down_proj
    base = layer.get_base_layer()
    delta = layer.get_delta_weight("default")
    for e in range(len(layer)):
        assert rel(layer[e], base[e] + delta[e]) < 1e-6
    assert rel(delta[0], delta[1]) > 0.5  # experts have separate adapters
    ids = torch.randint(0, VOCAB, (2, 10))
    packed = _packed_state(model)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0
    with torch.no_grad():
        lora_logits = model(ids).logits
        model.merge_adapter()
        merged_logits = model(ids).logits
        model.unmerge_adapter()
        restored_logits = model(ids).logits
    assert all(torch.equal(v, _packed_state(model)[k]) for k, v in packed.items())
    assert torch.equal(restored_logits, lora_logits)
    assert rel(merged_logits, lora_logits) < 0.1
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_quantized(tmp_path / "float"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, lora_logits)
