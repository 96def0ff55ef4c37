"""Every benchmark in one command: quality/size/quantization cost beside peers (with the Pareto plot), per-layer
kernels, end-to-end decode and prefill. Each part runs in its own process; results land in --out as JSON and
markdown tables (pasted into BENCHMARKS.md with this command line), the plot in benchmarks/plot/.

    python benchmarks/run_all.py [--quick] [--out benchmarks/results] [--skip quality kernels decode]

Full: under 30 minutes on a quiet 2-core machine; --quick: under 5.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = {
    "quality": "quality_smollm2.py",
    "kernels": "cpu_kernels.py",
    "decode": "cpu_decode.py",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--skip", nargs="*", default=[], choices=sorted(PARTS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = [f"cpu_count={os.cpu_count()} load average at start {os.getloadavg()[0]:.1f} "
               f"(2 cores: a load above 2 means other processes shared the machine)"]
    failed = []
    for part, script in PARTS.items():
        if part in args.skip:
            continue
        cmd = [sys.executable, str(HERE / script), "--out", str(out)] + (["--quick"] if args.quick else [])
        print(f"== {part}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(cmd).returncode
        minutes = (time.perf_counter() - start) / 60
        summary.append(f"{part}: {minutes:.1f} min, exit status {code}, load average now {os.getloadavg()[0]:.1f}")
        if code:
            failed.append(part)
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
