"""Calibration-based quantization: GPTQ on single layers (every format), the Hessian/Cholesky path on degenerate
inputs, calibration data, config fields, and end-to-end quantize / save / reload on a tiny Llama and SmolLM2."""

from __future__ import annotations

import json
import os

import pytest
import torch
from extreme_helpers import assert_reload_identical
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_quant import HfQuantConfig, QuantLinear
from hf_quant.algorithms import quantize_params
from hf_quant.pipeline import BOTCHAN_EVAL_TOKENS, calibration_token_ids
from hf_quant.algorithms.gptq import gptq_quantize, hessian_inverse_factor
from hf_quant.formats import QuantScheme, dequantize_codes

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    """Samples (`seed`) of one distribution (per `features`) with correlated channels of very different scales, like
    LLM activations."""
    g = torch.Generator().manual_seed(features)
    mix = torch.randn(features, features, generator=g) * 0.3 + torch.eye(features)
    scale = torch.exp(torch.randn(features, generator=g))
    return (torch.randn(n, features, generator=g.manual_seed(1000 + seed)) @ mix) * scale


def output_error(weight, scheme, params, x) -> float:
    w_q = dequantize_codes(scheme, params.codes, params.scale, params.zero, weight.shape[1])
    return ((x @ (weight - w_q).t()) ** 2).mean().item()


SCHEMES = [
    dict(bits=2, group_size=32),
    dict(bits=3, group_size=64),
    dict(bits=3, group_size=64, symmetric=True),
    dict(bits=4, group_size=128),
    dict(bits=4, group_size=128, double_quant=True),
    dict(bits=4, group_size=-1),
    dict(bits=5, group_size=64),
    dict(bits=6, group_size=128),
    dict(bits=8, group_size=-1, symmetric=True),
    dict(format="nf4", bits=4, group_size=64),
    dict(format="fp4", bits=4, group_size=64),
    dict(format="fp8", bits=8, group_size=128),
]


