"""Batch-1 decode and 512-token prefill speed on CPU: SmolLM2-135M float32 vs hf_quant formats.

Models are timed side by side in one process, interleaved over repetitions (the machine is noisy), and the
median is reported with its ratio to float32.

    python benchmarks/cpu_decode.py [--new-tokens 64] [--reps 5] [--threads N] [--markdown BENCHMARKS_SECTION.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant.assets import botchan_text, smollm2_path
from hf_quant.eval.storage import model_storage

CONFIGS = {
    "float32": None,
    "int4 g128 (cpu_int4pack)": dict(bits=4, group_size=128),
    "int4 g64 (cpu_int4pack)": dict(bits=4, group_size=64),
    "int3 g128 (cpu_int4pack)": dict(bits=3, group_size=128),
    "int8 per-channel (cpu_int8pack)": dict(bits=8, group_size=-1, symmetric=True),
    "nf4 g64 (reference dequant+matmul)": dict(format="nf4", group_size=64),
}


def decode_seconds(model, prompt_ids, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start


def prefill_seconds(model, ids) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids, use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="*", help="subset of configuration names")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    text = botchan_text()
    prompt = tok(text[:400], return_tensors="pt").input_ids[:, :32]
    prefill = tok(text, return_tensors="pt").input_ids[:, :512]
    models = {}
    for name, cfg in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        qc = None if cfg is None else hf_quant.HfQuantConfig(**cfg)
        models[name] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=qc).eval()
        models[name].generation_config.pad_token_id = tok.eos_token_id
        decode_seconds(models[name], prompt, 4)  # warm-up: kernel repacking, allocator
    dec = {n: [] for n in models}
    pre = {n: [] for n in models}
    for _ in range(args.reps):
        for name, model in models.items():
            dec[name].append(decode_seconds(model, prompt, args.new_tokens))
            pre[name].append(prefill_seconds(model, prefill))
    base_dec = statistics.median(dec["float32"]) if "float32" in dec else None
    base_pre = statistics.median(pre["float32"]) if "float32" in pre else None
    print(f"threads={torch.get_num_threads()} cpu_count={os.cpu_count()} torch={torch.__version__} "
          f"new_tokens={args.new_tokens} reps={args.reps}")
    print("| model | bits/weight (quantized layers) | decode tokens/s | vs float32 | prefill 512 tok (s) | vs float32 |")
    print("|---|---|---|---|---|---|")
    for name, model in models.items():
        d, p = statistics.median(dec[name]), statistics.median(pre[name])
        bpw = "32" if name == "float32" else f"{model_storage(model).bits_per_weight:.3f}"
        rd = f"{base_dec / d:.2f}x" if base_dec else "-"
        rp = f"{base_pre / p:.2f}x" if base_pre else "-"
        print(f"| {name} | {bpw} | {args.new_tokens / d:.1f} | {rd} | {p:.3f} | {rp} |")


if __name__ == "__main__":
    main()
