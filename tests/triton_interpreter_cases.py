"""Kernel cases of the Triton GPU kernels (hf_quant/kernels/triton), run on the CPU by triton's interpreter against
the plain-PyTorch reference: every format and bit width, odd shapes (in 96 with group 32, in 100 with a short last
group or one group per row), 1, 3 and 33 tokens, float32/float16/bfloat16, split-K, fused MoE, the ops' fake
implementations and a fullgraph torch.compile.

Not collected by the main pytest run (the name does not match test_*.py): TRITON_INTERPRET=1 must be set before
triton is first imported (torch imports it when installed), so tests/test_triton_kernels.py runs this file in a child
pytest with the variable set. By hand: TRITON_INTERPRET=1 python -m pytest tests/triton_interpreter_cases.py
On a machine with a CUDA GPU and without TRITON_INTERPRET, the same cases run the compiled kernels on the GPU:
python -m pytest tests/triton_interpreter_cases.py. Speed is not measured here (benchmarks/gpu_kernels.py).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from hf_quant.algorithms import quantize_weight
from hf_quant.formats import QuantScheme, dequantize
import hf_quant.kernels.triton as triton_kernels
from hf_quant.kernels.triton import (MOE_BLOCK_M, PLANES, TritonKernel, TritonTernaryKernel, TritonVqKernel, jit,
                                     op_args, prepare_weight)

# Fail loudly rather than test compiled GPU kernels that cannot run here.
assert jit.INTERPRETED or torch.cuda.is_available(), "set TRITON_INTERPRET=1 first (or run on a CUDA GPU)"
assert not jit.INTERPRETED or type(jit.qmm_kernel).__name__ == "InterpretedFunction"
DEVICE = torch.device("cpu" if jit.INTERPRETED else "cuda")

OUT = 48
# Relative error of the output against float64 x @ W_ref^T. 16-bit inputs multiply weights rounded to the input
# dtype (as the reference op does); measured ~1e-7 (fp32), ~3e-4 (fp16), ~6e-3 (bf16). A wrong code, scale or
# group index gives errors of order 0.1 and more.
BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def word_tile(enabled: bool):
    """Run the kernels reading each code word once (WORD_TILE) or once per code (see jit._plane)."""
    saved = jit.INTERPRETER_BLOCKS["WORD_TILE"]
    jit.INTERPRETER_BLOCKS["WORD_TILE"] = enabled
    jit.qmm.cache.clear()  # the autotuner remembers its pick per key
    try:
        yield
    finally:
        jit.INTERPRETER_BLOCKS["WORD_TILE"] = saved
        jit.qmm.cache.clear()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double().cpu(), ref.double().cpu()
    return ((y - ref).norm() / ref.norm()).item()


def on_device(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.to(DEVICE) for name, t in tensors.items()}


def scheme_id(s: QuantScheme) -> str:
    fmt = f"int{s.bits}{'-sym' if s.symmetric else ''}" if s.format == "int" else s.format
    fmt += f"{s.planes}" if s.format in ("vq", "ternary") else ""
    return f"{fmt}-g{s.group_size}{'-dq' if s.double_quant else ''}"


def quantized(scheme: QuantScheme, shape: tuple[int, ...], seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 1000 * scheme.bits + shape[-1])
    w = torch.randn(*shape, generator=gen)
    tensors = quantize_weight(w, scheme)
    return on_device(tensors), dequantize(scheme, tensors, shape[-1]).double()


# Every int width the kernel takes (and so every bit-plane split), symmetric and not, grouped and per channel,
# double-quantized scales; every codebook. in 96 = 3 groups of 32; in 100 = a short last group (or one 100-wide
# group per row), not a multiple of the 32-code words.
VARIANTS = ((False, 32, False), (True, -1, False), (False, -1, True), (True, 32, True))  # (symmetric, group, dq)
SCHEMES = [
    QuantScheme(bits=b, symmetric=sym, group_size=g, double_quant=dq, method="rtn")
    for b in sorted(PLANES)
    for sym, g, dq in (VARIANTS if b <= 4 else VARIANTS[::3])
] + [
    QuantScheme(format=f, bits=8 if f == "fp8" else 4, group_size=g, double_quant=dq, method="rtn")
    for f in ("nf4", "fp4", "fp8")
    for g, dq in ((32, False), (-1, True))
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
def test_linear_matches_reference(scheme):
    in_features = 100 if scheme.double_quant or scheme.group_size == -1 else 96
    shape = (OUT, in_features)
    tensors, w_ref = quantized(scheme, shape)
    gen = torch.Generator().manual_seed(in_features)
    # float32 for every token regime (GEMV, skinny dot, prefill tiles); 16-bit inputs on the dot paths
    # (dtype, tokens, WORD_TILE): float32 through every path both ways of reading the codes; 16-bit inputs on top
    runs = [(torch.float32, m, tile) for m in (1, 3, 33) for tile in (False, True)]
    runs += [(torch.float16, 3, False), (torch.bfloat16, 33, True)]
    if scheme.format == "int" and scheme.bits in (3, 4):
        runs += [(torch.float16, 1, True), (torch.bfloat16, 1, False), (torch.float16, 33, False),
                 (torch.bfloat16, 3, True)]
    states = {}
    for dtype, m, tile in runs:
        state = states.setdefault(dtype, TritonKernel.prepare(scheme, tensors, shape, dtype))
        x = torch.randn(m, in_features, generator=gen).to(dtype)
        with word_tile(tile):
            y = TritonKernel.linear(x.to(DEVICE), state)
        assert y.shape == (m, OUT) and y.dtype == dtype
        assert rel_err(y, x.double() @ w_ref.T) < BOUNDS[dtype], (dtype, m, tile)


# VQ (1 and 2 codebooks) and ternary (1 and 2 trit-planes): groups of 32 in 100 inputs (a short last group and,
# for VQ, a short last 8-vector), and one group per row.
OWN_LAYOUTS = [
    QuantScheme(format=f, bits=8 if f == "vq" else 2, planes=planes, group_size=g)
    for f in ("vq", "ternary") for planes, g in ((1, 32), (2, -1), (2, 32))
]


def kernel_of(scheme: QuantScheme):
    return {"vq": TritonVqKernel, "ternary": TritonTernaryKernel}.get(scheme.format, TritonKernel)


@pytest.mark.parametrize("scheme", OWN_LAYOUTS, ids=scheme_id)
def test_vq_and_ternary_match_reference(scheme):
    in_features = 100
    shape = (OUT, in_features)
    tensors, w_ref = quantized(scheme, shape)
    kernel = kernel_of(scheme)
    gen = torch.Generator().manual_seed(7)
    runs = [(torch.float32, m) for m in (1, 3, 33)] + [(torch.float16, 1), (torch.bfloat16, 17)]
    for dtype, m in runs:
        state = kernel.prepare(scheme, tensors, shape, dtype)
        x = torch.randn(m, in_features, generator=gen).to(dtype)
        y = kernel.linear(x.to(DEVICE), state)
        assert y.shape == (m, OUT) and y.dtype == dtype
        assert rel_err(y, x.double() @ w_ref.T) < BOUNDS[dtype], (dtype, m)


@pytest.mark.parametrize("scheme", [
    QuantScheme(bits=4, group_size=32, method="rtn"),
    QuantScheme(bits=3, symmetric=True, group_size=-1, double_quant=True, method="rtn"),
    QuantScheme(format="nf4", group_size=32, method="rtn"),
    *OWN_LAYOUTS[1:3],
], ids=scheme_id)
def test_prefill_decodes_once_then_multiplies(scheme, monkeypatch):
    """From DEQUANT_MIN_TOKENS tokens on, the weight is decoded by `dequant_kernel` and multiplied by torch: the
    same result within the dtype's bound (the threshold is lowered so that small shapes take that path)."""
    monkeypatch.setattr(triton_kernels, "DEQUANT_MIN_TOKENS", 4)
    monkeypatch.setattr(triton_kernels, "DEQUANT_MIN_TOKENS_VQ", 4)
    in_features = 100
    tensors, w_ref = quantized(scheme, (OUT, in_features))
    kernel = kernel_of(scheme)
    gen = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        state = kernel.prepare(scheme, tensors, (OUT, in_features), dtype)
        x = torch.randn(5, in_features, generator=gen).to(dtype)
        y = kernel.linear(x.to(DEVICE), state)
        assert y.dtype == dtype and rel_err(y, x.double() @ w_ref.T) < BOUNDS[dtype], dtype


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(bits=4, group_size=32, method="rtn"),
        QuantScheme(bits=3, symmetric=True, group_size=32, double_quant=True, method="rtn"),
        QuantScheme(format="fp8", bits=8, group_size=-1, method="rtn"),
    ],
    ids=scheme_id,
)
def test_split_k_matches_reference(scheme, split_k):
    """Reduction slices (32-aligned, so they cut groups and the 3-bit planes' words mid-way) summed after."""
    in_features = 100
    tensors, w_ref = quantized(scheme, (OUT, in_features))
    state = TritonKernel.prepare(scheme, tensors, (OUT, in_features), torch.float32)
    for m in (1, 16):
        x = torch.randn(m, in_features)
        with word_tile(split_k == 3):
            y = TritonKernel.linear(x.to(DEVICE), state, split_k=split_k)
        assert rel_err(y, x.double() @ w_ref.T) < 1e-5


