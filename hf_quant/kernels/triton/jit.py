"""Triton code of the fused dequantize-matmul (imported lazily: only where triton is installed).

One kernel serves decode, prefill and fused MoE experts:
- y[m, n] = sum_k x[m, k] * w[n, k], where w is decoded tile by tile from packed codes in registers, never written
  out. Each program reads its [BLOCK_K, BLOCK_N] slice of codes and scales once per K step.
- BLOCK_M == 1 (one token): a multiply-and-reduce on the CUDA cores (a GEMV; tensor cores need >= 16 rows).
  BLOCK_M >= 16: `tl.dot` on tensor cores (skinny GEMM for 2-16 tokens, tiled GEMM for prefill).
- Split-K: program axis 2 takes one slice of the reduction; slices write float32 partial sums that the caller
  adds (deterministic, unlike atomics). Used for few tokens, where N alone gives too few programs.
- MoE: rows of x are gathered through `rows_ptr` (tokens sorted by expert, each expert's run padded to BLOCK_M)
  and each row block reads the weights of expert `expert_ptr[pid_m]`.

Weight layout (see `prepare` in __init__.py): codes split into at most two bit planes of widths W0, W1 (e.g. 3 = 2 + 1
bits, so 3-bit weights take exactly 3 bits in memory), each plane packed 32 // width codes per int32 word along K,
stored [K_words, N] so that consecutive programs' loads along N coalesce. Scales (and zero-points) are [groups, N].
Vector-quantized weights (MODE VQ) instead hold one uint8 codeword index per 8 weights and residual stage, [K / 8, N]
per stage (W0 = 8, W1 = 8 with a second stage), and the codebooks as the value table.

Prefill (many tokens) can also decode the weight once (`dequant_kernel`, tile by tile with the same decoder) and
leave the product to cuBLAS; __init__.py chooses by token count.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton import knobs

INTERPRETED = bool(knobs.runtime.interpret)


def f32_dot(dtype) -> bool:
    """Whether `tl.dot` runs on float32 operands (IEEE): for float32 inputs (not TF32), and for bfloat16 inputs in
    the interpreter, whose bfloat16 `tl.dot` multiplies raw bit patterns (triton-lang/triton#11584). Products of
    bfloat16 values are exact in float32, so the interpreter computes what the GPU's bfloat16 dot does."""
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)

AFFINE, AFFINE_SYMMETRIC, CODEBOOK, VQ = 0, 1, 2, 3


