"""The package's shape, checked: its import graph (every import, lazy ones too; scripts/import_graph.py prints it)
has no cycle and runs only from a higher layer to a lower one, and no module outside hf_quant/formats branches on a
format's name."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
sys.modules["import_graph"] = import_graph
spec.loader.exec_module(import_graph)

# Lowest first. A unit may import only units listed before it.
LAYERS = [
    "solvers",  # format-agnostic numerics (GPTQ's error feedback)
    "assets",  # test assets fetched from PyPI
    "version",
    "formats",  # Format objects: layout, coding, checks
    "config",  # HfQuantConfig: declared fields -> schemes
    "kernels",  # custom ops and their per-device implementations
    "cache",  # the quantized KV cache (transformers Cache subclass) over formats' packing
    "nn",  # packed modules
    "model",  # the model walker and the checkpoint files' checks
    "algorithms",  # model-level methods: GPTQ driving, AWQ, rotations, allocation, experts
    "pipeline",  # the calibration block loop and its processors
    "eval",  # perplexity, storage accounting, reports
    "export",  # checkpoints in other libraries' formats (compressed-tensors, GPTQ)
    "importers",  # other libraries' checkpoints (GPTQ, AWQ, compressed-tensors) as hf_quant modules
    "quantizer",  # the transformers HfQuantizer
    "integrations",  # transformers/PEFT/Hub/experts registration
    "cli",
    "optimum_cli",
    "optimum_register",
    "hf_quant",  # the package's __init__
]


@pytest.fixture(scope="module")
def graph():
    return import_graph.module_imports()


def test_every_unit_has_a_layer(graph):
    assert {import_graph.unit(m) for m in graph} == set(LAYERS)


def test_no_import_cycles(graph):
    assert import_graph.cycles(graph) == []
    assert import_graph.cycles(import_graph.unit_graph(graph)) == []


def test_imports_run_downwards_only(graph):
    rank = {u: i for i, u in enumerate(LAYERS)}
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if rank[import_graph.unit(b)] > rank[import_graph.unit(a)])
    assert upward == []


def _format_names() -> set[str]:
    from hf_quant.formats import format_names

    return set(format_names())


def _constants(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [c for e in node.elts for c in _constants(e)]
    return []


def test_no_module_outside_formats_branches_on_a_format_name():
    """Comparisons (==, !=, in) and dict keys naming a registered format are the format object's business."""
    names = _format_names()
    found = []
    for path in sorted((ROOT / "hf_quant").rglob("*.py")):
        if "formats" in path.relative_to(ROOT / "hf_quant").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                values = [c for operand in [node.left, *node.comparators] for c in _constants(operand)]
            elif isinstance(node, ast.Dict):
                values = [c for k in node.keys if k is not None for c in _constants(k)]
            else:
                continue
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {v!r}" for v in values if v in names]
    assert found == []


def test_import_does_not_load_optional_heavy_libraries():
    """`import hf_quant` registers with PEFT (~1.2 s to import) and transformers' experts registry (~0.8 s) when
    they are imported, not by importing them (benchmarks/import_time.py)."""
    import subprocess

    # (not triton: torch imports it itself when fake implementations are registered for custom ops)
    code = ("import sys, hf_quant; print([m for m in ('peft', 'matplotlib', 'datasets', 'gguf', "
            "'compressed_tensors', 'transformers.integrations.moe') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = ("import hf_quant; from peft import LoraConfig; "
            "print(sorted(k.__name__ for k in LoraConfig(target_modules=['q_proj'])._custom_modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['QuantEmbedding', 'QuantExpertWeight', 'QuantLinear', 'QuantTiedHead']"
    code = ("import hf_quant; from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS; "
            "print('hf_quant_triton' in ALL_EXPERTS_FUNCTIONS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