@pytest.mark.parametrize("settings", SCHEMES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_single_layer_beats_rtn_and_mse_on_held_out_inputs(settings, act_order):
    torch.manual_seed(0)
    out_f, in_f = 48, 200  # 200: a short last group at every group size
    weight = torch.randn(out_f, in_f)
    x_cal, x_test = correlated_inputs(1024, in_f, 1), correlated_inputs(1024, in_f, 2)
    hessian = x_cal.t() @ x_cal / x_cal.shape[0]
    scheme = QuantScheme(method="gptq", **settings)
    params = gptq_quantize(weight, hessian, scheme, act_order=act_order, static_groups=True)
    gptq = output_error(weight, scheme, params, x_test)
    for method in ("rtn", "mse"):
        data_free = QuantScheme(**{**settings, "method": method})
        baseline = output_error(weight, data_free, quantize_params(weight, data_free), x_test)
        # Measured: GPTQ's error is 0.3-0.6x the data-free ones; 0.8 leaves room but fails if GPTQ breaks.
        assert gptq < 0.8 * baseline, (method, gptq, baseline)


@pytest.mark.parametrize("settings", [dict(bits=4, group_size=64), dict(format="nf4", bits=4, group_size=32)])
def test_gptq_dynamic_groups(settings):
    torch.manual_seed(0)
    weight = torch.randn(40, 160)
    x_cal, x_test = correlated_inputs(1024, 160, 3), correlated_inputs(1024, 160, 4)
    scheme = QuantScheme(method="gptq", **settings)
    params = gptq_quantize(weight, x_cal.t() @ x_cal / 1024, scheme, act_order=False, static_groups=False)
    rtn = QuantScheme(**{**settings, "method": "rtn"})
    rtn_error = output_error(weight, rtn, quantize_params(weight, rtn), x_test)
    assert output_error(weight, scheme, params, x_test) < 0.8 * rtn_error


def test_gptq_packs_like_the_format():
    """GPTQ's parameters are the format's: scales as stored (float16-exact), integer codes in range."""
    torch.manual_seed(0)
    weight, x = torch.randn(16, 96), correlated_inputs(256, 96, 5)
    scheme = QuantScheme(bits=3, group_size=32, method="gptq")
    params = gptq_quantize(weight, x.t() @ x, scheme)
    assert params.codes.dtype == torch.uint8 and int(params.codes.max()) <= 7
    assert torch.equal(params.scale, params.scale.half().float())
    assert torch.equal(params.zero, params.zero.round())


def test_gptq_dead_input_channels():
    torch.manual_seed(0)
    weight = torch.randn(32, 128)
    x_cal, x_test = correlated_inputs(512, 128, 6), correlated_inputs(512, 128, 7)
    dead = torch.tensor([0, 5, 64, 127])
    x_cal[:, dead] = 0
    x_test[:, dead] = 0
    scheme = QuantScheme(bits=4, group_size=32, method="gptq")
    params = gptq_quantize(weight, x_cal.t() @ x_cal / 512, scheme)
    w_q = dequantize_codes(scheme, params.codes, params.scale, params.zero, 128)
    assert torch.isfinite(w_q).all()
    # Unused inputs get the representable value nearest 0 (exactly 0 with an integer zero-point; within half a step
    # with the fractional zero-points of 4-bit half-quadratic group parameters), not rounding noise.
    half_step = params.scale.repeat_interleave(32, -1)[:, dead] / 2
    assert (w_q[:, dead].abs() <= half_step * (1 + 1e-6)).all()
    assert (params.codes[:, dead].float() == torch.round(params.zero.repeat_interleave(32, -1)[:, dead])).all()
    rtn = QuantScheme(bits=4, group_size=32, method="rtn")
    rtn_error = output_error(weight, rtn, quantize_params(weight, rtn), x_test)
    assert output_error(weight, scheme, params, x_test) < rtn_error


def test_gptq_ill_conditioned_inputs():
    """Fewer samples than features, duplicated and near-zero channels: H is singular; damping keeps it solvable."""
    torch.manual_seed(0)
    weight = torch.randn(24, 128)
    x = correlated_inputs(40, 128, 8)  # rank <= 40
    x[:, 1] = x[:, 0]
    x[:, 2] *= 1e-6
    hessian = x.t() @ x
    assert torch.linalg.matrix_rank(hessian) < 128
    scheme = QuantScheme(bits=3, group_size=64, method="gptq")
    params = gptq_quantize(weight, hessian, scheme, damp=1e-10)
    w_q = dequantize_codes(scheme, params.codes, params.scale, params.zero, 128)
    assert torch.isfinite(w_q).all()
    # Same span as the calibration inputs: GPTQ must beat RTN there.
    x_test = torch.randn(300, 40) @ torch.linalg.pinv(torch.randn(40, 40)) @ x
    rtn = QuantScheme(bits=3, group_size=64, method="rtn")
    rtn_error = output_error(weight, rtn, quantize_params(weight, rtn), x_test)
    assert output_error(weight, scheme, params, x_test) < rtn_error


def test_hessian_inverse_factor_is_the_damped_inverse():
    x = correlated_inputs(64, 48, 9)
    hessian = x.t() @ x / 64
    upper, damp = hessian_inverse_factor(hessian.double(), 0.01)
    damped = hessian.double() + damp * torch.diagonal(hessian).mean().double() * torch.eye(48, dtype=torch.float64)
    torch.testing.assert_close(upper.t() @ upper, torch.linalg.inv(damped), rtol=1e-6, atol=1e-6)
    assert torch.equal(upper, upper.triu())


def test_hessian_inverse_factor_permutes_fixes_dead_inputs_and_leaves_its_input():
    """With a visit order the factor is that of H[order][:, order] (built inside, so the solver holds no permuted
    copy of its own), dead inputs (zero diagonal) get a unit diagonal first, and the caller's Hessian is unchanged
    (it is damped in a working copy, whose identity term is added in place)."""
    x = correlated_inputs(64, 37, 4)
    x[:, 5] = 0  # a dead input
    hessian = x.t() @ x / 64
    before = hessian.clone()
    order = torch.randperm(37, generator=torch.Generator().manual_seed(2))
    upper, damp = hessian_inverse_factor(hessian, 0.01, order)
    assert torch.equal(hessian, before)
    fixed = hessian.clone()
    fixed[5, 5] = 1.0
    permuted = fixed[order][:, order]
    expected, _ = hessian_inverse_factor(permuted, 0.01)
    assert torch.equal(upper, expected)
    damped = permuted.double() + damp * torch.diagonal(permuted).mean().double() * torch.eye(37, dtype=torch.float64)
    torch.testing.assert_close(upper.double().t() @ upper.double(), torch.linalg.inv(damped), rtol=1e-3, atol=1e-4)


def test_hessian_inverse_factor_raises_damping_until_positive_definite():
    hessian = torch.ones(16, 16, dtype=torch.float64)  # rank 1
    hessian[3, 3] = -5.0  # not even positive semi-definite: no small damping helps
    upper, damp = hessian_inverse_factor(hessian, 1e-4)
    assert damp > 1e-4 and torch.isfinite(upper).all()
    with pytest.raises(ValueError, match="not positive definite"):
        hessian_inverse_factor(-torch.eye(4, dtype=torch.float64) * 1e6, 1e-4)


def test_gptq_rejects_bad_inputs():
    scheme = QuantScheme(bits=4, group_size=32, method="gptq")
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize(torch.randn(4, 32), torch.eye(16), scheme)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(torch.randn(4, 32), torch.eye(32), scheme, act_order=True, static_groups=False)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(torch.randn(4, 32), torch.full((32, 32), float("nan")), scheme)


# --------------------------------------------------------------------------- config


def test_config_fields_round_trip():
    config = HfQuantConfig(method="gptq", bits=3, calibration=["a text", "another"], n_samples=8, seq_len=64,
                           damp=0.05, act_order=False, static_groups=False)
    d = json.loads(config.to_json_string())
    assert d["method"] == "gptq" and d["calibration"] == ["a text", "another"] and d["damp"] == 0.05
    assert HfQuantConfig.from_dict(d) == config
    assert config.needs_calibration and not HfQuantConfig().needs_calibration
    assert HfQuantConfig(overrides={"down_proj": {"method": "gptq"}}).needs_calibration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(calibration=3), "calibration must be"),
        (dict(calibration=[]), "calibration must be"),
        (dict(calibration=["ok", ""]), "calibration must be"),
        (dict(calibration_dataset={"name": "x"}), "calibration_dataset must be"),
        (dict(calibration_dataset={"path": "x", "bogus": 1}), "calibration_dataset must be"),
        (dict(calibration="f.txt", calibration_dataset={"path": "x"}), "not both"),
        (dict(n_samples=0), "n_samples"),
        (dict(seq_len=1.5), "seq_len"),
        (dict(damp=0), "damp"),
        (dict(damp=True), "damp"),
        (dict(act_order=1), "act_order"),
        (dict(static_groups=False), "act_order=True needs static_groups"),
        (dict(act_order=False, static_groups=False, double_quant=True), "double_quant=True needs static_groups"),
        (dict(method="gptqq"), "method must be one of"),
        (dict(token_weighting="tokens"), "token_weighting must be"),
        (dict(rotation="random"), "rotation must be"),
        (dict(method="awq", rotation="hadamard"), "does not combine"),
        (dict(method="awq", rotation="residual"), "does not combine"),
    ],
)
def test_config_rejects_bad_calibration_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HfQuantConfig(**{"method": "gptq", **kwargs})


