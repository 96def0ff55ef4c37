"""Batch-1 decode and 512-token prefill speed on CPU: a real causal LM (SmolLM2-135M by default; `--model`, from
`hf_quant.assets.real_causal_lms()`) in float32, hf_quant formats and other libraries' quantization
(benchmarks/peers.py).

All models are loaded in one process and timed interleaved over repetitions (the machine is noisy); the median is
reported with its ratio to float32 measured in the same run. A configuration that fails to build or run is
listed with its error.

    python benchmarks/cpu_decode.py [--model smollm2] [--quick] [--new-tokens 32] [--reps 3] [--threads N]
                                    [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `benchmarks.peers` when run as a script

import hf_quant  # noqa: E402
from benchmarks.peers import PEERS  # noqa: E402
from benchmarks.quality_smollm2 import HEADS  # noqa: E402
from hf_quant.assets import botchan_text, real_causal_lms  # noqa: E402
from hf_quant.eval.storage import model_storage  # noqa: E402

FLOAT = "float32"
LM_HEAD_INT8 = dict(modules_to_not_convert=[], overrides={"lm_head": {"bits": 8, "group_size": -1, "symmetric": True}})
OURS = {
    "int4 g128": dict(bits=4, group_size=128, method="rtn", lm_head="float"),
    "int4 g64": dict(bits=4, group_size=64, method="rtn", lm_head="float"),
    "int3 g128": dict(bits=3, group_size=128, method="rtn", lm_head="float"),
    "int8-sym ch": dict(bits=8, group_size=-1, symmetric=True, method="rtn", lm_head="float"),
    "nf4 g64": dict(format="nf4", group_size=64, method="rtn", lm_head="float"),
    "int4 g128 o4": dict(bits=4, group_size=128, outliers_per_row=4, method="rtn", lm_head="float"),  # + sparse term
    # lm_head (tied to the embedding, 49152x576: a fifth of the weights, read every token) quantized too
    "int4 g128 + lm_head int8": dict(bits=4, group_size=128, method="rtn", **LM_HEAD_INT8),
    "int4 g64 + lm_head int8": dict(bits=4, group_size=64, method="rtn", **LM_HEAD_INT8),
    **HEADS,  # the default recipe with the head float / int8 / sharing an int8 table with the embedding
}
PEER_NAMES = ["bnb int8", "bnb nf4 b64", "hqq int4 g64", "quanto qint8", "quanto qint4 g128", "torchao int8",
              "torchao intx4 g64"]
QUICK = [FLOAT, "int4 g128", "int4 g64 + lm_head int8", "int8-sym ch", "bnb nf4 b64", "hqq int4 g64", "torchao int8"]


def build(name: str, path):
    """(model, bits per weight of the quantized layers, kernel or library)."""
    if name == FLOAT:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), 32.0, "torch dense"
    if name in OURS:
        qc = hf_quant.HfQuantConfig(**OURS[name])
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=qc)
        layer = model.model.layers[0].mlp.down_proj
        return model, model_storage(model).bits_per_weight, f"hf_quant {layer.kernel_name(dtype=torch.float32)}"
    peer = PEERS[name]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    quantized = peer.apply(model)
    return model, model_storage(model, quantized).bits_per_weight, peer.library


def decode_seconds(model, prompt_ids, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def prefill_seconds(model, ids) -> float:
    start = time.perf_counter()
    with torch.no_grad():  # as generate does; optimum-quanto cannot run under inference_mode
        model(ids, use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="float32, two formats of ours, three peers; 16 tokens, 2 reps")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per repetition (default 32)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="*", help="configuration names (float32 is always included)")
    ap.add_argument("--model", default="smollm2", choices=list(real_causal_lms()), help="real causal LM")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for decode.json and decode.md")
    args = ap.parse_args()
    new_tokens = args.new_tokens or (16 if args.quick else 32)
    reps = args.reps or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    default = QUICK if args.quick else [FLOAT, *OURS, *PEER_NAMES]
    names = list(dict.fromkeys([FLOAT, *args.only])) if args.only else default
    unknown = [n for n in names if n != FLOAT and n not in OURS and n not in PEERS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {[FLOAT, *OURS, *PEERS]}")
    path = real_causal_lms()[args.model]()
    tok = AutoTokenizer.from_pretrained(path)
    text = botchan_text()
    prompt = tok(text[:400], return_tensors="pt").input_ids[:, :32]
    prefill = tok(text, return_tensors="pt").input_ids[:, :512]
    models, info, errors = {}, {}, {}
    for name in names:
        try:
            model, bpw, backend = build(name, path)
            model.eval().generation_config.pad_token_id = tok.eos_token_id
            decode_seconds(model, prompt, 4)  # warm-up: kernel repacking, allocator
            prefill_seconds(model, prefill)
            models[name], info[name] = model, (bpw, backend)
            print(f"{name}: built ({backend}, {bpw:.3f} bits/weight)", flush=True)
        except Exception as e:  # a peer that does not run on CPU is reported, not fatal
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"{name}: {errors[name]}", flush=True)
    dec = {n: [] for n in models}
    pre = {n: [] for n in models}
    for _ in range(reps):
        for name, model in models.items():
            dec[name].append(decode_seconds(model, prompt, new_tokens))
            pre[name].append(prefill_seconds(model, prefill))
    header = (f"model={args.model} threads={torch.get_num_threads()} cpu_count={os.cpu_count()} torch={torch.__version__} "
              f"new_tokens={new_tokens} reps={reps} load average {os.getloadavg()[0]:.1f}")
    rows = []
    base = (statistics.median(dec[FLOAT]), statistics.median(pre[FLOAT])) if FLOAT in models else None
    for name in names:
        if name in errors:
            rows.append({"name": name, "error": errors[name]})
            continue
        d, p = statistics.median(dec[name]), statistics.median(pre[name])
        rows.append({"name": name, "backend": info[name][1], "bpw": info[name][0], "decode_tok_s": new_tokens / d,
                     "decode_vs_float32": base[0] / d if base else None, "prefill_s": p,
                     "prefill_vs_float32": base[1] / p if base else None})
    lines = ["| model | kernel / library | bits/weight (quantized layers) | decode tokens/s | vs float32 | "
             "prefill 512 tok (s) | vs float32 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | - | - | - | - | - |")
        else:
            lines.append(f"| {r['name']} | {r['backend']} | {r['bpw']:.3f} | {r['decode_tok_s']:.1f} | "
                         f"{r['decode_vs_float32']:.2f}x | {r['prefill_s']:.3f} | {r['prefill_vs_float32']:.2f}x |")
    table = "\n".join(lines)
    print(header)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    (out / "decode.md").write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
