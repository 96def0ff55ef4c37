"""Issue 20, "the first hour of a new user": lossy merges warn, float merges save and load, the CLI reaches every
config field, other libraries' names get our equivalent, model cards, `hf-quant inspect` summaries."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers as tf
from torch import nn

import hf_quant
from hf_quant import HfQuantConfig, QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
LLAMA = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def float_llama(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama") / "float"
    tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)).save_pretrained(path)
    return path


def _lora_model(path, std=0.05):
    from peft import LoraConfig, get_peft_model

    base = tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=HfQuantConfig(bits=4, group_size=32))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * std
    return model


def _lossy(caught):
    from hf_quant.integrations.peft import LossyMergeWarning

    return [w for w in caught if issubclass(w.category, LossyMergeWarning)]


# --- item 1: a re-quantizing merge says what it lost --------------------------------------------------------------


def test_requantizing_merge_warns_once_with_measured_loss(float_llama):
    from hf_quant.integrations.peft import last_merge_report

    model = _lora_model(float_llama)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(ids).logits
        lora_logits = model(ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = model.merge_and_unload()
    lossy = _lossy(caught)
    assert len(lossy) == 1, [str(w.message) for w in caught]  # one warning for the whole merge, not one per layer
    text = str(lossy[0].message)
    report = last_merge_report(merged)
    assert report is not None and report.layers == 2 * len(TARGETS)
    assert 0 < report.moved_fraction <= 1 and 0 < report.relative_error
    assert f"{100 * report.moved_fraction:.1f}% of their" in text
    assert f"relative error of {100 * report.relative_error:.0f}%" in text
    assert "set_merge_target(model, 'float')" in text and "unmerged" in text
    # the measured loss is real: the merged model is not the LoRA model
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, lora_logits, atol=1e-4)
        assert not torch.equal(merged(ids).logits, base_logits)


def test_merge_adapter_and_single_layer_merge_warn(float_llama):
    model = _lora_model(float_llama)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    assert len(_lossy(caught)) == 1
    model.unmerge_adapter()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.merge()  # merged on its own, outside PEFT's merge loop: warns at once
    assert len(_lossy(caught)) == 1


def test_float_merge_does_not_warn(float_llama):
    from hf_quant.integrations.peft import set_merge_target

    model = _lora_model(float_llama)
    set_merge_target(model, "float")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_and_unload()
    assert _lossy(caught) == []


# --- item 2: a float-merged model saves what it is and loads back ------------------------------------------------


def test_float_merged_model_round_trip(float_llama, tmp_path, monkeypatch, capsys):
    from hf_quant.cli import main as cli_main
    from hf_quant.integrations.peft import set_merge_target

    monkeypatch.setenv("HF_QUANT_KERNEL", "reference")
    model = _lora_model(float_llama)
    set_merge_target(model, "float")
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        lora_logits = model(ids).logits
        merged = model.merge_and_unload()
        merged_logits = merged(ids).logits
    assert float((merged_logits - lora_logits).norm() / lora_logits.norm()) < 1e-5
    merged.save_pretrained(tmp_path / "merged")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    layers = reloaded.model.layers
    assert type(layers[0].self_attn.q_proj) is nn.Linear and type(layers[1].mlp.down_proj) is nn.Linear
    assert type(layers[0].self_attn.k_proj) is QuantLinear  # not an adapter target: still packed
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, merged_logits)
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]
    floats = [p for p, s in saved["overrides"] if s is None]
    assert r"^model\.layers\.0\.self_attn\.q_proj$" in floats and len(floats) == 2 * len(TARGETS)
    capsys.readouterr()
    assert cli_main(["inspect", str(tmp_path / "merged"), "--all"]) == 0
    printed = capsys.readouterr().out
    assert "layers.0.self_attn.k_proj" in printed and "layers.0.self_attn.q_proj " not in printed


def test_integrations_peft_importable_before_peft():
    """`from hf_quant.integrations.peft import set_merge_target` in a fresh interpreter (PEFT not imported yet) used
    to fail on a circular import through hf_quant's after-import hook."""
    import subprocess
    import sys

    code = ("from hf_quant.integrations.peft import set_merge_target; from peft import LoraConfig; "
            "print(sorted(k.__name__ for k in LoraConfig(target_modules=['q_proj'])._custom_modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert {"QuantExpertWeight", "QuantLinear"} <= set(eval(out))  # registered: the import did not fail half way


# --- item 6: other libraries' names get ours ----------------------------------------------------------------------


@pytest.mark.parametrize("name, value, ours", [
    ("desc_act", True, "hf_quant calls it act_order"),
    ("sym", True, "hf_quant calls it symmetric"),
    ("damp_percent", 0.01, "hf_quant calls it damp"),
    ("dataset", "c4", "hf_quant calls it calibration"),
    ("load_in_4bit", True, "format='fp4' or 'nf4'"),
    ("bnb_4bit_quant_type", "nf4", "hf_quant calls it format"),
    ("bnb_4bit_use_double_quant", True, "hf_quant calls it double_quant"),
    ("llm_int8_skip_modules", ["lm_head"], "hf_quant calls it modules_to_not_convert"),
])
def test_other_libraries_names_name_our_field(name, value, ours):
    with pytest.raises(ValueError) as e:
        HfQuantConfig(**{name: value})
    assert f"unknown field {name!r}" in str(e.value) and ours in str(e.value)
    # the same through a saved config (from_dict) and through `update`-free construction of every alias
    with pytest.raises(ValueError, match=f"unknown field '{name}'"):
        HfQuantConfig.from_dict({"quant_method": "hf_quant", "format_version": 1, name: value})


def test_every_foreign_name_is_unknown_and_points_to_a_field_or_says_none():
    from hf_quant.config import FIELDS, FOREIGN_NAMES

    for name, (_, ours) in FOREIGN_NAMES.items():
        assert name not in FIELDS
        assert ours.startswith("nothing") or any(f in ours for f in FIELDS), name


# --- item 5: every config field on the command line ---------------------------------------------------------------


def _parser_flags():
    from hf_quant.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return {name: {opt: action for action in p._actions for opt in action.option_strings}
            for name, p in sub.choices.items()}


def test_every_config_field_has_a_cli_flag():
    from hf_quant.config import DECLARATIONS

    flags = _parser_flags()
    for command in ("quantize", "eval"):
        for field in DECLARATIONS:
            if field.group == "version":
                continue
            flag = "--" + field.name.replace("_", "-")
            assert flag in flags[command], (command, flag)
            assert field.doc.split()[0] in flags[command][flag].help  # the declaration's own doc
        for alias in ("--override", "--skip", "--rotation", "--damp", "--act-order", "--no-act-order",
                      "--calibration", "--calibration-dataset", "--n-samples", "--seq-len"):
            assert alias in flags[command], alias


def test_method_help_lists_every_method():
    from hf_quant.formats.scheme import METHODS

    help_text = _parser_flags()["quantize"]["--method"].help
    assert "awq" in METHODS
    assert all(m in help_text.split("one of:")[1] for m in METHODS)


def test_cli_flags_build_the_config():
    from hf_quant.cli import _config_from_args, build_parser

    args = build_parser().parse_args([
        "quantize", "x", "--out", "y", "--method", "gptq", "--rotation", "hadamard", "--damp", "0.05",
        "--no-act-order", "--override", 'down_proj={"bits": 8}', "--override", "o_proj=none", "--skip", "lm_head",
        "--calibration-dataset", "wikitext", "--n-samples", "3", "--seq-len", "16", "--rotation-seed", "7",
        "--token-weighting", "attention", "--group-size", "-1", "--symmetric", "--target-bits", "3.5",
        "--allocation-candidates", '[{"bits": 2}, {"bits": 4}]',
    ])
    c = _config_from_args(args)
    assert (c.method, c.rotation, c.damp, c.act_order, c.n_samples, c.seq_len) == ("gptq", "hadamard", 0.05, False,
                                                                                   3, 16)
    assert c.overrides == {"down_proj": {"bits": 8}, "o_proj": None}
    assert c.modules_to_not_convert == ["lm_head"] and c.calibration_dataset == {"path": "wikitext"}
    assert (c.rotation_seed, c.token_weighting, c.group_size, c.symmetric, c.target_bits) == (7, "attention", -1,
                                                                                              True, 3.5)
    assert c.allocation_candidates == [{"bits": 2}, {"bits": 4}]
    # flags not given keep the config's defaults; --rotation none is None
    args = build_parser().parse_args(["quantize", "x", "--out", "y", "--rotation", "none"])
    assert _config_from_args(args) == HfQuantConfig()
    # --lm-head is the lm_head field's flag (its override is resolved when the model loads, after the user's)
    for value in ("float", "int8", "same"):
        args = build_parser().parse_args(["quantize", "x", "--out", "y", "--lm-head", value, "--override",
                                          '{"down_proj": {"bits": 8}}'])
        c = _config_from_args(args)
        assert c.lm_head == value and list(c.overrides) == ["down_proj"]
    assert _config_from_args(build_parser().parse_args(["quantize", "x", "--out", "y"])).lm_head == "int8"


def test_cli_bad_flag_values_are_one_line_errors(float_llama, tmp_path, capsys):
    from hf_quant.cli import main as cli_main

    assert cli_main(["quantize", str(float_llama), "--out", str(tmp_path / "q"), "--damp", "20"]) == 2
    assert "damp must be a number in (0, 10]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["quantize", str(float_llama), "--out", str(tmp_path / "q"), "--override", "down_proj={bits: 8}"])
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["/no/such/folder", "./no-such-model", "no/such/deep/folder", "bad id!"])
def test_cli_missing_model_path_says_so(tmp_path, capsys, path):
    from hf_quant.cli import main as cli_main

    assert cli_main(["quantize", path, "--out", str(tmp_path / "q"), "--eval-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert f"path {path!r} does not exist" in err and "not a valid Hugging Face Hub id" in err
    assert "Traceback" not in err


def test_cli_quantize_with_override_and_skip(float_llama, tmp_path, capsys):
    from hf_quant.cli import main as cli_main

    out = tmp_path / "q"
    assert cli_main(["quantize", str(float_llama), "--out", str(out), "--group-size", "32", "--override",
                     'down_proj={"bits": 8}', "--override", "o_proj=none", "--skip", "lm_head",
                     "--eval-tokens", "0"]) == 0
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.scheme.bits == 8 and layer.mlp.up_proj.scheme.bits == 4
    assert type(layer.self_attn.o_proj) is nn.Linear


# --- item 9: inspect sorts and summarises; one size figure everywhere; calibration figures; true parameter count ---


def test_natural_key_sorts_block_numbers():
    from hf_quant.eval.storage import natural_key

    names = ["model.layers.10.mlp", "model.layers.2.mlp", "model.layers.1.mlp", "lm_head"]
    assert sorted(names, key=natural_key) == ["lm_head", "model.layers.1.mlp", "model.layers.2.mlp",
                                              "model.layers.10.mlp"]


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    """12 blocks, 84 quantized modules: more than `hf-quant inspect` lists one by one."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("deep") / "float"
    tf.LlamaForCausalLM(tf.LlamaConfig(**{**LLAMA, "num_hidden_layers": 12})).save_pretrained(path)
    return path


def test_cli_sizes_agree_and_inspect_summarises(deep_llama, tmp_path, capsys):
    from hf_quant.cli import main as cli_main

    out, report_json, inspect_json, eval_json = (tmp_path / n for n in ("q", "r.json", "i.json", "e.json"))
    assert cli_main(["quantize", str(deep_llama), "--out", str(out), "--group-size", "32", "--override",
                     r'layers\.1[01]\.mlp\.down_proj={"bits": 8}', "--eval-tokens", "0", "--json",
                     str(report_json)]) == 0
    quantize_out = capsys.readouterr().out
    assert cli_main(["inspect", str(out), "--json", str(inspect_json)]) == 0
    inspect_out = capsys.readouterr().out
    assert cli_main(["eval", str(out), "--json", str(eval_json)]) == 0
    eval_out = capsys.readouterr().out
    report = json.loads(report_json.read_text())
    storage = json.loads(inspect_json.read_text())
    record = json.loads(eval_json.read_text())["storage"]
    assert report["bytes_after"] == storage["bytes_after"] == record["bytes_after"]
    assert report["bytes_before"] == storage["bytes_before"] == record["bytes_before"]
    size = [line.split("size", 1)[1].split("(every")[0].strip() for line in quantize_out.splitlines()
            if line.strip().startswith("size ")]
    assert size and all(size[0] in text for text in (inspect_out, eval_out))
    # inspect: one row per name pattern over 40 modules, block numbers in natural order; a summary per format
    rows = [line for line in inspect_out.splitlines() if line.startswith("model.")]
    assert "model.layers.{0-11}.self_attn.q_proj (x12)" in inspect_out
    assert "model.layers.{0-9}.mlp.down_proj (x10)" in inspect_out and "model.layers.{10-11}.mlp.down_proj (x2)" \
        in inspect_out
    assert len(rows) == 8 and "summary" in inspect_out and "int8 g32" in inspect_out
    assert " 82 modules" in inspect_out and "  2 modules" in inspect_out and "kept in float" in inspect_out
    assert cli_main(["inspect", str(out), "--all"]) == 0
    every = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("model.")]
    assert len(every) == 84
    blocks = [int(n.split(".")[2]) for n in every]
    assert blocks == sorted(blocks) and blocks.index(2) < blocks.index(10)


def test_cli_quantize_prints_calibration_time_and_peak_memory(tmp_path, capsys):
    from hf_quant.assets import smollm2_path
    from hf_quant.cli import main as cli_main

    tok = tf.AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(**{**LLAMA, "vocab_size": len(tok)})).save_pretrained(tmp_path / "float")
    tok.save_pretrained(tmp_path / "float")
    (tmp_path / "cal.txt").write_text("Calibration text about quantization and rounding errors. " * 100)
    assert cli_main(["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--method", "gptq",
                     "--calibration", str(tmp_path / "cal.txt"), "--n-samples", "2", "--seq-len", "32",
                     "--group-size", "32", "--eval-tokens", "0", "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["calibration"]["n_samples"] == 2 and report["calibration"]["seconds"] > 0
    assert "calibration " in printed and "on 2x32 tokens" in printed and "peak memory" in printed
    assert report["peak_rss_bytes"] > 0


def test_count_parameters_counts_packed_weights(float_llama):
    model = _lora_model(float_llama)
    total_float = sum(p.numel() for p in tf.AutoModelForCausalLM.from_pretrained(float_llama).parameters())
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    count = hf_quant.count_parameters(model)
    assert count.total == total_float + lora and count.trainable == lora
    assert count.quantized == sum(m.in_features * m.out_features for m in model.modules()
                                  if isinstance(m, QuantLinear))
    trainable, peft_total = model.get_nb_trainable_parameters()
    assert peft_total < count.total  # what PEFT's print_trainable_parameters shows
    assert f"all params: {count.total:,}" in str(count)


# --- item 7: model cards --------------------------------------------------------------------------------------------


def _front_matter(card: str) -> dict:
    import re

    import yaml

    return yaml.safe_load(re.match(r"---\n(.*?)\n---\n", card, re.DOTALL).group(1))


def test_model_card_install_dataset_rounding_and_float_modules(float_llama, tmp_path):
    from hf_quant.eval import QualityResult, make_record, model_storage
    from hf_quant.integrations.hub import render_model_card

    model = tf.AutoModelForCausalLM.from_pretrained(float_llama, quantization_config=HfQuantConfig(group_size=32))
    model.save_pretrained(tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    quality = [QualityResult("perplexity", "botchan", 256, 131.24681234567891, 133.97531234567891),
               QualityResult("perplexity", "wikitext", 256, 11.123456789, 12.987654321)]
    record = make_record("base", qc, model_storage(model), quality)
    card = render_model_card(tmp_path / "q", repo_id="me/tiny-int4", eval_record=record)
    assert 'pip install "hf-quant==' not in card and "not published on PyPI" in card and "source" in card
    meta = _front_matter(card)
    (result,) = meta["model-index"][0]["results"]  # only the Hub dataset; Botchan is named in the text instead
    assert result["dataset"]["type"] == "wikitext" and result["metrics"][0]["value"] == 12.99
    assert "botchan" not in json.dumps(meta).lower()
    assert "| perplexity | botchan | 256 | 131.25 | 133.98 |" in card and "1234" not in card
    assert "`test/botchan.txt`" in card and "sentencepiece" in card
    kept = next(line for line in card.splitlines() if line.startswith("Kept in float:"))
    # the head is quantized by default (lm_head="int8"): listed with its scheme's modules, not as kept in float
    assert kept.count("embed") == 1 and "`model.embed_tokens`" in kept and "lm_head" not in kept
    assert "`lm_head`" in card
    assert "Calibration data" not in card  # data-free


@pytest.mark.parametrize("settings, expected", [
    ({"calibration": ["some calibration text " * 50]}, "1 text(s) given in the config; 4 sequences of 32 tokens "
                                                       "(128 tokens)"),
    ({"calibration": "botchan"}, "Botchan (Natsume"),
    ({"calibration_dataset": {"path": "wikitext", "name": "wikitext-2-raw-v1"}},
     "the `datasets` dataset `wikitext` (config `wikitext-2-raw-v1`), split `train`"),
])
def test_model_card_states_calibration_data_and_tokens(settings, expected):
    from hf_quant.integrations.hub import _calibration_description

    qc = HfQuantConfig(method="gptq", n_samples=4, seq_len=32, **settings).to_dict()
    text = _calibration_description(qc)
    assert expected in text and "(128 tokens)" in text
    assert _calibration_description(HfQuantConfig().to_dict()) is None