# --------------------------------------------------------------------------- calibration data


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from hf_quant.assets import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.mark.real_model
def test_default_calibration_is_botchan_after_the_eval_tokens(smollm2_tokenizer):
    from hf_quant.assets import botchan_text

    ids = calibration_token_ids(smollm2_tokenizer, HfQuantConfig(method="gptq", n_samples=4, seq_len=64))
    all_ids = smollm2_tokenizer(botchan_text(), add_special_tokens=False, verbose=False)["input_ids"]
    assert ids.shape == (4, 64)
    assert ids[0].tolist() == all_ids[BOTCHAN_EVAL_TOKENS : BOTCHAN_EVAL_TOKENS + 64]
    assert ids[-1].tolist() == all_ids[-64:]


def test_calibration_from_file_and_texts(tmp_path, smollm2_tokenizer):
    text = " ".join(f"word{i}" for i in range(400))
    (tmp_path / "cal.txt").write_text(text)
    from_file = calibration_token_ids(smollm2_tokenizer, HfQuantConfig(
        method="gptq", calibration=str(tmp_path / "cal.txt"), n_samples=3, seq_len=16))
    from_texts = calibration_token_ids(smollm2_tokenizer, HfQuantConfig(
        method="gptq", calibration=[text], n_samples=3, seq_len=16))
    assert from_file.shape == (3, 16) and torch.equal(from_file, from_texts)
    with pytest.raises(ValueError, match="is not a file"):
        calibration_token_ids(smollm2_tokenizer, HfQuantConfig(method="gptq", calibration=str(tmp_path / "no.txt")))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        calibration_token_ids(smollm2_tokenizer, HfQuantConfig(method="gptq", calibration=["short"], seq_len=64))