def test_automatic_split_k_on_a_long_reduction():
    scheme = QuantScheme(bits=4, group_size=128, method="rtn")
    in_features = 2080  # 17 groups, the last one short; automatic split-K cuts it into 4 slices here
    tensors, w_ref = quantized(scheme, (40, in_features))
    state = TritonKernel.prepare(scheme, tensors, (40, in_features), torch.float32)
    x = torch.randn(1, in_features)
    assert rel_err(TritonKernel.linear(x.to(DEVICE), state), x.double() @ w_ref.T) < 1e-5


def test_bit_planes_hold_exactly_b_bits():
    """3-bit weights take 3 bits in the kernel layout (a 2-bit and a 1-bit plane), 5-bit 4 + 1, 6-bit 4 + 2."""
    for bits, widths in PLANES.items():
        scheme = QuantScheme(bits=bits, group_size=32, symmetric=True, method="rtn")
        state = prepare_weight(scheme, quantized(scheme, (OUT, 96))[0], 96)
        assert tuple(state["widths"]) == widths and sum(widths) == bits
        stored_bits = sum(p.numel() * 32 for p in state["planes"])
        assert stored_bits == OUT * 96 * bits


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(bits=4, group_size=32, method="rtn"),
        QuantScheme(bits=3, symmetric=True, group_size=32, double_quant=True, method="rtn"),  # dq blocks span experts
        QuantScheme(format="nf4", group_size=-1, method="rtn"),
    ],
    ids=scheme_id,
)
def test_fused_moe_matches_reference(scheme):
    experts, top_k, in_features = 5, 2, 100
    tensors, w_ref = quantized(scheme, (experts, OUT, in_features))
    state = TritonKernel.prepare(scheme, tensors, (OUT, in_features), torch.float32)
    gen = torch.Generator().manual_seed(3)
    # 1 token; 7 tokens (one expert gets none); 20 tokens (an expert gets more than one row block of MOE_BLOCK_M)
    for tokens in (1, 7, 20):
        ids = torch.stack([torch.randperm(experts - 1, generator=gen)[:top_k] for _ in range(tokens)])
        if tokens == 20:
            ids[:, 0] = 0
        counts = torch.bincount(ids.flatten(), minlength=experts)
        assert tokens < 20 or counts.max() > MOE_BLOCK_M
        x = torch.randn(tokens, in_features, generator=gen)
        with word_tile(tokens == 7):
            y = TritonKernel.moe_linear(x.to(DEVICE), ids.to(DEVICE), state)
        ref = torch.einsum("tk,tjnk->tjn", x.double(), w_ref[ids])
        assert y.shape == (tokens, top_k, OUT)
        assert rel_err(y, ref) < 1e-5, tokens


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on CUDA a bad id is a device-side assert (see _route)")
def test_moe_rejects_out_of_range_experts():
    scheme = QuantScheme(bits=4, group_size=32, method="rtn")
    state = TritonKernel.prepare(scheme, quantized(scheme, (3, OUT, 64))[0], (OUT, 64), torch.float32)
    with pytest.raises(ValueError, match="expert_ids"):
        TritonKernel.moe_linear(torch.randn(2, 64), torch.tensor([[0, 3], [1, 2]]), state)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementation and dispatch of both ops agree (torch.library.opcheck)."""
    scheme = QuantScheme(bits=3, group_size=32, method="rtn")
    state = TritonKernel.prepare(scheme, quantized(scheme, (2, 40, 64))[0], (40, 64), torch.float32)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.hf_quant.triton_moe_linear.default,
                          (torch.randn(3, 64, device=DEVICE), torch.tensor([[0, 1], [1, 0], [1, 1]], device=DEVICE),
                           *op_args(state)),
                          test_utils=tests)
    single = prepare_weight(scheme, quantized(scheme, (40, 64))[0], 64)
    torch.library.opcheck(torch.ops.hf_quant.triton_linear.default, (torch.randn(5, 64, device=DEVICE), *op_args(single)),
                          test_utils=tests)


def test_compiles_fullgraph():
    """torch.compile traces the Triton op as one opaque node (its fake implementation) with no graph break."""
    scheme = QuantScheme(format="fp4", group_size=32, method="rtn")
    tensors, w_ref = quantized(scheme, (OUT, 96))
    state = TritonKernel.prepare(scheme, tensors, (OUT, 96), torch.float32)

    def mlp(x):
        return torch.nn.functional.silu(TritonKernel.linear(x, state)) * 2

    x = torch.randn(5, 96)
    torch._dynamo.reset()
    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x.to(DEVICE)), mlp(x.to(DEVICE)))
    assert rel_err(compiled(x.to(DEVICE)), torch.nn.functional.silu(x.double() @ w_ref.T) * 2) < 1e-5


def quantized_mixtral_experts(scheme: QuantScheme):
    """A Mixtral experts block (4 experts, hidden 64, intermediate 48) with both projections quantized."""
    import transformers as tf

    from hf_quant.nn import QuantExpertWeight

    torch.manual_seed(0)
    config = tf.MixtralConfig(hidden_size=64, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    block = tf.models.mixtral.modeling_mixtral.MixtralExperts(config)
    for name in ("gate_up_proj", "down_proj"):
        value = torch.randn(getattr(block, name).shape) * 0.1
        weight = QuantExpertWeight(*value.shape, scheme, transposed=False)
        weight.load_packed(quantize_weight(value, scheme))
        del block._parameters[name]
        block.add_module(name, weight)
    return block


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(bits=4, group_size=32, method="rtn"), QuantScheme(format="nf4", group_size=-1, method="rtn")],
    ids=scheme_id,
)
def test_fused_experts_forward_matches_eager(scheme):
    """Two grouped launches (gate_up, then down over every routed row) give what transformers' eager experts loop
    computes from the dequantized experts."""
    from hf_quant.kernels.triton.experts import fused_experts

    block = quantized_mixtral_experts(scheme)
    gate_up, down = block.gate_up_proj, block.down_proj
    states = [TritonKernel.prepare(scheme, on_device(w.packed_tensors()), w.quantized_shape[-2:], torch.float32)
              for w in (gate_up, down)]
    gen = torch.Generator().manual_seed(5)
    for tokens in (1, 6):
        x = torch.randn(tokens, 64, generator=gen)
        ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(tokens)])
        weights = torch.softmax(torch.randn(tokens, 2, generator=gen), -1)
        with torch.no_grad():
            eager = block(x, ids, weights)
            fused = fused_experts(x.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE), *states, block._apply_gate)
        assert fused.shape == eager.shape == (tokens, 64)
        assert rel_err(fused, eager) < 1e-5, tokens


def test_experts_implementation_is_registered_and_refuses_the_cpu():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from hf_quant.integrations.moe import EXPERTS_IMPLEMENTATION, triton_experts_forward

    assert ALL_EXPERTS_FUNCTIONS[EXPERTS_IMPLEMENTATION] is triton_experts_forward
    block = quantized_mixtral_experts(QuantScheme(bits=4, group_size=32, method="rtn"))
    block.config._experts_implementation = EXPERTS_IMPLEMENTATION
    with pytest.raises(RuntimeError, match="needs the triton kernel"):  # on the CPU the registry picks a CPU kernel
        block(torch.randn(2, 64), torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5))
