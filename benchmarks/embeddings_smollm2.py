"""SmolLM2-135M with quantized embeddings: whole-model bits per weight (every stored byte of the model over every
logical weight, `model_storage(...).model_bits_per_weight`; the tied lm_head shares the embedding's table, so the
table counts once) and Botchan perplexity on the first --tokens tokens, against the linears-only baseline.

    OMP_NUM_THREADS=1 python benchmarks/embeddings_smollm2.py [--tokens 1024] [--json results.json] [--rows 0 1 ...]

Rows: the linears at int4 g128 (hf_quant's default scheme) with the embedding float (the default); the same with
the embedding (and its tied lm_head) at int8 g128, int4 g128, int4 g64, nf4 g64 double-quant; and, for comparison,
the pre-existing way to shrink the head (modules_to_not_convert=[]: lm_head quantized int4 and untied, the float
embedding kept beside it); then the embedding at int5 and int6 g128. --rows runs only the rows of these indices.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant.assets import botchan_text, smollm2_path
from hf_quant.eval import perplexity
from hf_quant.eval.storage import model_storage

EMBED = "embed_tokens"
ROWS = [
    ("float (no quantization)", None),
    ("linears int4 g128, embedding float (default)", {}),
    ("+ embedding int8 g128 (tied head shares it)", {"quantize_embeddings": True,
                                                     "overrides": {EMBED: {"bits": 8}}}),
    ("+ embedding int4 g128 (tied head shares it)", {"quantize_embeddings": True}),
    ("+ embedding int4 g64 (tied head shares it)", {"quantize_embeddings": True,
                                                    "overrides": {EMBED: {"group_size": 64}}}),
    ("+ embedding nf4 g64 dq (tied head shares it)", {"quantize_embeddings": True,
                                                      "overrides": {EMBED: {"format": "nf4", "group_size": 64,
                                                                            "double_quant": True}}}),
    ("lm_head int4 g128 untied, embedding float (before)", {"modules_to_not_convert": []}),
    ("+ embedding int5 g128 (tied head shares it)", {"quantize_embeddings": True,
                                                     "overrides": {EMBED: {"bits": 5}}}),
    ("+ embedding int6 g128 (tied head shares it)", {"quantize_embeddings": True,
                                                     "overrides": {EMBED: {"bits": 6}}}),
]


def measure(path, tok, text, tokens: int, kwargs: dict | None) -> dict:
    start = time.perf_counter()
    config = None if kwargs is None else hf_quant.HfQuantConfig(**kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)
    load_s = time.perf_counter() - start
    ppl = perplexity(model, tok, text, max_tokens=tokens)
    report = model_storage(model)
    linears = [m for m in report.modules if m.kind == "QuantLinear"]
    linear_bits = sum(m.stored_bits for m in linears) / max(sum(m.weights for m in linears), 1)
    embeds = [m for m in report.modules if m.kind == "QuantEmbedding"]
    return {
        "model_bits_per_weight": report.model_bits_per_weight,
        "linear_bits_per_weight": linear_bits if linears else None,
        "embedding_bits_per_weight": embeds[0].bits_per_weight if embeds else None,
        "total_mib": report.total_bytes / 2**20,
        "perplexity": ppl,
        "head": type(model.get_output_embeddings()).__name__,
        "load_s": load_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--rows", type=int, nargs="*", help=f"indices into the {len(ROWS)} rows (default: all)")
    args = ap.parse_args()
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    text = botchan_text()
    results = {}
    for i, (label, kwargs) in enumerate(ROWS):
        if args.rows is not None and i not in args.rows:
            continue
        r = measure(path, tok, text, args.tokens, kwargs)
        results[label] = r
        print(f"{label:52s} model {r['model_bits_per_weight']:6.2f} b/w  linears "
              f"{r['linear_bits_per_weight'] or 0:5.2f}  embedding {r['embedding_bits_per_weight'] or 0:5.2f}  "
              f"{r['total_mib']:7.1f} MiB  ppl {r['perplexity']:7.2f}  head {r['head']}  ({r['load_s']:.0f} s load)",
              flush=True)
    print("\n| configuration | whole-model bits/weight | linears bits/weight | embedding bits/weight | MiB | "
          "perplexity |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        lin = f"{r['linear_bits_per_weight']:.2f}" if r["linear_bits_per_weight"] else "-"
        emb = f"{r['embedding_bits_per_weight']:.2f}" if r["embedding_bits_per_weight"] else "float"
        print(f"| {label} | {r['model_bits_per_weight']:.2f} | {lin} | {emb} | {r['total_mib']:.1f} | "
              f"{r['perplexity']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