# --------------------------------------------------------------------------- end to end


CALIBRATION_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "In the beginning the universe was created. This has made a lot of people very angry. " * 10,
    "Quantization maps each weight to a small set of values; calibration data shows which errors matter. " * 10,
]
IDS = torch.tensor([[1, 500, 900, 17, 3300, 65, 100, 3, 42, 7]])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path_factory.mktemp("calibration") / "float"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


GPTQ_SETTINGS = dict(method="gptq", bits=4, group_size=32, calibration=CALIBRATION_TEXTS, n_samples=6, seq_len=32)


def test_tiny_llama_quantize_save_reload(tiny_llama, tmp_path):
    config = HfQuantConfig(**GPTQ_SETTINGS)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config)
    linears = [m for m in model.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 7 and all(m.scheme.method == "gptq" for m in linears)
    assert model.lm_head.scheme.method == "mse" and model.lm_head.scheme.bits == 8  # default head: data-free
    assert not any(type(m) is torch.nn.Linear for m in model.model.layers.modules())
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.config.quantization_config == model.config.quantization_config
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)
    for (name, a), b in zip(model.named_buffers(), reloaded.buffers()):
        assert torch.equal(a, b), name


def test_gptq_codes_do_not_depend_on_the_hash_seed(tiny_llama):
    """Calibration must not depend on the iteration order of Python sets (randomised per process by
    PYTHONHASHSEED): the same model and data give the same codes in processes with different seeds."""
    import subprocess
    import sys

    script = (
        "import hashlib, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from hf_quant import HfQuantConfig\n"
        "torch.set_num_threads(1)\n"
        f"config = HfQuantConfig(**{dict(GPTQ_SETTINGS, bits=3)!r})\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=config)\n"
        "digest = hashlib.sha256()\n"
        "for name, tensor in sorted(model.state_dict().items()):\n"
        "    digest.update(name.encode()); digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())\n"
        "print(digest.hexdigest())\n"
    )
    digests = set()
    for seed in ("0", "1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", script, str(tiny_llama)], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        digests.add(out.stdout.split()[-1])
    assert len(digests) == 1, digests


