"""Fused dequantize-matmul GPU kernels in Triton, for every format: affine int 2/3/4/5/6/8 bits (grouped or per
channel, symmetric or not, double-quantized scales), NF4 / FP4 codebooks and FP8 (E4M3), plus fused MoE experts
(`TritonKernel`); vector-quantized codes (`TritonVqKernel`) and ternary trit-planes (`TritonTernaryKernel`), whose
layouts differ, through the same kernel. Sparse outliers and low-rank terms add their products after any kernel
(formats/sparse.py, formats/lowrank.py).

From DEQUANT_MIN_TOKENS tokens on (prefill; VQ from DEQUANT_MIN_TOKENS_VQ), the weight is decoded once per call by
the same tile decoder and the product is cuBLAS's: tensor-core GEMM with the decode inside the K loop is slower there
(benchmarks/gpu_kernels.py).

Triton is optional (`pip install hf-quant[triton]`): this module imports without it, and the kernel declares itself
unsupported until triton imports and the device is CUDA. The Triton code (`jit.py`) is imported on first use, so
`TRITON_INTERPRET=1` set before that runs it on the CPU (how CI checks it against the reference).

Autotuning picks a block configuration per (token bucket, shape, format, dtype, GPU) on first use; triton keeps the
choice and the compiled kernels in its on-disk cache (TRITON_CACHE_DIR, default ~/.triton/cache). Nothing is
compiled at install time.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ...formats import ScalarFormat, decode_params
from ...formats.packing import unpack_bits
from ...formats.ternary import TernaryFormat, unpack_trits
from ...formats.vq import VectorFormat
from ..ops import implement
from ..registry import Kernel, register_kernel

# Bit planes a code width is split into: every plane width divides 32, so words hold whole codes and b-bit codes
# take exactly b bits in memory (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2).
PLANES = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MOE_BLOCK_M = 16  # rows per expert block in fused MoE (each expert's tokens are padded to a multiple of it)
# From this many tokens, decode the weight once and let cuBLAS multiply (measured on an H100: benchmarks/gpu_kernels.py;
# BENCHMARKS.md). VQ sooner: its tensor-core path gathers codebook entries per tile and took 0.13x fp16 cuBLAS time at
# 16 tokens, where decoding once took 0.34x at 128.
DEQUANT_MIN_TOKENS = 128
DEQUANT_MIN_TOKENS_VQ = 2


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _jit():
    from . import jit

    return jit


def _pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    """int32 codes [*lead, N, K] (K a multiple of 32) -> words [*lead, K * width // 32, N]; code k of a row sits in
    word k // (32 // width) at bit (k % (32 // width)) * width."""
    per_word = 32 // width
    *lead, n, k = codes.shape
    c = codes.view(*lead, n, k // per_word, per_word)
    word = torch.zeros(c.shape[:-1], dtype=torch.int32, device=codes.device)
    for i in range(per_word):  # int32 shifts wrap into the sign bit, which is what the kernel reads back
        word |= c[..., i] << (i * width)
    return word.transpose(-1, -2).contiguous()


def _bit_planes(codes: torch.Tensor, widths: tuple[int, ...], in_features: int) -> list[torch.Tensor]:
    """Codes [*lead, out, in] -> one packed word plane per width (low bits first), K padded to 32."""
    codes = codes.to(torch.int32)
    codes = torch.nn.functional.pad(codes, (0, -(-in_features // 32) * 32 - in_features))
    planes, low = [], 0
    for width in widths:
        planes.append(_pack_plane((codes >> low) & ((1 << width) - 1), width))
        low += width
    return planes


def _state(planes, widths, scale: torch.Tensor, group_size: int, in_features: int, mode: int, **extra) -> dict:
    """A prepared weight; `scale` [*lead, out, groups] (stored as [*lead, groups, out] for coalesced loads)."""
    return {"planes": planes, "widths": widths, "scale": scale.transpose(-1, -2).contiguous(), "zero": None,
            "table": None, "sym_zero": 0.0, "group_size": group_size, "in_features": in_features,
            "out_features": scale.shape[-2], "mode": mode, **extra}


def prepare_weight(scheme, tensors: dict[str, torch.Tensor], in_features: int) -> dict:
    """Canonical tensors of a [*lead, out, in] weight -> the Triton layout (see jit.py): bit-plane words [*lead,
    K_words, out], scales and zero-points [*lead, groups, out] (float16 as stored; float32 when double-quantized,
    whose decoded values need not fit float16)."""
    jit = _jit()
    fmt = scheme.codec
    if fmt.affine_int and scheme.bits not in PLANES:
        raise ValueError(f"{scheme.bits}-bit codes are not supported by the triton kernel "
                         f"(supported: {sorted(PLANES)})")
    bits = scheme.bits
    widths = PLANES[bits] if fmt.affine_int else (bits,)
    g, _, _ = scheme.group_layout(in_features)
    planes = _bit_planes(unpack_bits(tensors["qweight"], bits, in_features), widths, in_features)
    scale, zero = decode_params(scheme, tensors)
    param_dtype = torch.float32 if scheme.double_quant else torch.float16
    state = _state(planes, widths, scale.to(param_dtype), g, in_features, jit.AFFINE)
    if fmt.codebook:
        state["mode"] = jit.CODEBOOK
        state["table"] = fmt.table(device=scale.device)
    elif scheme.symmetric:
        state["mode"] = jit.AFFINE_SYMMETRIC
        state["sym_zero"] = float(1 << (bits - 1))
    else:
        state["zero"] = zero.transpose(-1, -2).to(param_dtype).contiguous()
    return state


def prepare_vq(scheme, tensors: dict[str, torch.Tensor], in_features: int) -> dict:
    """VQ codes [out, stages, in / 8] -> one uint8 index plane [in / 8, out] per stage; the codebooks (float32,
    [stages * 256 * 8]) as the value table; scales [groups, out] float16."""
    g, _, _ = scheme.group_layout(in_features)
    codes = tensors["qweight"]
    planes = [codes[:, p].t().contiguous() for p in range(codes.shape[1])]
    return _state(planes, (8,) * len(planes), tensors["scales"], g, in_features, _jit().VQ,
                  table=tensors["codebook"].float().reshape(-1).contiguous())


def prepare_ternary(scheme, tensors: dict[str, torch.Tensor], in_features: int) -> list[dict]:
    """Trit-planes -> one state per plane: the trits t as 2-bit codes t + 1, decoded as symmetric int with zero
    point 1 and the plane's scales (so each plane runs as a 2-bit weight; 2 bits in memory against 1.6 on disk)."""
    g, _, _ = scheme.group_layout(in_features)
    trits = unpack_trits(tensors["qweight"], in_features)  # [out, planes, in]
    states = []
    for p in range(trits.shape[1]):
        planes = _bit_planes(trits[:, p] + 1, (2,), in_features)
        states.append(_state(planes, (2,), tensors["scales"][:, p], g, in_features, _jit().AFFINE_SYMMETRIC,
                             sym_zero=1.0))
    return states


def _token_bucket(m: int) -> int:
    """Autotuning bucket of a token count: 1, 16 (2-16 tokens) or the next power of two up to 1024."""
    if m <= 1:
        return 1
    if m <= 16:
        return 16
    return min(1024, 1 << (m - 1).bit_length())


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _auto_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Split the reduction for few tokens when the output columns alone give too few programs to fill the GPU."""
    if m > 16 or k < 1024:
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    programs = -(-n // 128)
    return max(1, min(2 * sms // programs, k // 512, 16))


def _launch(x, planes, widths, scale, zero, table, mode, sym_zero, group_size, out_features, split_k,
            rows=None, experts=None, m_entries=None, top_k=1):
    jit = _jit()
    m, k = x.shape[0] if rows is None else m_entries, x.shape[1]
    n = out_features
    p0 = planes[0]
    p1 = planes[1] if len(planes) > 1 else p0
    dummy = scale  # pointer arguments the selected MODE never reads
    moe = rows is not None
    if not moe and m >= (DEQUANT_MIN_TOKENS_VQ if mode == jit.VQ else DEQUANT_MIN_TOKENS):
        w = _dequantize(x.dtype, planes, widths, scale, zero, table, mode, sym_zero, group_size, k, n)
        return x @ w
    if moe:
        split_k = 1
    elif split_k <= 0:
        split_k = _auto_split_k(m, n, k, x.device)
    # Slices start on a word boundary of every plane (32), and on a multiple of the largest BLOCK_K where they are
    # long enough, so tiles do not straddle groups (TILE_IN_GROUP in jit.py).
    align = 256 if k // split_k >= 256 else 32
    k_chunk = triton_cdiv(triton_cdiv(k, split_k), align) * align
    split_k = -(-k // k_chunk)
    if split_k == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)

    def grid(meta):
        m_blocks = rows.shape[0] // MOE_BLOCK_M if moe else triton_cdiv(m, meta["BLOCK_M"])
        return (m_blocks, triton_cdiv(n, meta["BLOCK_N"]), split_k)

    lead = (lambda t: t.stride(0)) if moe else (lambda t: 0)
    jit.qmm[grid](
        x, p0, p1, scale, dummy if zero is None else zero, dummy if table is None else table, y,
        x if rows is None else rows, x if experts is None else experts,
        m, n, k, group_size, k_chunk, x.stride(0), m * n,
        lead(p0), lead(p1), lead(scale), _token_bucket(m),
        W0=widths[0], W1=widths[1] if len(widths) > 1 else 0, MODE=mode, SYM_ZERO=sym_zero,
        MOE=moe, TOP_K=top_k, F32_DOT=jit.f32_dot(x.dtype),
        **({"BLOCK_M": MOE_BLOCK_M} if moe else {}),
    )
    return y if split_k == 1 else y.sum(0).to(x.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


DEQUANT_BLOCK_K, DEQUANT_BLOCK_N = 64, 128


def _dequantize(dtype, planes, widths, scale, zero, table, mode, sym_zero, group_size, k, n) -> torch.Tensor:
    """The weight decoded as [K, N] in `dtype` (W^T, so that x @ it is the product)."""
    jit = _jit()
    w = torch.empty(k, n, dtype=dtype, device=scale.device)
    block_k, block_n = (32, 32) if jit.INTERPRETED else (DEQUANT_BLOCK_K, DEQUANT_BLOCK_N)
    p0 = planes[0]
    grid = (triton_cdiv(k, block_k), triton_cdiv(n, block_n))
    jit.dequant_kernel[grid](
        p0, planes[1] if len(planes) > 1 else p0, scale, scale if zero is None else zero,
        scale if table is None else table, w, n, k, group_size,
        W0=widths[0], W1=widths[1] if len(widths) > 1 else 0, MODE=mode, SYM_ZERO=sym_zero,
        BLOCK_K=block_k, BLOCK_N=block_n, TILE_IN_GROUP=group_size % block_k == 0,
    )
    return w


def _linear(x, planes, widths, scale, zero, table, mode: int, sym_zero: float, group_size: int, out_features: int,
            split_k: int = 0):
    """x [M, K] @ W^T with W decoded on the fly from the Triton layout (`prepare_weight`); split_k 0 = automatic."""
    return _launch(x.contiguous(), planes, widths, scale, zero, table, mode, sym_zero, group_size, out_features,
                   split_k)


def _route(expert_ids: torch.Tensor, n_experts: int):
    """Sort (token, slot) entries by expert, each expert's run padded to MOE_BLOCK_M rows (padding = `entries`).
    Sizes are the worst case so nothing waits for the GPU: blocks past the used ones hold only padding, and the
    kernel skips them. Returns (rows, expert of each row block)."""
    flat = expert_ids.reshape(-1).long()
    entries = flat.numel()
    if flat.device.type != "cuda" and entries and (int(flat.min()) < 0 or int(flat.max()) >= n_experts):
        # (on CUDA an out-of-range id fails the indexing below with a device-side assert instead of syncing here)
        raise ValueError(f"expert_ids must lie in [0, {n_experts}), got [{int(flat.min())}, {int(flat.max())}]")
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + MOE_BLOCK_M - 1) // MOE_BLOCK_M
    first_block = torch.cumsum(blocks, 0) - blocks
    first_entry = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    rank = torch.arange(entries, device=flat.device) - first_entry[expert]
    max_blocks = triton_cdiv(entries, MOE_BLOCK_M) + n_experts
    rows = torch.full((max_blocks * MOE_BLOCK_M,), entries, dtype=torch.int32, device=flat.device)
    rows[first_block[expert] * MOE_BLOCK_M + rank] = order.to(torch.int32)
    block_ids = torch.arange(max_blocks, device=flat.device)
    block_expert = torch.searchsorted(torch.cumsum(blocks, 0), block_ids, right=True).clamp_(max=n_experts - 1)
    return rows, block_expert.to(torch.int32)


def _moe_linear(x, expert_ids, planes, widths, scale, zero, table, mode: int, sym_zero: float, group_size: int,
                out_features: int):
    """Fused MoE experts: x [T, K], expert_ids [T, top_k] -> y [T, top_k, out] with y[t, j] = x[t] @ W[e]^T for
    e = expert_ids[t, j], grouped over experts in one launch (each expert's weights read once per row block)."""
    tokens, top_k = expert_ids.shape
    rows, block_expert = _route(expert_ids, planes[0].shape[0])
    y = _launch(x.contiguous(), planes, widths, scale, zero, table, mode, sym_zero, group_size, out_features, 1,
                rows=rows, experts=block_expert, m_entries=tokens * top_k, top_k=top_k)
    return y.view(tokens, top_k, out_features)


# CPU runs them in the Triton interpreter (TRITON_INTERPRET=1; tests).
triton_linear = implement("triton_linear", "CUDA", "CPU")(_linear)
triton_moe_linear = implement("triton_moe_linear", "CUDA", "CPU")(_moe_linear)


def op_args(state: dict) -> tuple:
    """The weight arguments of both ops from a prepared state."""
    return (state["planes"], list(state["widths"]), state["scale"], state["zero"], state["table"], state["mode"],
            state["sym_zero"], state["group_size"], state["out_features"])


def gpu_reason(scheme, layout: type, device, dtype) -> str | None:
    """Why a Triton kernel reading the codes of the `layout` Format class cannot run `scheme` on `device` in `dtype`
    (None: it can)."""
    if not triton_available():
        return "triton is not installed (pip install 'hf-quant[triton]')"
    if not isinstance(scheme.codec, layout):
        return f"format {scheme.format!r} not supported (only {layout.__name__} formats)"
    device = torch.device(device)
    if device.type != "cuda":
        return "CUDA only"
    if dtype not in _FLOAT_DTYPES:
        return f"dtype {dtype} not supported"
    if not torch.cuda.is_available():
        return "no CUDA device available"
    # tensor-core dot of 16-bit inputs needs Volta (float16) / Ampere (bfloat16) or newer
    needed = (8, 0) if dtype == torch.bfloat16 else (7, 0)
    if torch.cuda.get_device_capability(device) < needed:
        return f"{dtype} needs compute capability >= {needed[0]}.{needed[1]}"
    return None


@register_kernel
class TritonKernel(Kernel):
    """Fused dequantize + matmul on CUDA GPUs in Triton (GEMV for one token, split-K skinny GEMM up to 16, tiled
    tensor-core GEMM for prefill), for every format and bit width except 1 and 7 bits (not offered by QuantScheme).
    Float32 inputs are multiplied in float32 (IEEE, not TF32); 16-bit inputs multiply 16-bit weights with float32
    accumulation, as the reference does after rounding the weight to the input dtype."""

    name = "triton"
    priority = 200

    @classmethod
    def unsupported_reason(cls, scheme, shape, device, dtype):
        reason = gpu_reason(scheme, ScalarFormat, device, dtype)
        if reason is None and scheme.codec.affine_int and scheme.bits not in PLANES:
            return f"{scheme.bits}-bit codes not supported"
        return reason

    @classmethod
    def prepare(cls, scheme, tensors, shape, dtype):
        return prepare_weight(scheme, tensors, shape[1])

    @classmethod
    def linear(cls, x, state, split_k: int = 0):
        return triton_linear(x, *op_args(state), split_k)

    @classmethod
    def moe_linear(cls, x: torch.Tensor, expert_ids: torch.Tensor, state: dict) -> torch.Tensor:
        """Fused experts from a state prepared over all experts (`prepare` of [experts, out, in] tensors)."""
        return triton_moe_linear(x, expert_ids, *op_args(state))


class _OwnLayoutKernel(Kernel):
    """A Triton kernel for formats whose codes have a layout of their own (no fused MoE experts: the experts
    implementation refuses them, and the model's eager experts loop runs them)."""

    priority = 200
    layout: type  # the Format class whose codes it reads

    @classmethod
    def unsupported_reason(cls, scheme, shape, device, dtype):
        return gpu_reason(scheme, cls.layout, device, dtype)


@register_kernel
class TritonVqKernel(_OwnLayoutKernel):
    """Vector-quantized weights (formats/vq.py) in the fused kernel: each tile gathers its weights from the codebooks
    (held in L1/L2) by the 8-bit indices, one index per 8 weights and stage. Precision as `TritonKernel`'s."""

    name = "triton_vq"
    layout = VectorFormat

    @classmethod
    def prepare(cls, scheme, tensors, shape, dtype):
        return prepare_vq(scheme, tensors, shape[1])

    @classmethod
    def linear(cls, x, state):
        return triton_linear(x, *op_args(state))


@register_kernel
class TritonTernaryKernel(_OwnLayoutKernel):
    """Ternary trit-planes (formats/ternary.py): each plane runs the fused kernel as a 2-bit symmetric weight with
    zero-point 1 (codes t + 1), and the planes' products add. Precision as `TritonKernel`'s (the trits are exact in
    every dtype; the scales are rounded to the input dtype with the decoded weight)."""

    name = "triton_ternary"
    layout = TernaryFormat

    @classmethod
    def prepare(cls, scheme, tensors, shape, dtype):
        return {"trit_planes": prepare_ternary(scheme, tensors, shape[1])}

    @classmethod
    def linear(cls, x, state):
        y = None
        for plane in state["trit_planes"]:
            part = triton_linear(x, *op_args(plane))
            y = part if y is None else y + part
        return y


__all__ = ["TritonKernel", "TritonTernaryKernel", "TritonVqKernel", "op_args", "prepare_ternary", "prepare_vq",
           "prepare_weight", "triton_available", "triton_linear", "triton_moe_linear"]
