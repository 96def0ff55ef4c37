"""The GGUF target (llama.cpp, ollama, LM Studio; vLLM and transformers read it too): one `.gguf` file holding the
architecture metadata, the tokenizer and every tensor, written with the `gguf` package (llama.cpp's gguf-py).

Block types, each a block of 32 weights of one row (ggml-common.h), and the hf_quant weights that are exactly them:

    Q4_0  d:f16, qs[16]          w = d * (q - 8)        int4 symmetric, group_size 32
    Q4_1  d:f16, m:f16, qs[16]   w = d * q + m          int4 asymmetric, group_size 32
    Q5_0  d:f16, qh[4], qs[16]   w = d * (q - 16)       int5 symmetric, group_size 32
    Q5_1  d:f16, m:f16, qh, qs   w = d * q + m          int5 asymmetric, group_size 32
    Q8_0  d:f16, qs: int8[32]    w = d * (q - 128)      int8 symmetric, group_size 32 (the int8 is q - 128)

qs holds weight j in the low nibble of byte j and weight j + 16 in the high nibble; qh bit j is bit 4 of q_j.
d is hf_quant's float16 scale and q its code, unchanged. For the asymmetric types the offset is m = -scale * zero:
when that product is a float16 number, d * q + m is the same real number as hf_quant's (q - zero) * scale
(q - zero is exact in float32), so both round to the same float32: the decoded weights are bit-identical. When it
is not (the usual case: scale and zero each carry 11 significant bits), the weight is refused, or re-rounded with
`requantize=True` (m rounded to float16, about 2**-11 of |m| per weight; the added error is reported).

K-quants, super-blocks of 256 weights of one row, are format "kquant" (hf_quant/formats/kquant.py), whose codes
and block parameters are exactly these fields (`pack_k_blocks`):

    Q4_K  d, dmin:f16, scales[12], qs[128]           w = (d * sc) * q - (dmin * m)   kquant bits=4: 8 x 32, 6-bit sc/m
    Q5_K  d, dmin:f16, scales[12], qh[32], qs[128]   w = (d * sc) * q - (dmin * m)   kquant bits=5: 5-bit q
    Q6_K  ql[128], qh[64], scales: int8[16], d:f16   w = (d * sc) * (q - 32)         kquant bits=6: 16 x 16, int8 sc

scales[12] packs the eight 6-bit sc and m: bytes 0-3 sc 0-3 (top bits: sc 4-7 >> 4), bytes 4-7 m 0-3 (top bits:
m 4-7 >> 4), bytes 8-11 the low nibbles of sc 4-7 and m 4-7. qs holds weight 64c + j in the low nibble and 64c + 32
+ j in the high nibble of byte 32c + j; Q5_K's qh bit k of byte j is bit 4 of weight 32k + j; Q6_K per 128-weight
half: ql byte b holds weights b and 64 + b, qh bits 2k..2k+1 of byte j the top bits of weight 32k + j.

Refused, with the fix: other group sizes (GGUF's legacy blocks are 32 wide), rows not a multiple of 32, 2/3/6-bit
int codes (for 256-weight K-quant super-blocks quantize with format='kquant'), double-quantized scales that are not
float16 numbers, NF4/FP4/FP8 codebooks, and what the exporter refuses for every target (online rotations, additive
terms, fused experts).

Every quantized tensor written is decoded back with the gguf package's own `dequantize` and compared with
hf_quant's dequantized weight before the file is kept: exact weights must match bit for bit (an internal error
otherwise), re-rounded ones give the reported added error.

The tensors are named and laid out as llama.cpp's converter (convert_hf_to_gguf.py) writes them for each family
(`FAMILIES`): Llama/Mistral Q and K rows permuted to llama.cpp's interleaved RoPE, Gemma 3 norm weights shifted by
+1 (its RMSNorm multiplies by 1 + w; stored as the float32 1 + w that transformers computes at run time, so
llama.cpp sees the same numbers, while a reader subtracting 1 again may be 1 ulp off); the vocabulary padded with
unused tokens to the embedding's rows. Float tensors are written as they are (float32; bfloat16 widened to float32,
exactly; float16 kept). The tokenizer comes from the checkpoint folder's tokenizer.json: byte-level BPE ("gpt2" with
its pre-tokenizer identified from tokenizer.json) or
SentencePiece-style BPE with byte fallback ("llama", as Gemma and Llama 2 use).
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..formats.scalar import ExportRefused
from ..version import __version__
from .packing import refuse_stacked

BLOCK = 32
QK_K = 256  # K-quant super-block
_K_TYPES = {4: "Q4_K", 5: "Q5_K", 6: "Q6_K"}  # format "kquant" bits -> GGUF type
# (bits, symmetric) -> (GGUF type name, bytes per block)
_TYPES = {(4, True): ("Q4_0", 18), (4, False): ("Q4_1", 20), (5, True): ("Q5_0", 22), (5, False): ("Q5_1", 24),
          (8, True): ("Q8_0", 34)}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package (llama.cpp's gguf-py): pip install 'gguf>=0.10'") \
            from None
    return gguf


@dataclass(frozen=True)
class Family:
    """How llama.cpp's converter writes one model family."""

    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # Llama: HF's rotate-half RoPE rows -> llama.cpp's interleaved pairs
    norm_shift: float = 0.0  # Gemma: RMSNorm computes x * (1 + w); llama.cpp stores 1 + w