def test_tiny_llama_gptq_closer_to_float_than_rtn(tiny_llama):
    """Layer by layer GPTQ beats RTN on the calibration text's own distribution (held-out window)."""
    float_model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    held_out = tok(CALIBRATION_TEXTS[2][:300], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = float_model(held_out).logits

    def error(**settings):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=HfQuantConfig(**settings))
        with torch.no_grad():
            return ((model(held_out).logits - reference) ** 2).mean().item()

    gptq = error(**{**GPTQ_SETTINGS, "bits": 2, "n_samples": 16})
    rtn = error(bits=2, group_size=32, method="rtn")
    assert gptq < rtn, (gptq, rtn)


def test_overrides_mix_gptq_and_data_free(tiny_llama):
    config = HfQuantConfig(**GPTQ_SETTINGS, overrides={r"down_proj": {"method": "mse", "bits": 8}, r"o_proj": None})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config)
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.scheme.method == "mse" and layer.mlp.down_proj.scheme.bits == 8
    assert type(layer.self_attn.o_proj) is torch.nn.Linear
    assert layer.self_attn.q_proj.scheme.method == "gptq"


def test_cli_quantize_with_calibration_file(tiny_llama, tmp_path):
    from hf_quant.cli import main

    cal = tmp_path / "cal.txt"
    cal.write_text("\n\n".join(CALIBRATION_TEXTS))
    out = tmp_path / "cli"
    rc = main(["quantize", str(tiny_llama), "--out", str(out), "--method", "gptq", "--calibration", str(cal),
               "--n-samples", "4", "--seq-len", "32", "--bits", "3", "--group-size", "32", "--eval-tokens", "0"])
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "gptq" and saved["calibration"] == str(cal) and saved["n_samples"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[1].mlp.up_proj.scheme.bits == 3


def test_calibration_method_rejects_unsupported_models(tmp_path):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                         num_experts_per_tok=2)
    Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not rotate fused MoE expert tensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=HfQuantConfig(method="gptq",
                                                                                         rotation="hadamard"))


@pytest.mark.real_model
def test_smollm2_gptq_beats_rtn_and_mse_at_3_bits(tmp_path):
    from hf_quant.assets import botchan_text, smollm2_path
    from hf_quant.eval import perplexity

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    text = botchan_text()

    def ppl(**settings):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     quantization_config=HfQuantConfig(**settings))
        return model, perplexity(model, tok, text, max_tokens=1024)

    model, gptq = ppl(bits=3, group_size=128, method="gptq")  # default calibration: 16 x 512 Botchan tokens
    _, rtn = ppl(bits=3, group_size=128, method="rtn")
    _, mse = ppl(bits=3, group_size=128, method="mse")
    assert gptq < min(rtn, mse) * 0.9, (gptq, rtn, mse)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        ids = tok("It was a fine day.", return_tensors="pt")["input_ids"]
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- AWQ


def test_awq_fold_keeps_the_float_block_exact():
    from hf_quant.algorithms.awq import LLAMA_GROUPS, fold_scale

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        block = model.model.layers[0]
        for prev, linears in LLAMA_GROUPS:  # without GQA every group folds, v -> o included
            n = block.get_submodule(linears[0]).in_features
            fold_scale(block.get_submodule(prev), [block.get_submodule(l) for l in linears], torch.rand(n) * 4 + 0.1)
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_awq_fold_refuses_norms_not_proportional_to_their_weight():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from hf_quant.algorithms.awq import fold_scale

    norm, layer = GemmaRMSNorm(16), torch.nn.Linear(16, 8)
    with torch.no_grad():
        norm.weight.normal_()
    weights = [p.detach().clone() for p in (norm.weight, layer.weight)]
    with pytest.raises(ValueError, match="cannot fold"):
        fold_scale(norm, [layer], torch.rand(16) + 0.5)
    assert torch.equal(norm.weight, weights[0]) and torch.equal(layer.weight, weights[1])  # left unchanged


