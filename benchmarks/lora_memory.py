"""Peak CPU memory of LoRA training on SmolLM2-135M: 4-bit hf_quant base vs the float32 model.

    python benchmarks/lora_memory.py [--steps 3] [--batch 4] [--seq-len 128] [--rank 16] [--configs NAME ...]

Each configuration runs in its own fresh interpreter (same imports everywhere) and reports its peak resident set
size (ru_maxrss) over the whole run: load, then `--steps` AdamW steps of LoRA on all linear layers. The 4-bit base
is loaded from a pre-quantized checkpoint written beforehand by another process, so quantization itself is not
counted; the float32 model is loaded from its safetensors. Also printed: RSS after the imports (the interpreter,
torch, transformers and peft, the same for all) and after loading the model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "float32 + LoRA": ("float", False),
    "int4 g64 + LoRA": ("int4", False),
    "float32 + LoRA, gradient checkpointing": ("float", True),
    "int4 g64 + LoRA, gradient checkpointing": ("int4", True),
}


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def worker(args) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import hf_quant  # noqa: F401  (registers the quantizer and the LoRA layers)
    from hf_quant.assets import smollm2_path

    torch.manual_seed(0)
    after_imports = current_rss_mib()
    kind, checkpointing = CONFIGS[args.worker]
    path = args.int4_dir if kind == "int4" else smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    after_load = current_rss_mib()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for _ in range(args.steps):
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"after_imports": after_imports, "after_load": after_load, "peak": peak}))


def prepare(out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import hf_quant
    from hf_quant.assets import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32,
                                                 quantization_config=hf_quant.HfQuantConfig(bits=4, group_size=64, method="rtn", lm_head="float"))
    model.save_pretrained(out_dir)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--worker", choices=list(CONFIGS))
    ap.add_argument("--int4-dir")
    ap.add_argument("--prepare")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                    help="which rows to run (a float32 row must come before the int4 row it is compared with)")
    args = ap.parse_args()
    if args.prepare:
        return prepare(args.prepare)
    if args.worker:
        return worker(args)
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
              "--rank", str(args.rank)]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, __file__, "--prepare", tmp], check=True, capture_output=True)
        print(f"LoRA r={args.rank} on {', '.join(TARGETS)}; {args.steps} AdamW steps of batch {args.batch} x "
              f"{args.seq_len} tokens; RSS in MiB")
        print("| configuration | after imports | after load | peak (ru_maxrss) | peak - after imports | vs float32 |")
        print("|---|---|---|---|---|---|")
        float_used = {}
        for name in args.configs:
            kind, checkpointing = CONFIGS[name]
            run = subprocess.run([sys.executable, __file__, "--worker", name, "--int4-dir", tmp, *common],
                                 check=True, capture_output=True, text=True)
            r = json.loads(run.stdout.strip().splitlines()[-1])
            used = r["peak"] - r["after_imports"]
            if kind == "float":
                float_used[checkpointing] = used
            ratio = f"{used / float_used[checkpointing]:.2f}x" if checkpointing in float_used else "-"
            print(f"| {name} | {r['after_imports']:.0f} | {r['after_load']:.0f} | {r['peak']:.0f} | {used:.0f} | "
                  f"{ratio} |", flush=True)


if __name__ == "__main__":
    main()