FAMILIES = {
    "llama": Family("LLAMA", permute_qk=True),
    "mistral": Family("LLAMA", permute_qk=True),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "gemma3_text": Family("GEMMA3", norm_shift=1.0),
}


class GGUFTarget:
    """Packs what the formats hand over (`Format.export_tensors`) into GGUF blocks (module doc) and writes the file."""

    name = "gguf"
    scale_dtype = torch.float16
    scale_fix = "quantize without double_quant (GGUF stores float16 scales)"

    # --- affine integers -----------------------------------------------------------------------------

    def check_affine_int(self, scheme, shape):
        refuse_stacked(shape, "GGUF")
        out, in_features = shape
        if (scheme.bits, scheme.symmetric) not in _TYPES:
            kinds = ", ".join(f"int{b}{'-sym' if s else ''} ({t})" for (b, s), (t, _) in _TYPES.items())
            raise ExportRefused(f"GGUF's 32-weight blocks hold {kinds}; {scheme.label} has none (the K-quants are "
                                "256-weight super-blocks with 6/8-bit sub-block scales)",
                                "quantize this module as one of those (e.g. bits=4, group_size=32), or for the "
                                "K-quants Q4_K/Q5_K/Q6_K use format='kquant' (bits 4, 5, 6), or keep it in float "
                                "(modules_to_not_convert)")
        if scheme.group_size != BLOCK or in_features % BLOCK:
            raise ExportRefused(f"GGUF blocks are {BLOCK} weights of one row; this weight is [{out}, {in_features}] "
                                f"with group_size={scheme.group_size}",
                                f"quantize this module with group_size={BLOCK} (in_features must be a multiple of "
                                f"{BLOCK}); requantize=True cannot change the group layout")

    def zero_range(self, scheme):
        # Only `requantize`'s refit asks (integer zero-points within the code range are always fine here).
        maxq = (1 << scheme.bits) - 1
        return 0, maxq, "", ""

    def hold_zero(self, scheme, scale, zero):
        """(problems, zero-point the target holds): the offset m = -scale * zero is stored in float16."""
        exact = -(scale.double() * zero.double())
        m = exact.to(torch.float16)
        bad = (m.double() != exact) | ~torch.isfinite(m)
        problems = []
        if bad.any():
            i = int(bad.flatten().nonzero()[0])
            problems.append((f"{int(bad.sum())} of {bad.numel()} offsets -scale*zero are not float16 numbers (e.g. "
                             f"scale {float(scale.flatten()[i]):.6g} * zero {float(zero.flatten()[i]):.6g}); GGUF's "
                             f"Q{scheme.bits}_1 stores the offset in float16",
                             "quantize symmetric (symmetric=True: Q4_0/Q5_0/Q8_0 hold scales and codes exactly)"))
        m32 = m.float().clamp(-65504, 65504)
        return problems, -(m32 / scale)

    def affine_int(self, scheme, codes, scale, zero, shape):
        out, in_features = shape
        kind, _ = _TYPES[(scheme.bits, scheme.symmetric)]
        blocks = pack_blocks(kind, codes, scale, zero)
        return {"blocks": blocks}, {"type": kind}

    # --- K-quant super-blocks (format "kquant") ---------------------------------------------------------

    def k_quant(self, bits, codes, d, scales, dmin, mins, shape):
        """Codes [out, in] (uint8) with a K-quant's super-block d (dmin) [out, S] and sub-block scale (min) codes
        [out, S, n_sub] -> Q4_K / Q5_K / Q6_K blocks, as they are (`pack_k_blocks`)."""
        refuse_stacked(shape, "GGUF")
        kind = _K_TYPES[bits]
        if shape[-1] % QK_K:
            raise ExportRefused(f"GGUF {kind} super-blocks are {QK_K} weights of one row; this weight is "
                                f"{list(shape)}", "quantize this module with another format")
        return {"blocks": pack_k_blocks(kind, codes, d, scales, dmin, mins)}, {"type": kind}

    # --- the file -----------------------------------------------------------------------------------

    def quantization_config(self, model, schemes, float_linears):
        return None, {}

    def write(self, model, state: dict, exported: dict, report, source_dir: Path | None, out: Path) -> list[str]:
        """Write the .gguf file (`out` ending in .gguf, or `out`/model.gguf) and return the file names."""
        gguf = _gguf()
        text_config = model.config.get_text_config()
        family = FAMILIES.get(getattr(text_config, "model_type", None))
        if family is None:
            raise ExportRefused(
                f"GGUF export knows the families {sorted(FAMILIES)}; this model is "
                f"{getattr(text_config, 'model_type', None)!r}",
                "export to compressed-tensors or gptq, which need no per-family layout")
        tokenizer_dir = _tokenizer_dir(source_dir)
        arch = getattr(gguf.MODEL_ARCH, family.arch)
        path = out if out.suffix == ".gguf" else out / "model.gguf"
        tag = uuid.uuid4().hex[:8]
        tmp = path.parent / f".{path.name}.export-{tag}"
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        try:
            _write_tokenizer(gguf, writer, tokenizer_dir, family, text_config.vocab_size)
            _write_hparams(gguf, writer, model, text_config, family, source_dir)
            kinds = _write_tensors(gguf, writer, arch, model, text_config, family, state, exported, report)
            writer.add_file_type(_file_type(gguf, kinds))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
        if path.exists() and path.is_dir():
            shutil.rmtree(path)
        tmp.replace(path)
        return [path.name]


