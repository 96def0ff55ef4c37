"""Fuzzing hf_quant's loader with mutated checkpoints (used by tests/test_fuzz_checkpoints.py; runnable alone:
`python tests/fuzz_checkpoints.py --cases 400 --seed 1` prints the counts).

Tiny checkpoints of every format are mutated (config.json's quantization_config values, the safetensors header's
dtypes, shapes, offsets and hf_quant metadata, single data bytes), and each mutant is loaded in a worker process
with a time limit. Outcomes:
    identical   loaded, logits bit-identical to the intact checkpoint's (the mutation did not matter)
    refused     a ValueError (hf_quant's CheckpointError or a config error) naming what is wrong
    garbage     loaded with no error, logits different (or NaN): the failure this exists to find
    crash       any other exception (from deep inside torch, re, json, safetensors ...)
    hang        no answer within the time limit
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import shutil
import struct
import traceback
from collections import Counter
from pathlib import Path

FORMATS = {
    "int4": dict(bits=4, group_size=32),
    "int3-sym-dq": dict(bits=3, symmetric=True, double_quant=True, group_size=32),
    "nf4": dict(format="nf4", group_size=32),
    "fp8-channel": dict(format="fp8", group_size=-1),
    "ternary": dict(format="ternary", planes=2, group_size=32),
    "vq": dict(format="vq", group_size=32),
    "int2-outliers-lowrank": dict(bits=2, group_size=32, outliers_per_row=2, lowrank_rank=4),
    "int4-hadamard": dict(bits=4, group_size=32, rotation="hadamard"),
}
IDS = [[1, 17, 33, 5, 99, 64, 2, 120]]

VALUES = [None, True, False, 0, -1, 1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 128, -2, 2**70, 1.5, -0.5, "", "int", "nf4",
          "fp4", "fp8", "vq", "ternary", "mse", "gptq", "hadamard", "residual", "(", r"^(.|\w|[a-z_.])*!", "q_proj",
          [], ["("], ["q_proj"], [r"^(a+)+$"], {}, {"a": 1}, [["x", {"bits": 9}]], [["q_proj", {"format": "fp4"}]],
          [["q_proj", None]], {"q_proj": {"bits": 3}}, "1", [1, 2], [r"^(.|\w|[a-z_.])*!"],
          {r"^(.|\w|[a-z_.])*!": None}, [[r"(\w+\.)*x", {"bits": 8}]], "f" * 64]
DTYPES = ["U8", "I8", "I16", "I32", "I64", "F16", "BF16", "F32", "F64", "BOOL", "F8_E4M3", "XX"]


def build(root: Path) -> dict[str, Path]:
    """The intact tiny checkpoints, one per format."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_quant import HfQuantConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(root / "float")
    out = {}
    for name, settings in FORMATS.items():
        model = AutoModelForCausalLM.from_pretrained(root / "float", quantization_config=HfQuantConfig(**settings))
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


