"""Refactoring guard: the packed SmolLM2 tensors of every format and quantizer are bit-identical to those recorded
in `codes_unchanged.json` (written by `python tests/test_codes_unchanged.py --record` at commit 160bff3, before
the Format objects, the model walker and the calibration block loop were introduced).

Data-free formats quantize three real blocks' linears (0, 15, 29); calibrated ones (GPTQ scalar, GPTVQ, ternary
GPTQ, GPTQ + outliers/low-rank, AWQ, RSQ) run the whole calibration pipeline on 2 x 64 tokens, quantizing blocks 0
and 1 (the others stay float). A digest is the SHA-256 of every stored tensor's name, dtype, shape and bytes.
A change that moves any code, scale or factor by one bit fails here; if such a change is intended, re-record and
say why in the commit. Calibrated digests depend on the CPU's float rounding in matmuls: other CPU kinds are listed
under "_calibrated_on_other_cpus", computed with the reference commit's code on that CPU.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

RECORD = Path(__file__).with_name("codes_unchanged.json")
BLOCKS = (0, 15, 29)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")

DATA_FREE = {
    "int4 g128 mse": {"bits": 4, "group_size": 128},
    "int4 g64 rtn": {"bits": 4, "group_size": 64, "method": "rtn"},
    "int3 g128 mse": {"bits": 3, "group_size": 128},
    "int2 g64 sym dq": {"bits": 2, "group_size": 64, "symmetric": True, "double_quant": True},
    "int8 channel": {"bits": 8, "group_size": -1, "symmetric": True},
    "nf4 g64 dq": {"format": "nf4", "group_size": 64, "double_quant": True},
    "fp4 g32": {"format": "fp4", "group_size": 32},
    "fp8 g128": {"format": "fp8", "group_size": 128},
    "ternary 2 planes g64": {"format": "ternary", "planes": 2, "group_size": 64},
    "vq 1 plane g128": {"format": "vq", "group_size": 128},
    "int3 g64 + outliers + lowrank": {"bits": 3, "group_size": 64, "outliers_per_row": 4, "lowrank_rank": 8},
}
# lm_head="float": the recorded digests are the blocks' (recorded before the default 8-bit head)
_CAL = {"n_samples": 2, "seq_len": 64, "overrides": {r"layers\.([2-9]|[1-9]\d)\.": None}, "lm_head": "float"}
CALIBRATED = {
    "gptq int3 g128": {"bits": 3, "group_size": 128, "method": "gptq"},
    "gptq int4 g128 hadamard": {"bits": 4, "group_size": 128, "method": "gptq", "rotation": "hadamard"},
    "gptq nf4 g64 dynamic groups": {"format": "nf4", "group_size": 64, "method": "gptq", "act_order": False,
                                    "static_groups": False},
    "gptvq": {"format": "vq", "group_size": 128, "method": "gptq"},
    "gptq ternary": {"format": "ternary", "planes": 2, "group_size": 64, "method": "gptq"},
    "gptq int2 + outliers + lowrank": {"bits": 2, "group_size": 64, "method": "gptq", "outliers_per_row": 2,
                                       "lowrank_rank": 4},
    "awq int4 g128": {"bits": 4, "group_size": 128, "method": "awq"},
    "rsq int3 g64": {"bits": 3, "group_size": 64, "method": "gptq", "token_weighting": "attention"},
}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_free_digest(weights: dict[str, torch.Tensor], settings: dict) -> str:
    from hf_quant import HfQuantConfig
    from hf_quant.algorithms import quantize_weight

    scheme = HfQuantConfig(**settings).default_scheme
    out = {}
    for name, w in weights.items():
        out.update({f"{name}.{k}": v for k, v in quantize_weight(w, scheme).items()})
    return digest(out)


def calibrated_digest(path, settings: dict) -> str:
    from transformers import AutoModelForCausalLM

    from hf_quant import HfQuantConfig, packed_modules

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=HfQuantConfig(**settings, **_CAL))
    out = {}
    for name, module in packed_modules(model).items():
        out.update({f"{name}.{k}": v for k, v in module.packed_tensors().items()})
    # Folded AWQ scales change the float norms: they are part of the result too.
    out.update({k: v for k, v in model.state_dict().items() if "layernorm" in k and (".0." in k or ".1." in k)})
    return digest(out)


def smollm2_weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from hf_quant.assets import smollm2_path

    state = load_file(str(Path(smollm2_path()) / "model.safetensors"))
    return {f"model.layers.{b}.{n}": state[f"model.layers.{b}.{n}.weight"] for b in BLOCKS for n in LINEARS}


def compute(names_df=None, names_cal=None) -> dict[str, str]:
    from hf_quant.assets import smollm2_path

    torch.set_num_threads(2)
    weights = smollm2_weights()
    out = {}
    for name in names_df if names_df is not None else DATA_FREE:
        out[name] = data_free_digest(weights, DATA_FREE[name])
    for name in names_cal if names_cal is not None else CALIBRATED:
        out[name] = calibrated_digest(smollm2_path(), CALIBRATED[name])
    return out


pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def recorded() -> dict[str, str]:
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def weights():
    torch.set_num_threads(2)
    return smollm2_weights()


@pytest.mark.parametrize("name", sorted(DATA_FREE))
def test_data_free_codes_unchanged(name, weights, recorded):
    assert data_free_digest(weights, DATA_FREE[name]) == recorded[name], name


@pytest.mark.parametrize("name", sorted(CALIBRATED))
def test_calibrated_codes_unchanged(name, recorded):
    from hf_quant.assets import smollm2_path

    torch.set_num_threads(2)
    # Calibration runs matmuls (Hessians, block forwards) whose float rounding depends on the CPU's vector units:
    # the same code gives other digests on other CPUs. Each CPU kind seen is recorded with the code of a commit
    # whose digests on the first machine were the reference; a code change still moves every one of them.
    accepted = {recorded[name]} | {digests[name] for digests in recorded["_calibrated_on_other_cpus"].values()}
    assert calibrated_digest(smollm2_path(), CALIBRATED[name]) in accepted, name


if __name__ == "__main__":
    if "--record" not in sys.argv:
        sys.exit("usage: python tests/test_codes_unchanged.py --record")
    others = json.loads(RECORD.read_text()).get("_calibrated_on_other_cpus", {}) if RECORD.exists() else {}
    RECORD.write_text(json.dumps({**compute(), "_calibrated_on_other_cpus": others}, indent=1, sort_keys=True) + "\n")
    print(RECORD.read_text())
