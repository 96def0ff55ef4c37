"""HfQuantConfig: validation at construction, serialization round trips, format_version, per-module schemes."""

from __future__ import annotations

import ast
import copy
import inspect
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.quantizers.auto import AutoQuantizationConfig

import hf_quant
from hf_quant import FORMAT_VERSION, HfQuantConfig, QuantScheme
from hf_quant import config as config_module
from hf_quant.config import CALIBRATION_FIELDS, DECLARATIONS, FIELDS
from hf_quant.formats.format import format_names
from hf_quant.formats.scheme import HEAD_INT8, METHODS, SCHEME_FIELDS

ALLOWED_BITS = "[2, 3, 4, 5, 6, 8]"
ALLOWED_FORMATS = "['int', 'nf4', 'fp4', 'fp8', 'ternary', 'vq', 'kquant']"


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )


# --- validation ----------------------------------------------------------------------------------

# (kwargs, substrings the message must contain: the field and what it accepts)
INVALID = [
    ({"bits": 7}, ["bits", ALLOWED_BITS, "got 7"]),
    ({"bits": 1}, ["bits", ALLOWED_BITS, "got 1"]),
    ({"bits": "4"}, ["bits", ALLOWED_BITS, "got '4'"]),
    ({"bits": 4.0}, ["bits", "int", ALLOWED_BITS]),
    ({"bits": True}, ["bits", ALLOWED_BITS]),
    ({"format": "nf5"}, ["format", ALLOWED_FORMATS, "'nf5'"]),
    ({"format": None}, ["format", ALLOWED_FORMATS]),
    ({"group_size": 100}, ["group_size", "[32, 64, 128, 256, -1]", "got 100"]),
    ({"group_size": 0}, ["group_size", "[32, 64, 128, 256, -1]", "got 0"]),
    ({"group_size": 128.0}, ["group_size", "[32, 64, 128, 256, -1]"]),
    ({"symmetric": "yes"}, ["symmetric", "bool", "True or False", "'yes'"]),
    ({"method": "gptq-typo"}, ["method", str(list(METHODS)), "'gptq-typo'"]),
    ({"double_quant": 1}, ["double_quant", "bool", "True or False", "got 1"]),
    ({"quantize_experts": "no"}, ["quantize_experts", "True or False"]),
    ({"overrides": {"down_proj(": {"bits": 8}}}, ["overrides", "'down_proj('", "regular expression"]),
    ({"overrides": {"down_proj": {"bitz": 8}}}, ["overrides['down_proj']", "['bitz']", "allowed", "'group_size'"]),
    ({"overrides": {"down_proj": {"bits": 7}}}, ["overrides['down_proj']", "bits", ALLOWED_BITS]),
    ({"overrides": {"down_proj": {"format": "nf4", "bits": 8}}}, ["overrides['down_proj']", "bits=8", "nf4"]),
    ({"overrides": {"down_proj": 8}}, ["overrides['down_proj']", "dict of settings", "None"]),
    ({"overrides": ["down_proj"]}, ["overrides must be a dict", "{'down_proj': {'bits': 8}}"]),
    ({"overrides": {3: {"bits": 8}}}, ["overrides keys", "str"]),
    ({"overrides": [["a", {"bits": 8}], ["a", None]]}, ["overrides", "'a'", "more than once"]),
    ({"overrides": [["a", {"bits": 8}, "extra"]]}, ["overrides must be a dict", "[regex, settings] pairs"]),
    ({"modules_to_not_convert": "lm_head"}, ["modules_to_not_convert", "list of module names", "['lm_head']"]),
    ({"modules_to_not_convert": ["lm_head", 3]}, ["modules_to_not_convert", "list of module names"]),
    ({"modules_to_not_convert": {"lm_head": 1}}, ["modules_to_not_convert", "list of module names"]),
    ({"bitz": 4}, ["unknown field", "'bitz'", "did you mean 'bits'", "'group_size'"]),
    ({"group": 32}, ["unknown field", "'group'", "'group_size'"]),
    ({"format_version": 99}, ["format_version=99", "[1]", "upgrade hf_quant"]),
    ({"format_version": "1"}, ["format_version must be an int", "'1'", "without quotes"]),
    ({"format_version": True}, ["format_version must be an int", "got True"]),
    ({"quant_method": "gptq"}, ["quant_method", "'hf_quant'", "'gptq'"]),
    ({"format": "nf4", "bits": 3}, ["bits=3", "nf4", "4"]),
    ({"format": "fp8", "bits": 4}, ["bits=4", "fp8", "8"]),
    ({"format": "nf4", "symmetric": True}, ["symmetric=True", "format='nf4'", "['int']"]),
]