# --- mutations ----------------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def mutate(folder: Path, rng: random.Random) -> str:
    """Apply one random mutation to the checkpoint in `folder`; returns its description."""
    kind = rng.choice(["config", "config", "header", "metadata", "data"])
    if kind == "config":
        path = folder / "config.json"
        config = json.loads(path.read_text())
        qc = config["quantization_config"]
        # (not quant_method: a config naming another quantization method is not routed to hf_quant at all)
        key = rng.choice(sorted(set(qc) - {"quant_method"}) + ["junk_field"])
        if rng.random() < 0.15 and key in qc:
            del qc[key]
            what = f"config: delete {key}"
        else:
            qc[key] = rng.choice(VALUES)
            what = f"config: {key}={qc[key]!r}"
        path.write_text(json.dumps(config))
        return what
    st = folder / "model.safetensors"
    header, data = _read_safetensors(st)
    names = sorted(k for k in header if k != "__metadata__")
    if kind == "data":
        blob = bytearray(data)
        i = rng.randrange(len(blob))
        blob[i] ^= 1 << rng.randrange(8)
        st.write_bytes(st.read_bytes()[: len(st.read_bytes()) - len(data)] + bytes(blob))
        return f"data: flip a bit of byte {i}"
    if kind == "header":
        name = rng.choice([n for n in names if "proj" in n])
        entry = header[name]
        field = rng.choice(["dtype", "shape", "offsets"])
        if field == "dtype":
            entry["dtype"] = rng.choice(DTYPES)
        elif field == "shape":
            shape = entry["shape"]
            op = rng.choice(["grow", "shrink", "drop", "add", "huge"])
            if op == "grow" and shape:
                shape[rng.randrange(len(shape))] += 1
            elif op == "shrink" and shape:
                shape[rng.randrange(len(shape))] -= 1
            elif op == "drop" and shape:
                shape.pop()
            elif op == "add":
                shape.append(1)
            else:
                shape[0] = 2**40
        else:
            a, b = entry["data_offsets"]
            entry["data_offsets"] = [a + rng.choice([-8, -1, 1, 8]), b]
        _write_safetensors(st, header, data)
        return f"header: {name} {field} -> {entry}"
    meta = header.setdefault("__metadata__", {})
    key = rng.choice(["hf_quant_modules", "hf_quant_config", "hf_quant_format_version"])
    if key == "hf_quant_modules" and key in meta and rng.random() < 0.8:
        records = json.loads(meta[key])
        module = rng.choice(sorted(records))
        record = records[module]
        field = rng.choice(["scheme", "shape", "kind", "sha256"])
        if field == "scheme":
            k = rng.choice(sorted(record["scheme"]) + ["bits"])
            record["scheme"][k] = rng.choice(VALUES)
        elif field == "shape":
            record["shape"] = rng.choice([[], [1], [2**40, 64], record["shape"][::-1], "x"])
        elif field == "kind":
            record["kind"] = rng.choice(["QuantExpertWeight", "Linear", 3])
        else:
            record["sha256"] = "0" * 64
        meta[key] = json.dumps(records)
        what = f"metadata: {module}.{field}"
    else:
        meta[key] = rng.choice(["", "{", "[]", "null", "2", json.dumps({"bits": 3}), json.dumps(rng.choice(VALUES))])
        what = f"metadata: {key}={meta[key]!r}"
    _write_safetensors(st, header, data)
    return what


# --- loading in a worker --------------------------------------------------------------------------------------------


def _load_logits(folder: str):
    import torch
    from transformers import AutoModelForCausalLM

    import hf_quant  # noqa: F401  (registers the quantizer)

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder)(torch.tensor(IDS)).logits


def _worker(requests, answers) -> None:
    import torch

    torch.set_num_threads(1)
    while True:
        folder = requests.get()
        if folder is None:
            return
        try:
            logits = _load_logits(folder)
            answers.put(("loaded", logits))
        except ValueError as e:  # hf_quant's CheckpointError and config errors are ValueErrors
            answers.put(("refused", f"{type(e).__name__}: {e}"))
        except BaseException as e:  # noqa: BLE001  (anything else is what this looks for)
            answers.put(("crash", "".join(traceback.format_exception_only(type(e), e)).strip()[-400:]))


class Loader:
    """A warm worker process; restarted after a hang."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.ctx = mp.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self.requests, self.answers = self.ctx.Queue(), self.ctx.Queue()
        self.proc = self.ctx.Process(target=_worker, args=(self.requests, self.answers), daemon=True)
        self.proc.start()

    def load(self, folder: Path, timeout: float | None = None):
        import queue

        self.requests.put(str(folder))
        try:
            return self.answers.get(timeout=timeout or self.timeout)
        except queue.Empty:
            self.proc.kill()
            self.proc.join()
            self._start()
            return ("hang", None)

    def close(self) -> None:
        self.requests.put(None)
        self.proc.join(timeout=10)


def fuzz(cases: int, seed: int, root: Path, timeout: float = 20.0, log=None) -> Counter:
    import torch

    intact = build(root / "intact")
    loader = Loader(timeout)
    counts: Counter = Counter()
    try:
        reference = {}
        for name, folder in intact.items():
            status, value = loader.load(folder, timeout=120)  # the first load imports torch and transformers
            assert status == "loaded", (name, status, value)
            reference[name] = value
        rng = random.Random(seed)
        for i in range(cases):
            name = rng.choice(sorted(intact))
            folder = root / "case"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(intact[name], folder)
            what = mutate(folder, rng)
            status, value = loader.load(folder)
            if status == "loaded":
                same = torch.equal(value, reference[name])
                status = "identical" if same else "garbage"
                value = None if same else f"max |logit diff| {float((value - reference[name]).abs().max())}"
            counts[status] += 1
            if log is not None and status not in ("identical", "refused"):
                log(f"{status}: {name}: {what}: {value}")
    finally:
        loader.close()
    counts["attempts"] = cases
    return counts


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(dict(fuzz(args.cases, args.seed, Path(tmp), log=print)))
