"""End-to-end integration: loading by repo id from a Hub cache snapshot offline, loading a saved checkpoint in a
fresh interpreter that never imports hf_quant, and the `hf-quant` command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_quant import HfQuantConfig, QuantLinear
from hf_quant.cli import main as cli_main

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 3]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(float checkpoint dir, quantized checkpoint dir, quantized logits)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    root = tmp_path_factory.mktemp("integration")
    float_dir, quant_dir = root / "float", root / "quant"
    LlamaForCausalLM(cfg).save_pretrained(float_dir)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=HfQuantConfig(bits=4, group_size=32))
    model.save_pretrained(quant_dir)
    with torch.no_grad():
        logits = model(IDS).logits
    return float_dir, quant_dir, logits


def _hub_cache_snapshot(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay `folder` out as huggingface_hub's cache does after a download of `repo_id`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in folder.iterdir():
        shutil.copy(f, snapshot / f.name)


def test_load_by_repo_id_from_offline_hub_cache(saved, tmp_path):
    _, quant_dir, reference = saved
    cache = tmp_path / "hub"
    _hub_cache_snapshot(cache, "hf-quant-tests/tiny-llama-int4", quant_dir)
    code = f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained("hf-quant-tests/tiny-llama-int4")
print(type(m.model.layers[0].self_attn.q_proj).__name__)
torch.save(m(torch.tensor({IDS.tolist()})).logits, {str(tmp_path / "out.pt")!r})
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "QuantLinear"
    assert torch.equal(torch.load(tmp_path / "out.pt"), reference)


def test_fresh_interpreter_without_import_loads_packed(saved, tmp_path):
    """After `pip install`, the autoload hook makes transformers recognise hf_quant checkpoints; the model must
    never come back as a randomly initialised float model."""
    _, quant_dir, reference = saved
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(quant_dir)!r})
print(type(m.model.layers[0].mlp.down_proj).__name__)
torch.save(m(torch.tensor({IDS.tolist()})).logits, {str(tmp_path / "out.pt")!r})
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "QuantLinear"
    assert torch.equal(torch.load(tmp_path / "out.pt"), reference)


def test_cli_quantize_and_inspect(saved, tmp_path, capsys):
    float_dir, _, _ = saved
    out = tmp_path / "cli"
    report_path = tmp_path / "report.json"
    # --lm-head float: every quantized module is int3 g32 below (the default 8-bit head: test_lm_head.py)
    assert cli_main(["quantize", str(float_dir), "--bits", "3", "--group-size", "32", "--out", str(out),
                     "--lm-head", "float", "--eval-tokens", "0", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["quantized_modules"] == 14
    assert abs(report["bits_per_weight"] - (3 + 32 / 32)) < 1e-9  # 3-bit codes + fp16 scale and zero per 32
    assert report["quantized_checkpoint_bytes"] < report["float_checkpoint_bytes"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[1].mlp.up_proj, QuantLinear)
    assert model.model.layers[1].mlp.up_proj.scheme.bits == 3
    capsys.readouterr()
    inspect_json = tmp_path / "inspect.json"
    assert cli_main(["inspect", str(out), "--json", str(inspect_json)]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.up_proj" in printed and "int3 g32" in printed
    table = json.loads(inspect_json.read_text())
    assert len(table["modules"]) == 14
    assert abs(table["quantized_bits_per_weight"] - 4.0) < 1e-9  # the quantized layers
    assert table["bits_per_weight"] > 4.0  # the whole model: float embeddings, norms and lm_head count too


def test_cli_rejects_bad_settings(saved, tmp_path, capsys):
    float_dir, _, _ = saved
    code = cli_main(["quantize", str(float_dir), "--bits", "7", "--out", str(tmp_path / "x"), "--eval-tokens", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "bits must be" in err and "got 7" in err
    assert cli_main(["inspect", str(tmp_path)]) == 2