# --- blocks ----------------------------------------------------------------------------------------------


def pack_blocks(kind: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """hf_quant codes [out, in] (uint8, unsigned) with float32 scale (and zero) [out, in / 32] -> GGUF blocks,
    uint8 [out, in / 32 * block bytes] (module doc)."""
    out, in_features = codes.shape
    nb = in_features // BLOCK
    q = codes.to(torch.int64).reshape(out, nb, BLOCK)
    d = _f16_bytes(scale.reshape(out, nb))
    parts = [d]
    if kind in ("Q4_1", "Q5_1"):
        parts.append(_f16_bytes(-(scale.double() * zero.double()).reshape(out, nb)))
    if kind == "Q8_0":
        parts.append((q - 128).to(torch.int8).view(torch.uint8))
    else:
        if kind in ("Q5_0", "Q5_1"):
            high = ((q >> 4) & 1).reshape(out, nb, 4, 8)
            qh = (high << torch.arange(8)).sum(-1)  # byte b, bit k: bit 4 of weight 8b + k (little-endian uint32)
            parts.append(qh.to(torch.uint8))
        low = q & 0x0F
        parts.append((low[..., :16] | (low[..., 16:] << 4)).to(torch.uint8))
    return torch.cat(parts, dim=-1).reshape(out, -1).contiguous()


def pack_k_blocks(kind: str, codes: torch.Tensor, d: torch.Tensor, scales: torch.Tensor, dmin: torch.Tensor | None,
                  mins: torch.Tensor | None) -> torch.Tensor:
    """K-quant codes [out, in] (uint8, unsigned: Q6_K's q - 32 is the signed value) with float16 d (dmin) [out, S]
    and scale (min) codes [out, S, 8] (Q6_K: int8 [out, S, 16]) -> GGUF blocks, uint8 [out, S * block bytes]
    (ggml-common.h's block_q4_K / block_q5_K / block_q6_K, module doc)."""
    out, in_features = codes.shape
    s = in_features // QK_K
    q = codes.to(torch.int64).reshape(out, s, QK_K)
    if kind == "Q6_K":
        halves = q.reshape(out, s, 2, 128)  # 128 weights per half: ql 64 bytes, qh 32 bytes
        low = halves & 0x0F
        ql = low[..., :64] | (low[..., 64:] << 4)
        high = ((halves >> 4) & 3).reshape(out, s, 2, 4, 32)
        qh = (high << (2 * torch.arange(4)).view(4, 1)).sum(-2)  # byte j, bits 2k..2k+1: weight 32k + j
        parts = [ql.reshape(out, s, 128), qh.reshape(out, s, 64), scales.to(torch.int8).view(torch.uint8).to(
            torch.int64).reshape(out, s, 16), _f16_bytes(d).to(torch.int64)]
    else:
        sc, mn = scales.to(torch.int64), mins.to(torch.int64)
        packed_scales = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                                   (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)], -1)
        parts = [_f16_bytes(d).to(torch.int64), _f16_bytes(dmin).to(torch.int64), packed_scales]
        if kind == "Q5_K":
            high = ((q >> 4) & 1).reshape(out, s, 8, 32)
            parts.append((high << torch.arange(8).view(8, 1)).sum(-2))  # byte j, bit k: weight 32k + j
        low = (q & 0x0F).reshape(out, s, 4, 2, 32)  # 64 weights per 32 bytes: low nibble first 32, high next 32
        parts.append((low[..., 0, :] | (low[..., 1, :] << 4)).reshape(out, s, 128))
    return torch.cat(parts, -1).to(torch.uint8).reshape(out, -1).contiguous()


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float [..., n] -> its float16 values as little-endian bytes [..., n, 2]."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


