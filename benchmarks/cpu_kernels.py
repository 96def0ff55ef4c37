"""Per-layer CPU matmul time of hf_quant's kernels vs a dense float32 matmul, side by side, batch 1 and more.

    python benchmarks/cpu_kernels.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from hf_quant import QuantLinear, QuantScheme

SHAPES = [(1536, 576), (576, 1536), (4096, 4096)]  # (out, in): SmolLM2 MLP shapes and an LLM-sized layer
SCHEMES = {"int4 g64": QuantScheme(bits=4, group_size=64), "int8 per-channel": QuantScheme(bits=8, group_size=-1)}


def ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 256])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print("| out x in | tokens | float32 dense (ms) | " + " | ".join(f"{n} (ms)" for n in SCHEMES) + " |")
    print("|---|---|---|" + "---|" * len(SCHEMES))
    with torch.inference_mode():
        for out_f, in_f in SHAPES:
            dense = nn.Linear(in_f, out_f, bias=False)
            quantized = {n: QuantLinear.from_float(dense, s) for n, s in SCHEMES.items()}
            for m in args.tokens:
                x = torch.randn(m, in_f)
                reps = max(5, 2000 // (m * max(1, out_f * in_f // 1_000_000)))
                cols = [ms(lambda: dense(x), reps)] + [ms(lambda q=q: q(x), reps) for q in quantized.values()]
                kernels = ", ".join(q.kernel_name() for q in quantized.values())
                print(f"| {out_f}x{in_f} | {m} | " + " | ".join(f"{c:.3f}" for c in cols) + f" | <!-- {kernels} -->")


if __name__ == "__main__":
    main()