@pytest.mark.parametrize("kwargs,expected", INVALID, ids=[repr(k) for k, _ in INVALID])
def test_invalid_field_raises_naming_field_and_allowed_values(kwargs, expected):
    with pytest.raises(ValueError) as info:
        HfQuantConfig(**kwargs)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize("kwargs,expected", INVALID[:14], ids=[repr(k) for k, _ in INVALID[:14]])
def test_from_dict_validates_like_the_constructor(kwargs, expected):
    d = {**HfQuantConfig().to_dict(), **kwargs}
    with pytest.raises(ValueError) as info:
        HfQuantConfig.from_dict(d)
    assert all(part in str(info.value) for part in expected), str(info.value)


def test_from_dict_requires_format_version():
    d = HfQuantConfig().to_dict()
    del d["format_version"]
    with pytest.raises(ValueError, match="format_version") as info:
        HfQuantConfig.from_dict(d)
    assert "save the checkpoint again" in str(info.value)
    assert "HfQuantConfig(...)" in str(info.value)


def test_from_dict_rejects_other_quant_method():
    with pytest.raises(ValueError, match="'gptq'"):
        HfQuantConfig.from_dict({**HfQuantConfig().to_dict(), "quant_method": "gptq"})


def test_changes_after_construction_are_validated_and_applied():
    config = HfQuantConfig()
    config.bits = 3  # attribute set directly: used (not silently ignored) ...
    assert config.scheme_for("model.layers.0.mlp.up_proj").bits == 3
    with pytest.raises(ValueError, match=r"bits must be .*\[2, 3, 4, 5, 6, 8\].*got 7"):
        config.bits = 7  # ... and validated when assigned
    assert config.bits == 3 and config.scheme_for("a").bits == 3  # a rejected assignment changes nothing

    config = HfQuantConfig()
    assert config.update(group_size=64, cache_dir="x") == {"cache_dir": "x"}  # non-fields are returned unused
    assert config.group_size == 64 and config.scheme_for("a").group_size == 64
    with pytest.raises(ValueError, match="group_size"):
        config.update(group_size=100)
    assert config.group_size == 64  # a rejected update changes nothing
    config.update(format="fp8")  # bits follows the new format when not given, as for a new config
    assert (config.format, config.bits) == ("fp8", 8)

    config, unused = HfQuantConfig.from_dict(HfQuantConfig().to_dict(), return_unused_kwargs=True, bits=8, foo=1)
    assert config.bits == 8 and config.scheme_for("a").bits == 8 and unused == {"foo": 1}
    with pytest.raises(ValueError, match="bits"):
        HfQuantConfig.from_dict(HfQuantConfig().to_dict(), bits=7)


def test_valid_configs_construct():
    for kwargs in [
        {},
        {"bits": 2, "group_size": -1, "symmetric": True, "method": "rtn", "double_quant": True},
        {"format": "nf4"},
        {"format": "fp4", "bits": 4},
        {"format": "fp8", "group_size": 32},
        {"modules_to_not_convert": ("lm_head",)},  # a tuple is accepted and stored as a list
        {"overrides": {r"\.down_proj$": {"format": "nf4"}, "o_proj": None}, "quantize_experts": False},
    ]:
        HfQuantConfig(**kwargs)
    assert HfQuantConfig(modules_to_not_convert=("lm_head",)).modules_to_not_convert == ["lm_head"]


# --- bits=None default ---------------------------------------------------------------------------


def test_bits_default_is_documented_and_resolved_once():
    doc = HfQuantConfig.__doc__
    assert "Default (None): 4 for \"int\"" in doc and "fp8: 8" in doc
    expected = {"int": 4, "nf4": 4, "fp4": 4, "fp8": 8}
    for fmt, bits in expected.items():
        config = HfQuantConfig(format=fmt)  # bits=None
        assert config.bits == bits
        assert config.to_dict()["bits"] == bits  # stored resolved, never None
        assert config == HfQuantConfig(format=fmt, bits=bits)
        assert config.scheme_for("x") == QuantScheme(format=fmt, bits=bits, group_size=128)
        # stable: a round trip, or None given explicitly, gives the same config
        assert HfQuantConfig.from_dict(config.to_dict()) == config
        assert HfQuantConfig.from_dict({**config.to_dict(), "bits": None}) == config


# --- format_version ------------------------------------------------------------------------------


def test_format_version_is_serialized():
    d = HfQuantConfig().to_dict()
    assert d["format_version"] == FORMAT_VERSION == 1
    assert json.loads(HfQuantConfig().to_json_string())["format_version"] == FORMAT_VERSION