# --- tensors ---------------------------------------------------------------------------------------------


def _permute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` on the rows (output features) of a weight, bias or block array."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _write_tensors(gguf, writer, arch, model, cfg, family: Family, state, exported, report) -> list[str]:
    n_layers = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(arch, n_layers)
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    head = _output_head_name(model)
    kinds = []
    for hf_name in sorted(set(state) | set(exported), key=_natural_key):
        if tied and head is not None and hf_name == f"{head}.weight" and hf_name not in exported:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportRefused(f"tensor {hf_name} has no place in llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} layout",
                                "export to compressed-tensors or gptq")
        rows = None
        if family.permute_qk:
            if re.search(r"\.q_proj\.(weight|bias)$", hf_name):
                rows = n_head
            elif re.search(r"\.k_proj\.(weight|bias)$", hf_name):
                rows = n_kv
        if hf_name in exported:
            module, weight = exported[hf_name]
            blocks = weight.tensors["blocks"]
            kind = weight.scheme["type"]
            _check_decoding(gguf, module, hf_name, blocks, kind, weight, report)
            if rows is not None:
                blocks = _permute_rows(blocks, rows)
            writer.add_tensor(gguf_name, blocks.numpy(), raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
            kinds.append(kind)
            continue
        t = state[hf_name].detach().cpu()
        if not t.is_floating_point():
            raise ExportRefused(f"tensor {hf_name} is {t.dtype}, not a float tensor", "keep it out of the model")
        if rows is not None:
            t = _permute_rows(t, rows)
        if family.norm_shift and hf_name.endswith("norm.weight"):
            t = t.float() + family.norm_shift
        if t.dtype == torch.float16 and t.dim() > 1:
            writer.add_tensor(gguf_name, t.contiguous().numpy())
            kinds.append("F16")
        else:  # float32, or bfloat16 widened exactly; 1-D tensors must be F32 for llama.cpp
            writer.add_tensor(gguf_name, t.float().contiguous().numpy())
            kinds.append("F32")
    return kinds


def _check_decoding(gguf, module, hf_name, blocks, kind, weight, report):
    """Decode the blocks with the gguf package's own dequantize and compare with hf_quant's weight (module doc)."""
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    theirs = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(blocks.numpy(), qtype)))
    ours = module.dequantize_weight(torch.float32).detach().cpu()
    if weight.added_error is None:
        if theirs.shape != ours.shape or not torch.equal(theirs, ours):
            diff = (theirs - ours).abs().max() if theirs.shape == ours.shape else float("nan")
            raise AssertionError(f"internal error: GGUF {kind} blocks of {hf_name} decode differently from hf_quant's "
                                 f"weight (max |diff| {float(diff):.3g}); please report this")
    else:
        norm = float(ours.norm())
        diff = float((theirs - ours).norm())
        report.added_error[hf_name.removesuffix(".weight")] = diff / norm if norm > 0 else diff


def _output_head_name(model) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _file_type(gguf, kinds: list[str]):
    quantized = [k for k in kinds if k.startswith("Q")]
    if not quantized:
        return gguf.LlamaFileType.ALL_F32 if all(k == "F32" for k in kinds) else gguf.LlamaFileType.MOSTLY_F16
    most = max(set(quantized), key=quantized.count)
    return getattr(gguf.LlamaFileType, {"Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S"}.get(most, f"MOSTLY_{most}"))


# --- metadata ----------------------------------------------------------------------------------------------


def _write_hparams(gguf, writer, model, cfg, family: Family, source_dir):
    name = Path(str(getattr(model, "name_or_path", "") or "model")).name or "model"
    writer.add_name(name)
    writer.add_string("general.quantized_by", f"hf_quant {__version__}")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if getattr(cfg, "head_dim", None) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    rope = _rope_parameters(cfg)
    full = rope.get("full_attention", rope)
    if full.get("rope_theta") is not None:
        writer.add_rope_freq_base(full["rope_theta"])
    rope_type = full.get("rope_type", "default")
    if rope_type not in ("default", None):
        if rope_type == "linear" and full.get("factor"):
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
        else:
            raise ExportRefused(f"RoPE scaling {rope_type!r} is not written to GGUF by hf_quant yet",
                                "export to compressed-tensors or gptq")
    if family.arch == "LLAMA":
        writer.add_rope_dimension_count(head_dim)
    if family.arch == "GEMMA3":
        local = rope.get("sliding_attention", {}).get("rope_theta")
        if local is not None:
            writer.add_rope_freq_base_swa(local)
        if getattr(cfg, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
        # llama.cpp's Gemma 3 has no per-layer attention types: every 6th layer is global (llama-model.cpp's
        # set_swa_pattern(6)); another pattern would silently attend differently there.
        expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                    for i in range(cfg.num_hidden_layers)]
        layer_types = list(getattr(cfg, "layer_types", None) or expected)
        if layer_types != expected:
            raise ExportRefused(f"this Gemma 3 has layer_types {layer_types}; llama.cpp's Gemma 3 makes every 6th "
                                "layer global and the others sliding-window", "export to compressed-tensors or gptq")
        if getattr(cfg, "sliding_window", None):
            writer.add_sliding_window(cfg.sliding_window)
    if family.arch == "QWEN2" and getattr(cfg, "use_sliding_window", False):
        raise ExportRefused("Qwen2 with use_sliding_window=True is not written to GGUF by hf_quant yet",
                            "export to compressed-tensors or gptq")


def _rope_parameters(cfg) -> dict:
    rope = getattr(cfg, "rope_parameters", None)
    if rope:
        return dict(rope)
    return {"rope_theta": getattr(cfg, "rope_theta", None), "rope_type": "default"}


# --- tokenizer -----------------------------------------------------------------------------------------------

# The pre-tokenizer split regexes of tokenizer.json that llama.cpp knows by name (llama-vocab.cpp's
# LLAMA_VOCAB_PRE_TYPE_*); a byte-level BPE tokenizer whose pre-tokenizer is none of these is refused rather than
# written with a guess, since llama.cpp would then split text differently from the tokenizer the model was trained
# with.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
_PRE_BY_SPLIT = {(_LLAMA3,): "llama-bpe", (_QWEN2,): "qwen2"}


def _pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    splits = tuple(s["pattern"].get("Regex") for s in steps if s.get("type") == "Split")
    if splits in _PRE_BY_SPLIT and kinds[-1] == "ByteLevel" and not steps[-1].get("use_regex", True):
        return _PRE_BY_SPLIT[splits]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # StarCoder-style: each digit its own token, then GPT-2's split
    return None


def _adds_space_prefix(tokenizer_json: dict) -> bool:
    """Whether the SentencePiece-style tokenizer puts "▁" before the text (Llama 2's dummy prefix; Gemma's does not):
    a Prepend("▁") normalizer or a Metaspace pre-tokenizer that prepends."""
    def steps(part):
        part = tokenizer_json.get(part) or {}
        return part.get("normalizers", part.get("pretokenizers", [part])) if part.get("type") == "Sequence" else [part]

    if any(s.get("type") == "Prepend" and s.get("prepend") == "\u2581" for s in steps("normalizer")):
        return True
    return any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") in ("always", "first")
               for s in steps("pre_tokenizer"))


def _tokenizer_dir(source_dir: Path | None) -> Path:
    if source_dir is None or not (source_dir / "tokenizer.json").is_file():
        where = str(source_dir) if source_dir is not None else "the model's folder (it has none: an in-memory model)"
        raise ExportRefused(f"GGUF files carry the tokenizer, and {where} has no tokenizer.json",
                            "save the tokenizer beside the checkpoint (tokenizer.save_pretrained(folder)) and export "
                            "the folder")
    return source_dir


def _write_tokenizer(gguf, writer, folder: Path, family: Family, n_vocab: int) -> None:
    """Write the vocabulary (padded with unused tokens to the embedding's `n_vocab` rows, as llama.cpp's converter
    does, so the embedding is written whole), merges and special tokens."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        pre = _pre_tokenizer_name(data)
        if pre is None:
            raise ExportRefused(f"{folder / 'tokenizer.json'}: its byte-level BPE pre-tokenizer "
                                f"{json.dumps(data.get('pre_tokenizer'))[:200]} is not one llama.cpp knows by name",
                                "export to compressed-tensors or gptq, or convert the tokenizer with llama.cpp's "
                                "convert_hf_to_gguf.py")
        vocab = dict(model["vocab"])
        added = {t["id"]: t for t in data.get("added_tokens", [])}
        size = max([*vocab.values(), *added.keys(), n_vocab - 1]) + 1
        by_id = {i: tok for tok, i in vocab.items()}
        tokens, types = [], []
        for i in range(size):
            if i in added:
                tokens.append(added[i]["content"])
                types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
            elif i in by_id:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL)
            else:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=size)
    else:
        try:
            vocab = gguf.LlamaHfVocab(folder)
        except (FileNotFoundError, TypeError, ValueError) as e:
            raise ExportRefused(f"{folder / 'tokenizer.json'} is neither a byte-level BPE nor a SentencePiece-style "
                                f"BPE tokenizer that GGUF export understands ({e})",
                                "export to compressed-tensors or gptq") from None
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        size = len(tokens)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(data))
        special = gguf.SpecialVocab(folder, n_vocab=size)
    special.add_to_gguf(writer, quiet=True)
