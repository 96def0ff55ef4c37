"""Fuzzing the loader (tests/fuzz_checkpoints.py): mutated config.json values, safetensors headers, hf_quant
metadata and data bytes of tiny checkpoints of every format. Every mutant must be refused with a ValueError of ours
or load bit-identical to the intact checkpoint: no silent garbage, no foreign crash, no hang (20 s a case)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fuzz_checkpoints import fuzz  # noqa: E402


def test_mutated_checkpoints_are_refused_or_load_identically(tmp_path):
    findings = []
    counts = fuzz(cases=300, seed=0, root=tmp_path, log=findings.append)
    print(dict(counts))
    assert counts["garbage"] == counts["crash"] == counts["hang"] == 0, findings[:10]
    assert counts["refused"] + counts["identical"] == counts["attempts"] == 300
    assert counts["refused"] > 200  # the mutations reach the checks (most mutants are invalid)
