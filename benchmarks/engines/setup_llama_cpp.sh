#!/usr/bin/env bash
# llama.cpp for benchmarks/engines/bench_llama_cpp.py, in its own venv (never CI's): llama-cpp-python built from its
# sdist (CPU build). llama.cpp's own quantizer is reached through its C API (`llama_model_quantize`, what
# `llama-quantize` calls). About 40 min on 2 cores. ENGINES_DIR (default ../engines beside the repository).
set -euo pipefail
cd "$(dirname "$0")/../.."
ENGINES_DIR=${ENGINES_DIR:-$(cd .. && pwd)/engines}
VENV=$ENGINES_DIR/llama-cpp
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${JOBS:-2}
mkdir -p "$ENGINES_DIR"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q numpy "gguf>=0.10" safetensors
SDIST=$ENGINES_DIR/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
  "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$ENGINES_DIR"
fi
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  # CPU build; GGML_NATIVE uses this machine's instruction set (the figures are for this machine).
  CMAKE_BUILD_PARALLEL_LEVEL=$JOBS CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" \
    "$VENV/bin/python" -m pip install -q --no-binary :all: "$SDIST"
fi
echo "llama.cpp ready: $VENV/bin/python (llama_cpp; llama.cpp's quantizer through its C API)"
