"""SmolLM2-135M perplexity on Botchan for hf_quant's data-free formats and methods, with true bits per weight
and quantization time. Every configuration uses the same text, token budget and windowing.

    python benchmarks/quality_smollm2.py [--tokens 1024]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant.assets import botchan_text, smollm2_path
from hf_quant.eval import perplexity
from hf_quant.eval.storage import model_storage

CONFIGS = [
    dict(bits=8, group_size=-1, symmetric=True),
    dict(bits=4, group_size=128, method="rtn"),
    dict(bits=4, group_size=128),
    dict(bits=4, group_size=128, double_quant=True),
    dict(bits=4, group_size=64, method="rtn"),
    dict(bits=4, group_size=64),
    dict(format="nf4", group_size=64, method="rtn"),
    dict(format="nf4", group_size=64),
    dict(format="fp4", group_size=64),
    dict(format="fp8", group_size=128),
    dict(bits=3, group_size=128, method="rtn"),
    dict(bits=3, group_size=128),
    dict(bits=3, group_size=64),
    dict(bits=2, group_size=64, method="rtn"),
    dict(bits=2, group_size=64),
]


def label(cfg: dict) -> str:
    fmt = cfg.get("format", "int")
    name = f"int{cfg['bits']}" if fmt == "int" else fmt
    name += " sym" if cfg.get("symmetric") else ""
    name += " per-channel" if cfg.get("group_size") == -1 else f" g{cfg.get('group_size', 128)}"
    name += f" {cfg.get('method', 'mse')}"
    name += " dq" if cfg.get("double_quant") else ""
    return name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    text = botchan_text()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base = perplexity(model, tok, text, max_tokens=args.tokens)
    del model
    print(f"Botchan perplexity, {args.tokens} tokens, window 512; float32 = {base:.3f}")
    print("| configuration | bits/weight (all stored) | perplexity | vs float32 | quantize time (s) |")
    print("|---|---|---|---|---|")
    print(f"| float32 | 32 | {base:.3f} | - | - |")
    for cfg in CONFIGS:
        start = time.perf_counter()
        q = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=hf_quant.HfQuantConfig(**cfg))
        seconds = time.perf_counter() - start
        ppl = perplexity(q, tok, text, max_tokens=args.tokens)
        bpw = model_storage(q).bits_per_weight
        print(f"| {label(cfg)} | {bpw:.3f} | {ppl:.3f} | {100 * (ppl / base - 1):+.1f}% | {seconds:.1f} |", flush=True)
        del q


if __name__ == "__main__":
    main()