def test_awq_scale_search_lowers_the_quantized_output_error():
    from hf_quant.algorithms.awq import search_scale

    torch.manual_seed(0)
    x = correlated_inputs(2048, 128, 11)
    weights = [torch.randn(64, 128), torch.randn(32, 128)]
    scheme = QuantScheme(bits=3, group_size=64, method="awq")
    scale, alpha = search_scale(x, weights, [scheme, scheme])
    rtn = QuantScheme(bits=3, group_size=64, method="rtn")

    def err(s):
        total = 0.0
        for w in weights:
            p = quantize_params(w * s, rtn)
            wq = dequantize_codes(rtn, p.codes, p.scale, p.zero, 128) / s
            total += ((x @ (w - wq).t()) ** 2).mean().item()
        return total

    assert alpha > 0 and err(scale) < 0.9 * err(torch.ones(128)), (alpha, err(scale), err(torch.ones(128)))


def test_tiny_llama_awq_quantize_save_reload(tiny_llama, tmp_path):
    settings = {**GPTQ_SETTINGS, "method": "awq"}
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=HfQuantConfig(**settings))
    float_model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, float_model.model.layers[0].input_layernorm.weight)  # scales were folded
    assert all(m.scheme.method == "awq" for m in model.model.modules() if isinstance(m, QuantLinear))
    assert model.lm_head.scheme.method == "mse"  # the default 8-bit head, outside the blocks: data-free
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    torch.testing.assert_close(reloaded.model.layers[0].input_layernorm.weight, norm, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- rotations


@pytest.mark.parametrize("in_features", [16, 64, 96, 576, 1536])
def test_hadamard_rotation_is_orthogonal_and_exact(in_features):
    from hf_quant.algorithms.rotation import HadamardRotation, hadamard_block

    rotation = HadamardRotation(in_features, seed=3)
    eye = torch.eye(in_features, dtype=torch.float64)
    r = rotation(eye)  # the matrix R itself
    torch.testing.assert_close(r @ r.t(), eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotation.inverse(r), eye, rtol=0, atol=1e-12)
    # Against an explicit Sylvester Hadamard matrix.
    b = hadamard_block(in_features)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)))
    expected = torch.diag(rotation.signs.double()) @ torch.block_diag(*[h] * (in_features // b)) / b**0.5
    torch.testing.assert_close(r, expected, rtol=0, atol=1e-12)
    x, w = torch.randn(5, in_features, dtype=torch.float64), torch.randn(7, in_features, dtype=torch.float64)
    torch.testing.assert_close(rotation(x) @ rotation.rotate_weight(w).double().t(), x @ w.t(), rtol=1e-5, atol=1e-4)
    hessian = x.t() @ x
    torch.testing.assert_close(rotation.rotate_hessian(hessian).double(), r.t() @ hessian @ r, rtol=1e-5, atol=1e-5)


def test_hadamard_rotation_rejects_widths_without_a_power_of_two_block():
    from hf_quant.algorithms.rotation import HadamardRotation

    with pytest.raises(ValueError, match="divisible by 16"):
        HadamardRotation(100, seed=0)


def test_rotated_model_at_8_bits_matches_the_float_model(tiny_llama):
    """Rotation is exact: with 8-bit weights the rotated model is as close to float as the unrotated one."""
    float_model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        reference = float_model(IDS).logits

    def error(**settings):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=HfQuantConfig(
            bits=8, group_size=32, **settings))
        with torch.no_grad():
            return (model(IDS).logits - reference).abs().max().item(), model

    plain, _ = error()
    rotated, model = error(rotation="hadamard")
    assert rotated < 1e-2 and rotated < 3 * plain, (rotated, plain)
    float_again = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=HfQuantConfig(
        bits=8, group_size=32, rotation="hadamard"))
    float_again.dequantize()
    with torch.no_grad():  # dequantize() undoes the rotation: plain float weights, plain float model
        assert (float_again(IDS).logits - reference).abs().max().item() < 1e-2


