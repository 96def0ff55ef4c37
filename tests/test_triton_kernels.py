"""The Triton GPU kernels (hf_quant/kernels/triton) without a GPU: their kernel cases run in triton's CPU interpreter in
a child pytest (tests/triton_interpreter_cases.py: TRITON_INTERPRET=1 has to be set before triton is first
imported, and torch imports it in this process already); here, registration, the package without triton, and
torch.compile of a quantized model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from hf_quant.formats import QuantScheme
from hf_quant.kernels import available_kernels, select_kernel
from hf_quant.kernels.triton import TritonKernel, triton_available

CASES = Path(__file__).with_name("triton_interpreter_cases.py")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernels_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", str(CASES)],
        capture_output=True, text=True, timeout=1200, env=env, cwd=CASES.parent.parent,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_registry_declares_cuda_only():
    scheme, shape = QuantScheme(bits=4, group_size=128), (64, 256)
    assert available_kernels()["triton"] is TritonKernel
    assert TritonKernel.unsupported_reason(scheme, shape, torch.device("cpu"), torch.float32) == "CUDA only"
    assert select_kernel(scheme, shape, torch.device("cpu"), torch.float32).name != "triton"
    reason = TritonKernel.unsupported_reason(scheme, shape, torch.device("cuda"), torch.int8)
    assert reason is not None and "dtype" in reason
    if not torch.cuda.is_available():
        assert "no CUDA device" in TritonKernel.unsupported_reason(scheme, shape, torch.device("cuda"), torch.float16)
    for other in (QuantScheme(format="ternary", bits=2, group_size=128), QuantScheme(format="vq", bits=8, group_size=128)):
        # formats with their own code layouts are never decoded as a codebook
        assert "not supported" in TritonKernel.unsupported_reason(other, shape, torch.device("cuda"), torch.float16)
    # the formats with layouts of their own have Triton kernels of their own, also CUDA only
    for name, fmt in (("triton_vq", "vq"), ("triton_ternary", "ternary")):
        own = available_kernels()[name]
        assert own.unsupported_reason(QuantScheme(format=fmt, bits=8 if fmt == "vq" else 2), shape,
                                      torch.device("cpu"), torch.float32) == "CUDA only"
        assert "not supported" in own.unsupported_reason(scheme, shape, torch.device("cuda"), torch.float16)
    # preferred over every other kernel wherever they are eligible
    gpu = {"triton", "triton_vq", "triton_ternary"}
    assert TritonKernel.priority > max(k.priority for n, k in available_kernels().items() if n not in gpu)
    with pytest.raises(ValueError, match="triton"):  # forcing it on the CPU is an error, not a fallback
        select_kernel(scheme, shape, torch.device("cpu"), torch.float32, prefer="triton")


def test_quantized_llama_compiles_fullgraph():
    """torch.compile(model, fullgraph=True) of a tiny quantized Llama (4-bit, NF4 and 8-bit layers) gives eager's
    logits. Backend aot_eager: inductor builds on this machine too but takes ~25 s for this model."""
    import transformers as tf

    from hf_quant import HfQuantConfig

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with tempfile.TemporaryDirectory() as folder:
        tf.LlamaForCausalLM(config).save_pretrained(folder)
        quant = HfQuantConfig(bits=4, group_size=32, method="rtn",
                              overrides={"down_proj": {"format": "nf4"}, "o_proj": {"bits": 8, "group_size": -1}})
        model = tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant).eval()
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        eager = model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
    assert rel_err(compiled, eager) < 1e-6


def test_package_works_without_triton():
    """With triton unimportable, hf_quant imports, quantizes and runs on the CPU, and the Triton kernel says why it
    is unavailable (a fresh interpreter: this one has triton loaded)."""
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` fail
import torch
from hf_quant import QuantLinear
from hf_quant.formats import QuantScheme
from hf_quant.kernels import available_kernels
layer = torch.nn.Linear(64, 16)
q = QuantLinear.from_float(layer, QuantScheme(bits=4, group_size=32))
x = torch.randn(3, 64)
err = ((q(x) - layer(x)).norm() / layer(x).norm()).item()
assert err < 0.2, err
reason = available_kernels()["triton"].unsupported_reason(q.scheme, (16, 64), torch.device("cuda"), torch.float16)
assert "pip install" in reason, reason
assert "triton" not in sys.modules or sys.modules["triton"] is None
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# (dtypes of x / y / scales, constexprs) of the three token regimes, both ways of reading codes, several formats
GPU_VARIANTS = [
    (("fp16", "fp16", "fp16"), dict(W0=4, W1=0, MODE=0, BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, WORD_TILE=True,
                                    TILE_IN_GROUP=True)),
    (("bf16", "fp32", "fp32"), dict(W0=2, W1=1, MODE=1, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, WORD_TILE=False,
                                    TILE_IN_GROUP=False)),
    (("fp16", "fp16", "fp16"), dict(W0=4, W1=0, MODE=2, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, WORD_TILE=True,
                                    TILE_IN_GROUP=True, MOE=True, TOP_K=2)),
    # VQ with two codebooks: uint8 index planes
    (("bf16", "bf16", "fp16", "u8"), dict(W0=8, W1=8, MODE=3, BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, WORD_TILE=False,
                                          TILE_IN_GROUP=True)),
    (("fp16", "fp16", "fp16", "u8"), dict(W0=8, W1=8, MODE=3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, WORD_TILE=False,
                                          TILE_IN_GROUP=False)),
]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the GPU kernel, not the interpreter's")
@pytest.mark.parametrize("dtypes,constants", GPU_VARIANTS)
def test_kernel_compiles_for_h100(dtypes, constants):
    """The interpreter does not run triton's GPU compiler: compile the kernel down to an sm_90 cubin (triton's bundled
    ptxas; no GPU needed), so code the compiler rejects, or that overflows shared memory, fails here."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_quant.kernels.triton import jit

    fn = jit.qmm_kernel
    x, y, param, *codes = dtypes
    pointer = {"x_ptr": x, "y_ptr": y, "s_ptr": param, "z_ptr": param, "table_ptr": "fp32",
               **({"p0_ptr": codes[0], "p1_ptr": codes[0]} if codes else {})}
    constants = {"SYM_ZERO": 8.0, "MOE": False, "TOP_K": 1, "F32_DOT": x == "fp32", **constants}
    def arg_type(name: str, constexpr: bool) -> str:
        return "constexpr" if constexpr else f"*{pointer.get(name, 'i32')}" if name.endswith("_ptr") else "i32"

    signature = {p.name: arg_type(p.name, p.is_constexpr) for p in fn.params}
    kernel = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4, "num_stages": 3})
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 227 * 1024  # H100's shared memory per block


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the GPU kernel, not the interpreter's")
@pytest.mark.parametrize("out_dtype,codes,constants", [
    ("fp16", "i32", dict(W0=2, W1=1, MODE=0, TILE_IN_GROUP=True)),
    ("bf16", "i32", dict(W0=4, W1=0, MODE=2, TILE_IN_GROUP=False)),
    ("fp16", "u8", dict(W0=8, W1=8, MODE=3, TILE_IN_GROUP=True)),
])
def test_dequant_kernel_compiles_for_h100(out_dtype, codes, constants):
    """The prefill path's decode kernel, compiled to an sm_90 cubin like the fused kernel above."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_quant.kernels.triton import DEQUANT_BLOCK_K, DEQUANT_BLOCK_N, jit

    fn = jit.dequant_kernel
    pointer = {"p0_ptr": codes, "p1_ptr": codes, "s_ptr": "fp16", "z_ptr": "fp16", "table_ptr": "fp32",
               "w_ptr": out_dtype}
    signature = {p.name: "constexpr" if p.is_constexpr else f"*{pointer[p.name]}" if p.name.endswith("_ptr") else "i32"
                 for p in fn.params}
    constants = {"SYM_ZERO": 1.0, "BLOCK_K": DEQUANT_BLOCK_K, "BLOCK_N": DEQUANT_BLOCK_N, **constants}
    kernel = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4, "num_stages": 1})
    assert kernel.asm["cubin"]