# --- schemes per module --------------------------------------------------------------------------


def test_scheme_for_first_matching_override_wins():
    config = HfQuantConfig(
        bits=4,
        group_size=64,
        overrides={
            r"layers\.0\.mlp\.down_proj": {"bits": 8},
            r"down_proj": {"bits": 2, "method": "rtn"},
            r"o_proj": None,
            r"proj": {"bits": 3},  # matches everything above too, but comes last
        },
    )
    assert config.scheme_for("model.layers.0.mlp.down_proj") == QuantScheme(bits=8, group_size=64)
    assert config.scheme_for("model.layers.1.mlp.down_proj") == QuantScheme(bits=2, group_size=64, method="rtn")
    assert config.scheme_for("model.layers.0.self_attn.o_proj") is None  # kept in float
    assert config.scheme_for("model.layers.0.self_attn.q_proj") == QuantScheme(bits=3, group_size=64)
    assert config.scheme_for("lm_head") == QuantScheme(bits=4, group_size=64)  # no match: the default
    # re.search semantics: a pattern matches anywhere unless anchored
    anchored = HfQuantConfig(overrides={r"^q_proj$": {"bits": 8}})
    assert anchored.scheme_for("model.layers.0.self_attn.q_proj").bits == 4
    assert anchored.scheme_for("q_proj").bits == 8


def test_override_order_survives_serialization():
    # The order decides which override wins; transformers writes config.json with sorted keys, so to_dict holds
    # the overrides as an ordered list of [regex, settings] pairs.
    config = HfQuantConfig(overrides={"proj": {"bits": 8}, "down_proj": None, "a": {"bits": 2}})
    d = config.to_dict()
    assert d["overrides"] == [["proj", {"bits": 8}], ["down_proj", None], ["a", {"bits": 2}]]
    restored = HfQuantConfig.from_dict(json.loads(json.dumps(d, sort_keys=True)))
    assert restored == config
    assert restored.overrides == {"proj": {"bits": 8}, "down_proj": None, "a": {"bits": 2}}  # still a dict
    assert list(restored.overrides) == ["proj", "down_proj", "a"]
    assert restored.scheme_for("mlp.down_proj").bits == 8
    # a different order is a different config
    assert HfQuantConfig(overrides={"down_proj": None, "proj": {"bits": 8}, "a": {"bits": 2}}) != config


def test_codebook_formats_imply_their_bits():
    assert HfQuantConfig(format="nf4").bits == 4
    assert HfQuantConfig(format="fp4").bits == 4
    assert HfQuantConfig(format="fp8").bits == 8
    for fmt, wrong in [("nf4", 8), ("nf4", 3), ("fp4", 2), ("fp8", 4), ("fp8", 6)]:
        with pytest.raises(ValueError, match=rf"bits={wrong} does not fit format='{fmt}'"):
            HfQuantConfig(format=fmt, bits=wrong)
    # an override switching format takes the codebook's width (and drops the inherited int settings) ...
    config = HfQuantConfig(bits=3, symmetric=True, overrides={"a": {"format": "fp8"}, "b": {"format": "nf4"}})
    assert config.scheme_for("a") == QuantScheme(format="fp8", bits=8)
    assert config.scheme_for("b") == QuantScheme(format="nf4", bits=4)
    # ... but an explicit mismatch is an error, not silently replaced
    with pytest.raises(ValueError, match=r"overrides\['a'\].*bits=3 does not fit format='nf4'"):
        HfQuantConfig(overrides={"a": {"format": "nf4", "bits": 3}})
    with pytest.raises(ValueError, match=r"overrides\['a'\].*symmetric"):
        HfQuantConfig(overrides={"a": {"format": "nf4", "symmetric": True}})
    with pytest.raises(ValueError, match=r"overrides\['a'\].*bits=4 does not fit format='fp8'"):
        HfQuantConfig(format="fp8", overrides={"a": {"bits": 4}})


# --- round trips ---------------------------------------------------------------------------------

ROUND_TRIP = [
    HfQuantConfig(),
    HfQuantConfig(bits=3, group_size=-1, symmetric=True, method="rtn", double_quant=True),
    HfQuantConfig(format="nf4", group_size=32, modules_to_not_convert=["lm_head", "model.layers.0.mlp"]),
    HfQuantConfig(format="fp8", quantize_experts=False),
    HfQuantConfig(overrides={r"down_proj$": {"bits": 8, "group_size": 32}, "o_proj": None, "k": {"format": "fp4"}}),
]