def test_rotation_with_gptq_save_reload(tiny_llama, tmp_path):
    config = HfQuantConfig(**{**GPTQ_SETTINGS, "rotation": "hadamard", "rotation_seed": 5})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config)
    q = model.model.layers[0].mlp.down_proj
    assert q.input_rotation is not None and q.input_rotation.block == 32  # 160 = 5 * 32
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["rotation"] == "hadamard" and saved["rotation_seed"] == 5
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.model.layers[1].self_attn.q_proj.input_rotation is not None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_residual_rotation_fold_is_exact(tied):
    from hf_quant.model import decoder_blocks
    from hf_quant.algorithms.rotation import fold_residual_rotation

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial RMSNorm gains, so folding them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 2.0)
        ids = torch.randint(0, 300, (2, 11))
        before = model(ids).logits
        embedding = model.get_input_embeddings().weight.clone()
        fold_residual_rotation(model, 7, *decoder_blocks(model))
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(model.get_input_embeddings().weight, embedding)  # the stream really is rotated
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "norm" in n)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert model.config.tie_word_embeddings is False


def test_residual_rotation_quantize_save_reload(tiny_llama, tmp_path):
    float_model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        reference = float_model(IDS).logits
    config = HfQuantConfig(bits=8, group_size=32, rotation="residual", rotation_seed=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config)
    assert all(m.input_rotation is None for m in model.modules() if isinstance(m, QuantLinear))  # nothing online
    with torch.no_grad():
        logits = model(IDS).logits
    assert (logits - reference).abs().max().item() < 1e-2  # 8 bits in the rotated basis: the same model
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_config"]["rotation"] == "residual" and saved["tie_word_embeddings"] is False
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)


