"""Untrusted input (issue 15): a checkpoint's config.json and safetensors headers come from strangers. Each bad value
raises our own ValueError naming the field, module or file and the fix; a config's regexes are judged before they are
ever matched, so none can hang a load. Each test below failed on the code before the fix."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

from hf_quant import HfQuantConfig, QuantLinear, QuantScheme
from hf_quant.cli import main as cli_main
from hf_quant.eval.storage import checkpoint_storage
from hf_quant.formats import quantize
from hf_quant.integrations import hub

# --- regexes: overrides keys and modules_to_not_convert entries ------------------------------------------------------

BACKTRACKING = [
    r"^(.|\w|[a-z_.])*!",  # the probe's pattern: exponential against model.layers.0.self_attn.q_proj
    r"(\w+\.)*x",  # nested repetition
    r"(a|ab)+",  # a repeated alternation
    ".?" * 30 + "!",  # no nesting, but 2**30 ways in sequence
    ".*" * 5 + "!",  # polynomial of degree 5 in the name length
    r"(\w+)\.\1",  # backreference
]
LEGITIMATE = ["down_proj", "lm_head", ".*q_proj", r"layers\.(0|1)\.", r"layers\.([2-9]|[1-9]\d)\.", r"layers\.\d+\.mlp",
              r"^model\.layers\.3\.", "(q|k|v)_proj", r"experts\.gate_up_proj", r"\.down_proj$", "k_proj|v_proj",
              r"^q_proj$", "(gate|up|down)_proj", r".*layers\.\d+\.mlp", "model.layers.0.mlp", r"(layers\.\d+\.)?mlp",
              r"^model\.layers\.0\.mlp\.experts\.gate_up_proj$"]


def _refused(field: str, pattern: str, *expected: str) -> None:
    """Building the config (by keyword and from a saved config.json's dict) raises naming the field and pattern,
    at once: construction never matches a pattern, so it cannot hang."""
    value = [[pattern, {"bits": 8}]] if field == "overrides" else [pattern]
    for build in (lambda: HfQuantConfig(**{field: value}),
                  lambda: HfQuantConfig.from_dict({"format_version": 1, field: value})):
        start = time.perf_counter()
        with pytest.raises(ValueError) as info:
            build()
        assert time.perf_counter() - start < 1
        message = str(info.value)
        for part in (field, repr(pattern)[:40], *expected):
            assert part in message, message


@pytest.mark.parametrize("field", ["overrides", "modules_to_not_convert"])
@pytest.mark.parametrize("pattern", BACKTRACKING)
def test_backtracking_patterns_are_refused_at_construction(field, pattern):
    _refused(field, pattern, "list the module names, or use a pattern without nested")


@pytest.mark.parametrize("field", ["overrides", "modules_to_not_convert"])
def test_invalid_and_overlong_patterns_are_refused(field):
    _refused(field, "(", "not a valid regular expression")  # modules_to_not_convert: was a raw re.error at load
    _refused(field, "a" * 1001, "longer than 1000 characters")


@pytest.mark.parametrize("pattern", LEGITIMATE)
def test_common_patterns_are_accepted(pattern):
    config = HfQuantConfig(overrides={pattern: {"bits": 8}}, modules_to_not_convert=[pattern])
    assert config.scheme_for("model.layers.0.mlp.down_proj") is not None


def test_the_ways_budget_is_counted_in_sequence():
    HfQuantConfig(overrides={".?" * 13: None, ".*x.*": None})  # 8192 and 65**2 ways
    for pattern in (".?" * 14, r"\d+\.\d+\.\d+"):  # 16384 and 65**3
        _refused("overrides", pattern, "ways")
    # All of a field's patterns may be tried on every name: their ways add up.
    with pytest.raises(ValueError, match="with the entries before it"):
        HfQuantConfig(overrides={f"{i}" + ".?" * 13: None for i in range(13)})


# --- minor field checks ----------------------------------------------------------------------------------------------


def test_rotation_seed_is_bounded():
    assert HfQuantConfig(rotation_seed=2**32 - 1).rotation_seed == 2**32 - 1
    with pytest.raises(ValueError, match=r"rotation_seed must be an int in \[0, 2\*\*32\)"):
        HfQuantConfig(rotation_seed=2**70)  # passed, then overflowed torch.Generator.manual_seed


def test_string_format_version_is_a_type_error_not_upgrade_advice():
    with pytest.raises(ValueError) as info:
        HfQuantConfig.from_dict({"format_version": "1"})
    assert "format_version must be an int" in str(info.value) and "upgrade" not in str(info.value)


def test_from_float_of_a_quantized_layer_says_already_quantized():
    q = QuantLinear.from_float(torch.nn.Linear(64, 8), QuantScheme(group_size=32))
    with pytest.raises(ValueError, match="already quantized"):
        QuantLinear.from_float(q, QuantScheme(group_size=32))
    with pytest.raises(TypeError, match="nn.Linear or a GPT-2 Conv1D, got Conv2d"):
        QuantLinear.from_float(torch.nn.Conv2d(1, 1, 1), QuantScheme(group_size=32))


# --- hf-quant inspect: the safetensors headers are untrusted ---------------------------------------------------------

SCHEME = QuantScheme(group_size=32)


def _checkpoint(folder, record=None, metadata=None, config=None):
    """A one-module checkpoint as hf_quant saves it (config.json, model.safetensors with `hf_quant_modules`), with
    its module record, raw metadata or config.json replaced where given."""
    folder.mkdir(exist_ok=True)
    tensors = {f"layer.{k}": v.contiguous() for k, v in quantize(torch.randn(8, 64), SCHEME).items()}
    tensors["embed.weight"] = torch.zeros(4, 64)
    if record is None:
        record = {"shape": [8, 64], "scheme": SCHEME.to_dict(), "kind": "QuantLinear"}
    if metadata is None:
        metadata = json.dumps({"layer": record})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"hf_quant_modules": metadata})
    if config is None:
        config = json.dumps({"quantization_config": HfQuantConfig().to_dict()})
    (folder / "config.json").write_text(config)
    return folder


def test_inspect_reads_an_untampered_checkpoint(tmp_path, capsys):
    assert cli_main(["inspect", str(_checkpoint(tmp_path / "ok"))]) == 0
    assert "layer" in capsys.readouterr().out
    assert checkpoint_storage(tmp_path / "ok").quantized_weights == 8 * 64


TAMPERED = {
    # the record's shape disagrees with the stored tensors (was reported as 1.2e24 and 1024 weights)
    "huge shape": ({"record": {"shape": [2**40, 2**40], "scheme": SCHEME.to_dict(), "kind": "QuantLinear"}},
                   ["'layer'", "2**31"]),
    "wrong shape": ({"record": {"shape": [16, 64], "scheme": SCHEME.to_dict(), "kind": "QuantLinear"}},
                    ["'layer'", "model.safetensors", "the file holds"]),
    # malformed records (were TypeError / AttributeError / KeyError, or a bare JSON error naming no file)
    "shape not a list": ({"record": {"shape": "8x64", "scheme": SCHEME.to_dict(), "kind": "QuantLinear"}},
                         ["'layer'", "'shape'"]),
    "scheme not a dict": ({"record": {"shape": [8, 64], "scheme": 4, "kind": "QuantLinear"}}, ["'layer'", "'scheme'"]),
    "unknown scheme field": ({"record": {"shape": [8, 64], "scheme": {"bitz": 4}, "kind": "QuantLinear"}},
                             ["'layer'", "'scheme'"]),
    "no kind": ({"record": {"shape": [8, 64], "scheme": SCHEME.to_dict()}}, ["'layer'", "'kind'"]),
    "record not a dict": ({"record": [8, 64]}, ["'layer'", "'shape'"]),
    "metadata not JSON": ({"metadata": "{not json"}, ["model.safetensors", "not valid JSON"]),
    "metadata a list": ({"metadata": "[1, 2]"}, ["model.safetensors", "JSON object"]),
    "config.json not JSON": ({"config": "{"}, ["config.json", "not valid JSON"]),
    "config.json bad field": ({"config": json.dumps({"quantization_config": {**HfQuantConfig().to_dict(),
                                                                             "rotation_seed": 2**70}})},
                              ["rotation_seed"]),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_inspect_refuses_tampered_headers(case, tmp_path, capsys):
    kwargs, expected = TAMPERED[case]
    assert cli_main(["inspect", str(_checkpoint(tmp_path / "bad", **kwargs))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(part in err for part in expected), err


# --- hub: the model card template ------------------------------------------------------------------------------------


def test_a_stray_model_cards_folder_in_site_packages_is_not_used(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    (site / "hf_quant" / "integrations").mkdir(parents=True)
    (site / "model_cards").mkdir()
    (site / "model_cards" / hub.CARD_TEMPLATE).write_text("{{ some.other.project }}")  # another project's folder
    monkeypatch.setattr(hub, "__file__", str(site / "hf_quant" / "integrations" / "hub.py"))
    with pytest.raises(hub.HubPushError, match="reinstall"):
        hub._template_dir()  # our own copy is missing: say so, never render a stranger's template
    (site / "hf_quant" / "model_cards").mkdir()
    (site / "hf_quant" / "model_cards" / hub.CARD_TEMPLATE).write_text("ours")
    assert hub._template_dir() == site / "hf_quant" / "model_cards"


@pytest.mark.parametrize("settings,named,near", [
    ({"overrides": {"down_prj": {"bits": 8}}}, "overrides['down_prj']", "down_proj"),
    ({"modules_to_not_convert": ["lm_haed"]}, "modules_to_not_convert entry 'lm_haed'", "lm_head"),
])
def test_a_pattern_that_matches_no_module_is_an_error_naming_the_nearest(tmp_path, settings, named, near):
    """A typo used to change nothing, without a word (issue: the first hour of a new user)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_quant import HfQuantConfig

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=HfQuantConfig(group_size=32, **settings))
    assert named in str(info.value) and near in str(info.value), str(info.value)