@pytest.mark.parametrize("config", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_round_trips(config):
    original = copy.deepcopy(config)
    d = config.to_dict()
    assert d["quant_method"] == "hf_quant"
    assert set(d) == {"quant_method", *FIELDS}
    assert HfQuantConfig.from_dict(d) == config
    via_json = json.loads(config.to_json_string())
    assert HfQuantConfig.from_dict(via_json) == config
    via_auto = AutoQuantizationConfig.from_dict(via_json)
    assert type(via_auto) is HfQuantConfig and via_auto == config
    assert dict(config) == d  # `dict(config)` yields the fields only (JSON-serializable)
    for name in ("a.down_proj", "model.o_proj", "k", "lm_head"):
        assert via_auto.scheme_for(name) == config.scheme_for(name)
    assert config == original  # serializing does not change the config
    assert HfQuantConfig.from_dict(d) is not config and d == config.to_dict()  # to_dict is a copy


def test_saved_model_config_round_trips(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "float")
    # Overlapping overrides whose order matters (sorted, "mlp" would come first and win for down_proj).
    overrides = {r"mlp\.down_proj": {"bits": 8}, "mlp": {"bits": 2}, "o_proj": None}
    config = HfQuantConfig(bits=4, group_size=32, double_quant=True, overrides=overrides)
    before = config.to_dict()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
    assert config.to_dict() == before  # the caller's config is not changed by loading
    model.save_pretrained(tmp_path / "quant")

    saved = json.loads((tmp_path / "quant" / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == FORMAT_VERSION
    assert saved["quant_method"] == "hf_quant"
    # Everything as given, plus the resolved default of modules_to_not_convert and the head's override (lm_head
    # "int8": the head leaves the default list; recorded so a reload depends neither on transformers' heuristics
    # nor on the lm_head field) and the digest linking config.json to the weights saved with it.
    assert len(saved["weights_digest"]) == 64
    resolved = {"modules_to_not_convert": [], "overrides": before["overrides"] + [["^lm_head$", HEAD_INT8]]}
    assert saved == {**before, **resolved, "weights_digest": saved["weights_digest"]}
    loaded = AutoQuantizationConfig.from_dict(saved)
    assert loaded == model.config.quantization_config
    assert loaded == HfQuantConfig.from_dict({**before, **resolved, "weights_digest": saved["weights_digest"]})

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "quant")
    assert reloaded.config.quantization_config == loaded
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, hf_quant.QuantLinear)
    layer = reloaded.model.layers[0]
    assert layer.mlp.down_proj.scheme.bits == 8
    assert layer.mlp.up_proj.scheme.bits == 2
    assert type(layer.self_attn.o_proj) is torch.nn.Linear
    assert layer.self_attn.q_proj.scheme.bits == 4
    assert reloaded.lm_head.scheme == QuantScheme(bits=8, group_size=-1, symmetric=True)
    # Saving the reloaded model writes the same quantization_config again.
    reloaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again == saved


# --- fields declared once ------------------------------------------------------------------------

# A valid non-default value of every field (with what it needs of the others), for the round trip below.
SAMPLES = {
    "weights_digest": {"weights_digest": "0123456789abcdef" * 4},
    "format": {"format": "nf4"},
    "bits": {"bits": 3},
    "group_size": {"group_size": 64},
    "symmetric": {"symmetric": True},
    "method": {"method": "rtn"},
    "double_quant": {"double_quant": True},
    "lowrank_rank": {"lowrank_rank": 4},
    "planes": {"format": "ternary", "planes": 2},
    "outliers_per_row": {"outliers_per_row": 2},
    "modules_to_not_convert": {"modules_to_not_convert": ["lm_head"]},
    "overrides": {"overrides": {"down": {"bits": 8}, "o_proj": None}},
    "lm_head": {"lm_head": "float"},
    "quantize_experts": {"quantize_experts": False},
    "quantize_embeddings": {"quantize_embeddings": True},
    "target": {"target": "vllm", "group_size": 64},
    "calibration": {"calibration": ["some text"]},
    "calibration_dataset": {"calibration_dataset": {"path": "wikitext", "name": "wikitext-2-raw-v1"}},
    "calibration_seed": {"calibration": "generated", "calibration_seed": 5},
    "n_samples": {"n_samples": 4},
    "seq_len": {"seq_len": 64},
    "damp": {"damp": 0.1},
    "act_order": {"act_order": False},
    "static_groups": {"act_order": False, "static_groups": False},
    "refit_scales": {"refit_scales": True},
    "rotation": {"rotation": "hadamard"},
    "rotation_seed": {"rotation_seed": 3},
    "token_weighting": {"token_weighting": "attention"},
    "moe_calibrate_all_experts": {"moe_calibrate_all_experts": True},
    "target_bits": {"target_bits": 2.5},
    "allocation_candidates": {"allocation_candidates": [{"bits": 2}, {"bits": 4, "double_quant": True}]},
}


def test_every_declared_field_round_trips():
    assert set(SAMPLES) | {"format_version"} == set(FIELDS)  # format_version has one supported value
    default = HfQuantConfig()
    for name, kwargs in SAMPLES.items():
        config = HfQuantConfig(**kwargs)
        assert getattr(config, name) != getattr(default, name), name
        d = config.to_dict()
        again = HfQuantConfig.from_dict(json.loads(json.dumps(d)))
        assert again == config and getattr(again, name) == getattr(config, name), name
        assert again.to_dict() == d


def test_fields_derive_from_the_declarations():
    names = [f.name for f in DECLARATIONS]
    assert len(set(names)) == len(names)
    assert list(FIELDS) == names
    assert list(HfQuantConfig().to_dict()) == ["quant_method", *names]  # quant_method first, then the table
    assert list(inspect.signature(HfQuantConfig).parameters) == names  # the accepted kwargs
    assert set(CALIBRATION_FIELDS) == {f.name for f in DECLARATIONS if f.group == "calibration"}
    assert list(SCHEME_FIELDS) == [f.name for f in DECLARATIONS if f.group == "scheme"]
    assert HfQuantConfig(**{f.name: f.default for f in DECLARATIONS}) == HfQuantConfig()
    for name in names:  # the unknown-field hint offers every declared field
        with pytest.raises(ValueError, match=rf"known fields: .*'{name}'"):
            HfQuantConfig(**{name + "_x": 1})


def test_docstring_documents_every_declared_field():
    doc = HfQuantConfig.__doc__
    for f in DECLARATIONS:
        assert f"\n        {f.name}: " in doc, f.name
        assert " ".join(f.doc.split()[:4]) in " ".join(doc.split()), f.name


def test_attribute_assignment_is_validated():
    config = HfQuantConfig(overrides={"down": {"bits": 8}})
    for name, bad, match in [
        ("n_samples", 0, "n_samples must be an int >= 1, got 0"),
        ("group_size", 100, r"group_size must be one of .*got 100"),
        ("rotation", "random", "rotation must be None, 'hadamard' or 'residual', got 'random'"),
        ("overrides", {"a": {"bitz": 8}}, r"overrides\['a'\] has unknown setting"),
        ("static_groups", False, "act_order=True needs static_groups"),  # rules between fields too
        ("format", "fp8", "bits=4 does not fit format='fp8'"),
    ]:
        before = config.to_dict()
        with pytest.raises(ValueError, match=match):
            setattr(config, name, bad)
        assert config.to_dict() == before, name  # a rejected assignment changes nothing
    config.overrides = {"up": {"bits": 2}}  # a valid assignment takes effect at once
    assert config.scheme_for("mlp.up").bits == 2 and config.scheme_for("mlp.down").bits == 4
    config.method = "gptq"
    assert config.needs_calibration and config.scheme_for("x").method == "gptq"
    copied = copy.deepcopy(config)  # copies (as transformers makes) validate too
    with pytest.raises(ValueError, match="seq_len"):
        copied.seq_len = 1
    config.not_a_field = 1  # other attributes are plain
    assert "not_a_field" not in config.to_dict()


def test_scheme_for_does_not_serialise(monkeypatch):
    config = HfQuantConfig(overrides={"down": {"bits": 8}, "o_proj": None}, method="gptq")

    def boom(*args, **kwargs):
        raise AssertionError("serialised")

    monkeypatch.setattr(json, "dumps", boom)
    monkeypatch.setattr(HfQuantConfig, "to_dict", boom)
    for i in range(1000):
        assert config.scheme_for(f"layers.{i}.mlp.down").bits == 8
        assert config.scheme_for(f"layers.{i}.mlp.up").bits == 4
    assert config.needs_calibration and config.quantizes_after_loading
    assert config.scheme_with({"bits": 2}).bits == 2


def test_config_code_names_no_format():
    # Formats' names and rules are formats.scheme's: config.py's code holds no format name except the default
    # value of `format` (documentation strings aside).
    tree = ast.parse(inspect.getsource(config_module))
    docs = {id(f.args[3]) for f in ast.walk(tree) if isinstance(f, ast.Call) and getattr(f.func, "id", "") == "Field"}
    constants = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                 and id(n) not in docs]
    assert [c for c in constants if c in format_names()] == ["int"]