def test_residual_rotation_refuses_other_architectures(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rotation='residual' folds Llama-style decoders"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=HfQuantConfig(rotation="residual"))


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory, smollm2_tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    folder = tmp_path_factory.mktemp("calibration") / "mixtral"
    MixtralForCausalLM(cfg).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def test_gptq_calibrates_fused_moe_experts(tiny_mixtral, tmp_path):
    """Per-expert Hessians from the routed tokens: every expert tensor is packed, closer to float than RTN on held-out
    text of the calibration distribution, and the checkpoint reloads with identical logits."""
    from hf_quant.nn import QuantExpertWeight

    tok = AutoTokenizer.from_pretrained(tiny_mixtral)
    held_out = tok(CALIBRATION_TEXTS[2][:300], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tiny_mixtral)(held_out).logits

    def quantize(**settings):
        model = AutoModelForCausalLM.from_pretrained(tiny_mixtral, quantization_config=HfQuantConfig(**settings))
        with torch.no_grad():
            return model, ((model(held_out).logits - reference) ** 2).mean().item()

    model, gptq = quantize(**{**GPTQ_SETTINGS, "bits": 3, "n_samples": 16})
    experts = [m for m in model.modules() if isinstance(m, QuantExpertWeight)]
    assert len(experts) == 2 * 2 and all(m.scheme.method == "gptq" for m in experts)
    _, rtn = quantize(bits=3, group_size=32, method="rtn")
    assert gptq < rtn, (gptq, rtn)
    assert_reload_identical(model, tmp_path / "q", IDS)


def test_gptq_experts_refuse_double_quant(tiny_mixtral):
    config = HfQuantConfig(**{**GPTQ_SETTINGS, "double_quant": True})
    with pytest.raises(ValueError, match="cannot use double_quant=True"):
        AutoModelForCausalLM.from_pretrained(tiny_mixtral, quantization_config=config)


def test_expert_hessians_follow_the_routing():
    """Expert e's Hessian is X_e^T X_e / n_e of exactly the tokens routed to it."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from hf_quant.algorithms.experts import ExpertHessians

    torch.manual_seed(0)
    experts = MixtralExperts(MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=3))
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    stats = ExpertHessians("experts", experts)
    x = torch.randn(10, 16)
    index = torch.tensor([[0, 1]] * 4 + [[1, 0]] * 3 + [[0, 1]] * 3)  # expert 2 never chosen
    experts(x, index, torch.full((10, 2), 0.5))
    stats.remove()
    torch.testing.assert_close(stats.hessian("gate_up_proj", 0), x.t() @ x / 10)
    assert stats.hessian("down_proj", 2) is None and stats.counts == [10, 10, 0]


def test_gptq_with_device_map_cpu(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, device_map="cpu",
                                                 quantization_config=HfQuantConfig(**GPTQ_SETTINGS))
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


# --------------------------------------------------------------------------- RSQ token weighting


def test_inputs_that_reuse_freed_memory_keep_their_own_hessian():
    """A temporary fed to one linear and then freed may be reallocated for the next linear's input (as o_proj's or
    gate_proj's input after q_proj's in a real block): each linear must still get its own Hessian. The module hands
    out its scratch tensor again once nothing else holds it, as a caching allocator reuses freed memory."""
    import sys

    from hf_quant.pipeline.statistics import InputCollector as _InputCollector

    class ReusesScratch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(16, 4), torch.nn.Linear(16, 4)
            self.spare = None

        def scratch(self, like):
            if self.spare is None or sys.getrefcount(self.spare) > 2:  # 2: self.spare and getrefcount's argument
                self.spare = torch.empty_like(like)
            return self.spare

        def forward(self, x):
            a = torch.mul(x, 2, out=self.scratch(x))
            out = self.first(a)
            del a
            return out + self.second(torch.sin(x, out=self.scratch(x)))

    module = ReusesScratch()
    x = torch.randn(3, 7, 16)
    collector = _InputCollector({"first": module.first, "second": module.second}, {"first", "second"}, set(), 1)
    with torch.no_grad():
        collector.new_batch()
        module(x)
    collector.remove()
    assert collector.leader == {"first": "first", "second": "second"}
    rows = x.reshape(-1, 16)
    torch.testing.assert_close(collector.hessian("first"), (2 * rows).t() @ (2 * rows) / rows.shape[0])
    torch.testing.assert_close(collector.hessian("second"), rows.sin().t() @ rows.sin() / rows.shape[0])


def test_token_weighted_hessian():
    from hf_quant.pipeline.statistics import InputCollector as _InputCollector

    layer = torch.nn.Linear(12, 4)
    collector = _InputCollector({"l": layer}, {"l"}, set(), 1, token_weights=True)
    x = torch.randn(2, 5, 12)
    weights = torch.rand(2, 5) + 0.1
    collector.new_batch()
    layer(x)
    collector.end_batch(weights)
    collector.remove()
    rows, w = x.reshape(-1, 12), weights.reshape(-1, 1)
    torch.testing.assert_close(collector.hessian("l"), (rows * w).t() @ rows / w.sum(), rtol=1e-5, atol=1e-6)


def test_tiny_llama_gptq_with_attention_token_weighting(tiny_llama, tmp_path):
    config = HfQuantConfig(**GPTQ_SETTINGS, token_weighting="attention")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=HfQuantConfig(**GPTQ_SETTINGS))
    assert model.config._attn_implementation == plain.config._attn_implementation  # restored after calibration
    a, b = model.model.layers[0].self_attn.q_proj, plain.model.layers[0].self_attn.q_proj
    assert not torch.equal(a.qweight, b.qweight)  # the weighting changed GPTQ's choices
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(tmp_path / "q")
    assert HfQuantConfig.from_dict(json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
                                   ).token_weighting == "attention"
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(IDS).logits, logits,
                                   rtol=0, atol=0)
