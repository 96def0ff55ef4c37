"""hf_quant's GGUF export served by llama.cpp (llama-cpp-python built from its sdist), beside llama.cpp's own
quantizer on the same float model: perplexity on Botchan, greedy tokens, prefill and decode tokens/s.

    bash benchmarks/engines/setup_llama_cpp.sh        # once: the engine venv (~20 min on 2 cores)
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/engines/bench_llama_cpp.py [--tokens 2048] [--threads 2]

For each hf_quant recipe: quantize SmolLM2-135M, export to GGUF, and measure
- hf_quant's own perplexity of the checkpoint (transformers + hf_quant kernels) on the same windows,
- llama.cpp's perplexity of the exported file (token ids passed directly: no tokenizer in between),
- greedy tokens of both from one prompt, and tokens/s of both.
llama.cpp's own quantization: the float model written as an F32 GGUF by the same exporter, then llama.cpp's quantizer
(`llama_model_quantize`, what `llama-quantize` runs) to Q4_0 / Q4_1 / Q4_K_M with the embedding kept in F32 like
ours (so the linears alone differ). SmolLM2's float
weights were themselves stored as Q4_1 g32 before we got them (hf_quant.assets): Q4_1 re-finds that grid nearly
losslessly, so its figure flatters; Q4_0 and Q4_K_M are the fair comparisons.
Results: benchmarks/results/llama_cpp_smollm2.json and a table on stdout (BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, add_arguments, compare, folder_bytes, hf_quant_side, run_engine, setup, table  # noqa: E402

ENGINES = Path(os.environ.get("ENGINES_DIR", REPO.parent / "engines"))
ENGINE_PYTHON = ENGINES / "llama-cpp" / "bin" / "python"
RUNNER = Path(__file__).with_name("llama_cpp_runner.py")
QUANTIZER = Path(__file__).with_name("llama_cpp_quantize.py")

# lm_head="float": the head stays tied to the F32 embedding as in llama.cpp's files below, so only the linears differ
RECIPES = {
    "hf_quant mse int4-sym g32 (Q4_0)": dict(bits=4, group_size=32, symmetric=True, lm_head="float"),
    "hf_quant gptq int4-sym g32 (Q4_0)": dict(method="gptq", bits=4, group_size=32, symmetric=True, lm_head="float"),
    "hf_quant mse int8-sym g32 (Q8_0)": dict(bits=8, group_size=32, symmetric=True, lm_head="float"),
}


def _q4_k_m_mix(n_layers: int = 30) -> dict:
    """llama.cpp's Q4_K_M choices for SmolLM2, as hf_quant GPTQ schemes under target="gguf": ffn_down Q6_K in the
    layers llama.cpp's `use_more_bits` picks, Q4_K elsewhere; attn_v Q8_0 / Q5_0 in the same pattern and every
    other linear Q5_0 (Q4_K/Q6_K need in_features a multiple of 256: at SmolLM2's 576, llama.cpp falls back to
    Q5_0 / Q8_0 exactly so)."""
    more = [i for i in range(n_layers) if i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2]
    layers = "|".join(map(str, more))
    return dict(method="gptq", target="gguf", bits=5, lm_head="float", overrides={
        rf"layers\.({layers})\.mlp\.down_proj": {"format": "kquant", "bits": 6},
        r"mlp\.down_proj": {"format": "kquant", "bits": 4},
        rf"layers\.({layers})\.self_attn\.v_proj": {"bits": 8},
    })


RECIPES["hf_quant gptq Q4_K_M mix (Q4_K/Q6_K down, Q5_0/Q8_0 rest)"] = _q4_k_m_mix()
LLAMA_TYPES = ("Q4_0", "Q4_1", "Q4_K_M")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--only", nargs="*", help="recipe names (substring match)")
    args = parser.parse_args()
    path, tok, ids, windows, prompt_ids, scratch = setup(args, ENGINE_PYTHON, "setup_llama_cpp.sh", "llama_cpp_bench.")

    import torch
    from transformers import AutoModelForCausalLM

    import hf_quant
    from hf_quant.export import ExportReport, export
    from hf_quant.export.gguf import GGUFTarget

    # llama.cpp's own quantizer, from an F32 GGUF of the float model written by the same exporter
    float_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    float_gguf = scratch / "float-f32.gguf"
    GGUFTarget().write(float_model, float_model.state_dict(), {}, ExportReport("gguf", str(float_gguf)), path,
                       float_gguf)
    rows = {"float (F32 GGUF)": (float_gguf, None, float_model)}
    for qtype in LLAMA_TYPES:
        out = scratch / f"llama-{qtype}.gguf"
        subprocess.run([str(ENGINE_PYTHON), str(QUANTIZER), str(float_gguf), str(out), qtype, str(args.threads)],
                       check=True)
        rows[f"llama.cpp quantizer {qtype}"] = (out, None, None)
    for name, settings in RECIPES.items():
        if args.only and not any(o in name for o in args.only):
            continue
        slug = "-".join(name.split()[1:4])
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     quantization_config=hf_quant.HfQuantConfig(**settings))
        model.save_pretrained(scratch / slug)
        tok.save_pretrained(scratch / slug)
        gguf_path = scratch / f"ours-{slug}.gguf"
        export(scratch / slug, to="gguf", out=gguf_path)
        rows[name] = (gguf_path, settings, model)

    results = {"settings": vars(args), "scored_tokens": len(ids), "rows": {}}
    for name, (gguf_path, settings, model) in rows.items():
        print(f"-- {name}", flush=True)
        spec = {"gguf": str(gguf_path), "windows": windows, "prompt": prompt_ids, "new_tokens": args.new_tokens,
                "threads": args.threads}
        row = {"bytes": folder_bytes(gguf_path), "config": settings,
               "engine": run_engine(ENGINE_PYTHON, RUNNER, spec, scratch, gguf_path.stem)}
        if model is not None:
            row["hf_quant"] = hf_quant_side(model, windows, prompt_ids, args.new_tokens)
        compare(row)
        results["rows"][name] = row

    out_path = REPO / "benchmarks" / "results" / "llama_cpp_smollm2.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nSmolLM2-135M, Botchan {len(ids)} tokens (windows of {args.window}), {args.threads} threads")
    print(table("llama.cpp", results["rows"], args.new_tokens))


if __name__ == "__main__":
    main()
