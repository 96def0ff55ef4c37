"""Import cost of hf_quant over torch + transformers themselves, and of `hf-quant --help`.

    OMP_NUM_THREADS=2 python benchmarks/import_time.py [--runs 5]

Each measurement is a fresh interpreter (wall time of the whole process, median of --runs). "first" is the first
run of each command in this process tree (files possibly not yet in the OS page cache); the median is warm.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "torch + transformers": "import torch, transformers; from transformers import AutoModelForCausalLM; "
                            "import transformers.quantizers.auto",
    "import hf_quant": "import hf_quant",
    "hf-quant --help": "import sys; sys.argv = ['hf-quant', '--help']; from hf_quant.cli import main; main()",
}


def wall(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = {name: [wall(code) for _ in range(args.runs)] for name, code in COMMANDS.items()}
    base = statistics.median(rows["torch + transformers"])
    print(f"{'command':24s} {'first s':>8s} {'median s':>9s} {'over torch+transformers':>24s}")
    for name, times in rows.items():
        med = statistics.median(times)
        print(f"{name:24s} {times[0]:8.2f} {med:9.2f} {med - base:+23.2f}s")


if __name__ == "__main__":
    main()
