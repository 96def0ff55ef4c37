"""Runs inside the llama.cpp venv: llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs) on
an F32 GGUF, keeping the token embedding and output tensors in F32 so that only the linear layers differ from the
input.

    python llama_cpp_quantize.py IN.gguf OUT.gguf Q4_0|Q4_1|Q4_K_M THREADS
"""

from __future__ import annotations

import ctypes
import sys


def main() -> None:
    import llama_cpp

    src, dst, kind, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.token_embedding_type = llama_cpp.GGML_TYPE_F32
    params.output_tensor_type = llama_cpp.GGML_TYPE_F32
    status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if status != 0:
        sys.exit(f"llama_model_quantize returned {status}")


if __name__ == "__main__":
    main()
