"""SmolLM2-135M Botchan perplexity of GPTQ against the data-free methods (rtn, mse) at equal true bits per weight,
with quantization time and peak memory. Each configuration runs in its own subprocess, so its peak RSS is its own.

GPTQ calibrates on Botchan after its first 8192 tokens (hf_quant.pipeline.BOTCHAN_EVAL_TOKENS);
perplexity is measured on its first --tokens tokens, so calibration and evaluation text are disjoint.

    python benchmarks/calibration_smollm2.py [--tokens 1024] [--n-samples 16] [--seq-len 512] [--threads 1]
                                             [--only int3-g128 ...] [--methods gptq mse rtn]
                                             [--rotation hadamard|residual]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SETTINGS = {
    "int4-g128": dict(bits=4, group_size=128),
    "int4-g64": dict(bits=4, group_size=64),
    "int3-g128": dict(bits=3, group_size=128),
    "int2-g64": dict(bits=2, group_size=64),
    "nf4-g64": dict(format="nf4", group_size=64),
    # Below 3 bits (issue 8): residual VQ (GPTVQ with method gptq), ternary planes, 2-bit with double-quantized scales.
    "vq2-g128": dict(format="vq", planes=2, group_size=128),
    "vq1-g128": dict(format="vq", planes=1, group_size=128),
    "ternary1-g128": dict(format="ternary", planes=1, group_size=128),
    "ternary2-g128": dict(format="ternary", planes=2, group_size=128),
    "int2-g128-dq": dict(bits=2, group_size=128, double_quant=True),
    # What the extra bits of SpQR-style outliers and a low-rank correction buy at 3 bits, beside smaller groups.
    "int3-g64": dict(bits=3, group_size=64),
    "int3-g128-outliers4": dict(bits=3, group_size=128, outliers_per_row=4),
    "int3-g128-lowrank8": dict(bits=3, group_size=128, lowrank_rank=8),
}
METHODS = ("gptq", "mse", "rtn")
ALL_METHODS = METHODS + ("awq",)


def run_one(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_quant
    from hf_quant.assets import botchan_text, smollm2_path
    from hf_quant.eval import perplexity
    from hf_quant.eval.storage import model_storage

    torch.set_num_threads(spec["threads"])
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    config = hf_quant.HfQuantConfig(**{"lm_head": "float", **spec["config"]}) if spec["config"] is not None else None
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ppl = perplexity(model, tok, botchan_text(), max_tokens=spec["tokens"])
    bpw = model_storage(model).bits_per_weight if config is not None else 32.0
    return {"ppl": ppl, "bits_per_weight": bpw, "seconds": seconds, "peak_rss_mib": rss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(ALL_METHODS))
    ap.add_argument("--token-weighting", choices=["attention"], default=None,
                    help="GPTQ rows: RSQ-style token weighting (HfQuantConfig(token_weighting=...))")
    ap.add_argument("--rotation", choices=["hadamard", "residual"], default=None,
                    help="quantize every configuration after this rotation (HfQuantConfig(rotation=...))")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per run (1: on a shared machine, thread hand-offs cost more than they gain)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    def measure(config):
        spec = json.dumps({"config": config, "tokens": args.tokens, "threads": args.threads})
        out = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    base = measure(None)
    print(f"Botchan perplexity, first {args.tokens} tokens, window 512; GPTQ calibration: {args.n_samples} x "
          f"{args.seq_len} tokens of Botchan after token 8192. float32 = {base['ppl']:.3f}")
    print("| configuration | method | bits/weight (all stored) | perplexity | vs float32 | quantize time (s) "
          "| peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| float32 | - | 32 | {base['ppl']:.3f} | - | {base['seconds']:.1f} (load) | {base['peak_rss_mib']:.0f} |",
          flush=True)
    for name in args.only:
        for method in args.methods:
            config = {**SETTINGS[name], "method": method}
            if args.rotation:
                config["rotation"] = args.rotation
            if method in ("gptq", "awq"):
                config.update(n_samples=args.n_samples, seq_len=args.seq_len)
            if method == "gptq" and args.token_weighting:
                config["token_weighting"] = args.token_weighting
            r = measure(config)
            print(f"| {name}{' + ' + args.rotation if args.rotation else ''} | {method} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | "
                  f"{100 * (r['ppl'] / base['ppl'] - 1):+.1f}% | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