@triton.jit
def _plane(ptr, k0, offs_k, offs_n, mask, N, K, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
           WORD_TILE: tl.constexpr):
    """Codes of one bit plane for rows k0 + [0, BLOCK_K) and columns offs_n (int32; zero where masked).

    WORD_TILE: load each word once as a [BLOCK_K / per_word, BLOCK_N] tile and spread its codes with a reshape;
    otherwise every k loads its own word (the same address per_word times, served by L1). Autotuning picks: which is
    faster depends on the GPU and the token regime (the per-k loads are pipelined through shared memory at full
    [BLOCK_K, BLOCK_N] int32 size in the tensor-core paths)."""
    per_word: tl.constexpr = 32 // WIDTH
    if WORD_TILE:
        offs_w = k0 // per_word + tl.arange(0, BLOCK_K // per_word)  # k0 is a multiple of 32: whole words
        k_words = tl.cdiv(K, 32) * (32 // per_word)  # rows are stored padded to 32 codes
        word_ok = (offs_w < k_words)[:, None] & (offs_n < N)[None, :]
        word = tl.load(ptr + offs_w[:, None] * N + offs_n[None, :], mask=word_ok, other=0)
        shifts = tl.arange(0, per_word) * WIDTH
        codes = (word[:, None, :] >> shifts[None, :, None]) & ((1 << WIDTH) - 1)
        return tl.reshape(codes, (BLOCK_K, BLOCK_N))
    else:
        word = tl.load(ptr + (offs_k // per_word)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        shift = ((offs_k % per_word) * WIDTH)[:, None]
        # arithmetic shift of a signed word: the mask drops the sign-extended bits
        return (word >> shift) & ((1 << WIDTH) - 1)


@triton.jit
def _dequantize_tile(p0_ptr, p1_ptr, s_ptr, z_ptr, table_ptr, k0, offs_k, k_ok, offs_n, n_ok, N, K, group_size,
                     W0: tl.constexpr, W1: tl.constexpr, MODE: tl.constexpr, SYM_ZERO: tl.constexpr,
                     TILE_IN_GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                     WORD_TILE: tl.constexpr):
    """Float32 weights w[k, n] of a [BLOCK_K, BLOCK_N] tile starting at k0; finite everywhere and zero outside
    n_ok (callers zero x where k_ok is false)."""
    mask = k_ok[:, None] & n_ok[None, :]
    if MODE == 3:  # VQ: codeword c of stage p holds 8 consecutive weights, table [stages, 256, 8]
        vector = (offs_k // 8)[:, None] * N + offs_n[None, :]  # each index is read by its 8 rows (from L1)
        within = (offs_k % 8)[:, None]
        code = tl.load(p0_ptr + vector, mask=mask, other=0).to(tl.int32)
        value = tl.load(table_ptr + code * 8 + within, mask=mask, other=0.0)
        if W1 > 0:
            code = tl.load(p1_ptr + vector, mask=mask, other=0).to(tl.int32)
            value += tl.load(table_ptr + 2048 + code * 8 + within, mask=mask, other=0.0)
    else:
        code = _plane(p0_ptr, k0, offs_k, offs_n, mask, N, K, W0, BLOCK_K, BLOCK_N, WORD_TILE)
        if W1 > 0:
            code = code | (_plane(p1_ptr, k0, offs_k, offs_n, mask, N, K, W1, BLOCK_K, BLOCK_N, WORD_TILE) << W0)
    if TILE_IN_GROUP:  # the whole tile lies in one group: one row of scales, broadcast over k
        param = (k0 // group_size) * N + offs_n[None, :]
        param_mask = n_ok[None, :]
    else:
        param = (offs_k // group_size)[:, None] * N + offs_n[None, :]
        param_mask = mask
    scale = tl.load(s_ptr + param, mask=param_mask, other=0.0).to(tl.float32)
    if MODE == 0:  # affine, stored zero-point
        zero = tl.load(z_ptr + param, mask=param_mask, other=0.0).to(tl.float32)
        w = (code.to(tl.float32) - zero) * scale
    elif MODE == 1:  # affine symmetric: the zero-point is 2**(bits-1)
        w = (code.to(tl.float32) - SYM_ZERO) * scale
    elif MODE == 2:  # codebook: NF4 / FP4 / FP8 value table
        w = tl.load(table_ptr + code, mask=mask, other=0.0) * scale
    else:
        w = value * scale
    return w


@triton.jit
def qmm_kernel(x_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, table_ptr, y_ptr, rows_ptr, expert_ptr,
               M, N, K, group_size, k_chunk, stride_xm, stride_ysplit,
               expert_stride_p0, expert_stride_p1, expert_stride_param, tune_key,
               W0: tl.constexpr, W1: tl.constexpr, MODE: tl.constexpr, SYM_ZERO: tl.constexpr,
               MOE: tl.constexpr, TOP_K: tl.constexpr, F32_DOT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WORD_TILE: tl.constexpr,
               TILE_IN_GROUP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if MOE:
        # M counts sorted (token, slot) entries; padding entries hold M and are masked out
        entry = tl.load(rows_ptr + offs_m)
        m_ok = entry < M
        block_used = tl.load(rows_ptr + pid_m * BLOCK_M) < M  # a used block starts with a real entry
        x_rows = entry // TOP_K
        y_rows = entry
        expert = tl.load(expert_ptr + pid_m).to(tl.int64)
        p0_ptr += expert * expert_stride_p0
        p1_ptr += expert * expert_stride_p1
        s_ptr += expert * expert_stride_param
        z_ptr += expert * expert_stride_param
    else:
        m_ok = offs_m < M
        x_rows = offs_m
        y_rows = offs_m
    k_start = pid_k * k_chunk
    k_end = tl.minimum(k_start + k_chunk, K)
    if MOE:
        k_end = tl.where(block_used, k_end, k_start)  # an unused block reads no weights
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x = tl.load(x_ptr + x_rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _dequantize_tile(p0_ptr, p1_ptr, s_ptr, z_ptr, table_ptr, k0, offs_k, k_ok, offs_n, n_ok, N, K,
                             group_size, W0, W1, MODE, SYM_ZERO, TILE_IN_GROUP, BLOCK_K, BLOCK_N, WORD_TILE)
        if BLOCK_M == 1:
            acc += tl.sum(tl.reshape(x.to(tl.float32), (BLOCK_K, 1)) * w, axis=0, keep_dims=True)
        elif F32_DOT:  # float32 inputs, or bfloat16 ones in the interpreter (see `f32_dot`)
            acc = tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    y = y_ptr + pid_k * stride_ysplit + y_rows[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def dequant_kernel(p0_ptr, p1_ptr, s_ptr, z_ptr, table_ptr, w_ptr, N, K, group_size,
                   W0: tl.constexpr, W1: tl.constexpr, MODE: tl.constexpr, SYM_ZERO: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, TILE_IN_GROUP: tl.constexpr):
    """The decoded weight, written [K, N] in w_ptr's dtype (the prefill path: decode once, cuBLAS multiplies)."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    n_ok = offs_n < N
    w = _dequantize_tile(p0_ptr, p1_ptr, s_ptr, z_ptr, table_ptr, k0, offs_k, k_ok, offs_n, n_ok, N, K, group_size,
                         W0, W1, MODE, SYM_ZERO, TILE_IN_GROUP, BLOCK_K, BLOCK_N, True)
    tl.store(w_ptr + offs_k[:, None].to(tl.int64) * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty),
             mask=k_ok[:, None] & n_ok[None, :])


def _configs(block_m, shapes):
    return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": n, "BLOCK_K": k, "WORD_TILE": t}, num_warps=w, num_stages=s)
            for n, k, w, s in shapes for t in (False, True)]


# Small candidate sets per token regime: autotuning compiles and times each once per (shape bucket, dtype, GPU);
# triton caches the winners on disk (`cache_results`, under TRITON_CACHE_DIR, default ~/.triton/cache).
# Each tensor-core regime has one small candidate ((32, 64, 4, 2) skinny, (64, 64, 4, 2) prefill) that fits shared
# memory in every case, float32 inputs with two bit planes included: on an H100 the larger ones overflow it there, and
# the autotuner skips them (HF_QUANT_TRITON_TUNE=0 picks the small one).
_GEMV = _configs(1, [(64, 128, 4, 3), (128, 128, 4, 3), (64, 256, 4, 3)])
_SKINNY = _configs(16, [(64, 128, 4, 3), (128, 128, 4, 3), (64, 256, 4, 3), (32, 64, 4, 2)])
_PREFILL = [*_configs(64, [(128, 64, 4, 4), (64, 64, 4, 2)]), *_configs(128, [(128, 64, 8, 4), (128, 128, 8, 3)])]
# The interpreter (CPU correctness checks) runs one small config: several programs per axis, several K steps.
# Tests switch WORD_TILE here (and clear `qmm.cache`) to check both ways of reading the codes.
INTERPRETER_BLOCKS = {"BLOCK_N": 32, "BLOCK_K": 32, "WORD_TILE": False}


def tuning_enabled() -> bool:
    """HF_QUANT_TRITON_TUNE=0 takes the smallest candidate of each token regime instead of timing them all: for test
    runs on a GPU, which compile many (format, shape) keys once each and time nothing."""
    return os.environ.get("HF_QUANT_TRITON_TUNE", "1") != "0"


def _select_configs(configs, named_args, **kwargs):
    """The candidates of the token regime (BLOCK_M 1 for one token, 16 up to 16 tokens, 64/128 beyond); MoE fixes
    BLOCK_M itself (rows are padded per expert to it), so its candidates drop that key."""
    given = kwargs.get("BLOCK_M")
    bucket = named_args["tune_key"]
    wanted = (given,) if given else (1,) if bucket == 1 else (16,) if bucket <= 16 else (64, 128)
    picked = [c for c in configs if c.kwargs["BLOCK_M"] in wanted]
    if INTERPRETED:
        picked = [triton.Config({**picked[0].kwargs, **INTERPRETER_BLOCKS}, num_warps=1)]
    elif not tuning_enabled():
        picked = [min(picked, key=_footprint)]
    if given:
        picked = [triton.Config({k: v for k, v in c.kwargs.items() if k != "BLOCK_M"}, num_warps=c.num_warps,
                                num_stages=c.num_stages) for c in picked]
    return picked


def _footprint(config) -> int:
    """Relative shared memory of a candidate: the pipelined x and weight tiles."""
    k = config.kwargs
    return (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * config.num_stages


_KEY = ["tune_key", "N", "K", "W0", "W1", "MODE", "MOE"]
# Tiles start at multiples of BLOCK_K within a split-K slice; when slices and groups both align to BLOCK_K, no tile
# straddles two groups and each loads a single row of scales instead of one per k.
_tile_in_group = triton.heuristics(
    {"TILE_IN_GROUP": lambda a: a["group_size"] % a["BLOCK_K"] == 0 and a["k_chunk"] % a["BLOCK_K"] == 0}
)
qmm = triton.autotune(configs=_GEMV + _SKINNY + _PREFILL, key=_KEY, cache_results=True,
                      prune_configs_by={"early_config_prune": _select_configs})(_tile_in_group(qmm_kernel))
