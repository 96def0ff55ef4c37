#!/usr/bin/env bash
# The GPTQ-class calibration peers for benchmarks/calibration_peers.py (issue 18), each in its own venv (never
# .venv, never CI's): llm-compressor (the vLLM project's GPTQ) and AutoRound (Intel), both on torch 2.13.0 CPU, and
# GPTQModel (ModelCloud's GPTQ), on torch 2.14.1.
# PEER_VENVS (default /work/peer-venvs). GPTQModel is the exception: gptqmodel 7.7.0 (PyPI's newest here)
# declares `Requires-Dist: torch>=2.14.1` (its PKG-INFO), so its venv gets torch 2.14.1, whose only wheel on this
# machine's indexes is the CUDA build (+cu130, with its nvidia-* wheels: the venv is 6.0 GB; it runs on the CPU). The
# sdist is pure Python (its setup.py builds no extension, so no BUILD_CUDA_EXT-style switch is needed); it pulls
# transformers 5.25.0, accelerate 1.16.0, torchao 0.18.0, datasets 5.2.0, defuser 0.0.28, tokenicer 0.0.14.
# llmcompressor 0.14.0.1 pulls compressed-tensors 0.19.0, transformers 5.17.0 (and auto-round 0.15.1, unused);
# auto-round 0.16.1 pulls transformers 5.25.0. Both load the float32 safetensors folders of hf_quant.assets.
#   bash benchmarks/peers/setup_calibration_peers.sh [llmcompressor] [autoround] [gptqmodel]
set -euo pipefail
cd "$(dirname "$0")/../.."
PEER_VENVS=${PEER_VENVS:-/work/peer-venvs}
LLMCOMPRESSOR_VERSION=${LLMCOMPRESSOR_VERSION:-0.14.0.1}
AUTO_ROUND_VERSION=${AUTO_ROUND_VERSION:-0.16.1}
GPTQMODEL_VERSION=${GPTQMODEL_VERSION:-7.7.0}
TORCH_VERSION=2.13.0
GPTQMODEL_TORCH_VERSION=2.14.1  # gptqmodel 7.7.0 needs torch>=2.14.1 (pip's constraints here allow torch<=2.14.1)
mkdir -p "$PEER_VENVS"
which=("$@")
[ ${#which[@]} -eq 0 ] && which=(llmcompressor autoround)

make_venv() {  # make_venv DIR [TORCH]: a venv with the CPU build of torch first (a bare torch requirement pulls CUDA)
  local venv=$1 torch=${2:-$TORCH_VERSION}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # As scripts/setup.sh and benchmarks/engines/setup_vllm.sh: here pip's find-links holds torch 2.13.0+cpu, so the
  # plain pin resolves to the CPU wheel (download.pytorch.org is not reachable from this machine).
  "$venv/bin/python" -m pip install -q "torch==$torch"
}

for peer in "${which[@]}"; do
  case $peer in
    llmcompressor)
      venv=$PEER_VENVS/llmcompressor
      make_venv "$venv"
      "$venv/bin/python" -m pip install -q "llmcompressor==$LLMCOMPRESSOR_VERSION" "torch==$TORCH_VERSION"
      "$venv/bin/python" -c "import torch, llmcompressor, compressed_tensors, transformers; print('torch', torch.__version__, 'llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'transformers', transformers.__version__)"
      ;;
    autoround)
      venv=$PEER_VENVS/autoround
      make_venv "$venv"
      "$venv/bin/python" -m pip install -q "auto-round==$AUTO_ROUND_VERSION" "torch==$TORCH_VERSION"
      "$venv/bin/python" -c "import torch, auto_round, transformers; print('torch', torch.__version__, 'auto-round', auto_round.__version__, 'transformers', transformers.__version__)"
      ;;
    gptqmodel)
      venv=$PEER_VENVS/gptqmodel
      make_venv "$venv" "$GPTQMODEL_TORCH_VERSION"
      "$venv/bin/python" -m pip install -q "gptqmodel==$GPTQMODEL_VERSION" "torch==$GPTQMODEL_TORCH_VERSION"
      "$venv/bin/python" -c "import torch, gptqmodel, transformers; print('torch', torch.__version__, 'gptqmodel', gptqmodel.__version__, 'transformers', transformers.__version__)"
      ;;
    *) echo "unknown peer $peer (llmcompressor, autoround, gptqmodel)" >&2; exit 2 ;;
  esac
done
