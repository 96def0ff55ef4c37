"""What `hf_quant.export(..., requantize=True)` costs, and what quantizing for the target in the first place gives:
SmolLM2-135M Botchan perplexity of the exported weights, read back by the target's own path, beside hf_quant's
perplexity of the checkpoint it came from.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/export_requantize.py [--tokens 1024] [--threads 2]

compressed-tensors / GPTQ exports are read back with `hf_quant.load_foreign` (their codes, exactly); GGUF with
transformers' `gguf_file=` loader (gguf-py's decoding). Rows:
- "requantize": the default asymmetric mse quantization (fractional zero-points), re-fitted by `requantize=True`;
- "for the target": a recipe that exports exactly (symmetric, or rtn's integer zero-points), exported as is.
Results: benchmarks/results/export_requantize.json and a table on stdout (BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROWS = [
    # (name, hf_quant settings, target, requantize)
    ("int4 g64 mse (asym, fractional zero) -> compressed-tensors --requantize", dict(bits=4, group_size=64),
     "compressed-tensors", True),
    ("int4 g64 mse (asym, fractional zero) -> gptq --requantize", dict(bits=4, group_size=64), "gptq", True),
    ("int4 g64 rtn (integer zero) -> compressed-tensors", dict(bits=4, group_size=64, method="rtn"),
     "compressed-tensors", False),
    ("int4 g64 mse sym -> gptq", dict(bits=4, group_size=64, symmetric=True), "gptq", False),
    ("int4 g64 gptq sym -> gptq", dict(bits=4, group_size=64, symmetric=True, method="gptq"), "gptq", False),
    ("int4 g32 mse (asym) -> gguf Q4_1 --requantize", dict(bits=4, group_size=32), "gguf", True),
    ("int4 g32 mse sym -> gguf Q4_0", dict(bits=4, group_size=32, symmetric=True), "gguf", False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_quant
    from hf_quant.assets import botchan_text, smollm2_path
    from hf_quant.eval import perplexity

    torch.set_num_threads(args.threads)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    text = botchan_text()
    scratch = Path(tempfile.mkdtemp(prefix="export_requantize."))
    results = {"settings": vars(args), "rows": {}}
    float_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    results["float_perplexity"] = perplexity(float_model, tok, text, max_tokens=args.tokens)
    del float_model
    for i, (name, settings, target, requantize) in enumerate(ROWS):
        print(f"-- {name}", flush=True)
        src = scratch / f"src{i}"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     quantization_config=hf_quant.HfQuantConfig(lm_head="float", **settings))
        ours = perplexity(model, tok, text, max_tokens=args.tokens)
        model.save_pretrained(src)
        tok.save_pretrained(src)
        del model
        out = scratch / (f"out{i}.gguf" if target == "gguf" else f"out{i}")
        report = hf_quant.export(src, to=target, out=out, requantize=requantize)
        if target == "gguf":
            back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
        else:
            back = hf_quant.load_foreign(out, dtype=torch.float32)
        exported = perplexity(back, tok, text, max_tokens=args.tokens)
        errors = sorted(report.added_error.values())
        results["rows"][name] = {
            "settings": settings, "target": target, "requantize": requantize, "ppl_hf_quant": ours,
            "ppl_exported": exported, "ppl_change_percent": 100 * (exported / ours - 1),
            "added_error_mean": sum(errors) / len(errors) if errors else 0.0,
            "added_error_max": errors[-1] if errors else 0.0}
        del back

    out_path = REPO / "benchmarks" / "results" / "export_requantize.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nSmolLM2-135M, Botchan {args.tokens} tokens; float {results['float_perplexity']:.3f}")
    print("| hf_quant checkpoint -> export | ppl hf_quant | ppl exported (read back) | change | added weight error "
          "mean / max |")
    print("|---|---|---|---|---|")
    for name, r in results["rows"].items():
        print(f"| {name} | {r['ppl_hf_quant']:.3f} | {r['ppl_exported']:.3f} | {r['ppl_change_percent']:+.2f}% | "
              f"{r['added_error_mean']:.2e} / {r['added_error_max']:.2e} |")


if __name__ == "__main__":
    main()
