"""GPTQ checkpoints (AutoGPTQ / GPTQModel, checkpoint_format "gptq" = v1, and GPTQModel's "gptq_v2").

Layout of a Linear weight [out, in] with b bits (2, 3, 4, 8) and group size g (the inverse of hf_quant/export/gptq.py):

    qweight  int32    [ceil(in * b / 32), out]    codes of each output column, one LSB-first bit stream along `in`
    qzeros   int32    [ceil(in / g), ceil(out * b / 32)]  zero-point fields, packed the same way along `out`
    scales   float16  [ceil(in / g), out]
    g_idx    int32    [in]                        must be i // g (hf_quant's groups are contiguous columns)

decoded w[o, i] = scales[g_idx[i], o] * (q - z), z = field + 1 (v1) or field (v2): hf_quant's codes, float16 scales
and integer zero-points as they are, so hf_quant's float32 dequantization is exactly this formula in float32 (and its
float16 rounding is the readers' float16 decode).

Refused (module or tensor named): act-order checkpoints (desc_act with a g_idx that is not i // g: hf_quant has no
per-column group index), inconsistent g_idx, bits other than 2/3/4/8 (GPTQModel's 5-7-bit planar packing), other
checkpoint formats (marlin, bitblas, qqq, ...), pack_dtype other than int32, a v1 zero field of 2**b - 1 (a zero-point
of 0 stored as -1: AutoGPTQ/vLLM read it as 2**b, GPTQModel's v1 -> v2 conversion as 0 with a carry into the next
field, so the file means different weights to different readers), group sizes hf_quant lacks, tensors whose dtype or
shape does not match the config. Negative scales (AutoRound's symmetric export signs them) import exactly: codes
maxq - q, zero-point maxq - z, scale -s (the same values, other codes); such a layer imports as asymmetric.
`sym=True` checkpoints whose zero-points are not all 2**(b-1) import as asymmetric (exact). GPTQModel's `dynamic` overrides ("+:regex" / plain regex: per-module bits/group_size/sym/desc_act, first
match wins as in GPTQModel and vLLM; "-:regex": kept in float) give mixed precision.
"""

from __future__ import annotations

import re

import torch

from ..config import _regexes
from ..export.packing import packed_words, unpack_int32
from .common import (
    ImportedWeight, ImportRefused, check_bits, check_g_idx, fp16_scales, hf_group_size, int_codes, n_groups,
)

GPTQ_BITS = (2, 3, 4, 8)
_FIX_EXPORT = "re-export the checkpoint with GPTQModel or AutoGPTQ (checkpoint_format 'gptq')"


class GPTQSource:
    name = "GPTQ"
    quantized_only = ("qzeros",)  # other tensors marking a quantized module
    marker = "qweight"
    tensors = ("qweight", "qzeros", "scales", "g_idx")
    method = "gptq"

    def __init__(self, qc: dict, where: str):
        fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            raise ImportRefused(where, f"checkpoint_format {fmt!r}: hf_quant imports GPTQ's 'gptq' (v1) and 'gptq_v2' "
                                "layouts", "convert the checkpoint to the 'gptq' format with GPTQModel")
        self.v2 = fmt == "gptq_v2"
        pack_dtype = qc.get("pack_dtype", "int32")
        if pack_dtype not in ("int32", "torch.int32"):
            raise ImportRefused(where, f"pack_dtype {pack_dtype!r}: hf_quant reads int32-packed GPTQ tensors",
                                "quantize with GPTQModel's default pack_dtype int32")
        self.base = _settings(where, qc)
        dynamic = qc.get("dynamic") or {}
        if not isinstance(dynamic, dict):
            raise ImportRefused(where, f"`dynamic` must be a dict of regex -> overrides, got {type(dynamic).__name__}",
                                _FIX_EXPORT)
        rules = []
        for key, value in dynamic.items():
            if not isinstance(key, str) or not (value is None or isinstance(value, dict)):
                raise ImportRefused(where, f"dynamic entry {key!r}: {value!r} is not regex -> dict", _FIX_EXPORT)
            negative = key.startswith("-:")
            pattern = key[2:] if negative or key.startswith("+:") else key
            try:
                _regexes(f"{where}: dynamic", [pattern])  # untrusted: judged before it is ever matched
            except ValueError as e:
                raise ImportRefused(where, str(e), "list the module names in `dynamic` instead") from None
            rules.append((negative, re.compile(pattern), value or {}))
        self.rules = rules

    def kept_float(self, name: str) -> bool:
        for negative, regex, _ in self.rules:
            if regex.match(name):
                return negative
        return False

    def settings(self, name: str) -> dict:
        for negative, regex, override in self.rules:
            if regex.match(name):
                return self.base if negative else _settings(f"{name} (dynamic override)", {**self.base, **override})
        return self.base

    def read(self, ckpt, name: str, out: int, in_features: int, allowed_groups) -> ImportedWeight:
        if self.kept_float(name):
            raise ImportRefused(name, "the config's `dynamic` keeps this module in float ('-:' rule) but the "
                                "checkpoint stores it packed (qweight)", _FIX_EXPORT)
        s = self.settings(name)
        bits = check_bits(name, s["bits"], GPTQ_BITS, "GPTQ v1 has 2, 3, 4 and 8-bit codes; GPTQModel's 5-7-bit "
                          "packing is not read; load it with GPTQModel")
        g = s["group_size"]
        groups = n_groups(g, in_features)
        hf_g = hf_group_size(name, g, in_features, allowed_groups)
        qweight = int_codes(f"{name}.qweight", ckpt.read(f"{name}.qweight", (torch.int32,),
                                                         (packed_words(in_features, bits), out), _FIX_EXPORT))
        qzeros = ckpt.read(f"{name}.qzeros", (torch.int32,), (groups, packed_words(out, bits)), _FIX_EXPORT)
        scales = ckpt.read(f"{name}.scales", (torch.float16, torch.bfloat16, torch.float32), (groups, out),
                           _FIX_EXPORT)
        if f"{name}.g_idx" in ckpt:
            g_idx = ckpt.read(f"{name}.g_idx", (torch.int32, torch.int64), (in_features,), _FIX_EXPORT)
            check_g_idx(f"{name}.g_idx", g_idx, g, in_features, groups)
        elif s["desc_act"]:
            raise ImportRefused(f"{name}.g_idx", "desc_act=True but the checkpoint has no g_idx (the group of each "
                                "column is unknown)", _FIX_EXPORT)
        codes = unpack_int32(qweight, bits, in_features, dim=0).t()  # [out, in]
        fields = unpack_int32(qzeros, bits, out, dim=1).t()  # [out, groups]
        maxq = (1 << bits) - 1
        if not self.v2 and (fields == maxq).any():
            raise ImportRefused(f"{name}.qzeros", f"a zero field is {maxq} (a zero-point of 0 stored as -1): AutoGPTQ "
                                f"and vLLM read it as zero-point {maxq + 1}, GPTQModel's v1->v2 conversion as 0 with "
                                "a carry into the next field, so the file means different weights to different "
                                "readers", "re-export with GPTQModel in its 'gptq_v2' format (zero-points stored as "
                                "they are), or quantize with sym=True")
        zero = (fields if self.v2 else fields + 1).float()
        codes, scales, zero = _flip_negative_scales(codes, scales, zero, bits, g)
        scale = fp16_scales(f"{name}.scales", scales).t().contiguous()
        symmetric = s["sym"] and bool((zero == (1 << (bits - 1))).all())
        return ImportedWeight(codes.to(torch.uint8).contiguous(), scale, None if symmetric else zero.contiguous(),
                              bits, hf_g, self.method)


def _flip_negative_scales(codes, scales, zero, bits: int, g: int):
    """AutoRound's symmetric quantizer signs each group's scale (the largest-magnitude weight lands on the code
    range's end), so its GPTQ export stores negative scales, which every GPTQ reader decodes by the same formula.
    A group with scale s < 0 is the same weights with scale -s, codes maxq - q and zero-point maxq - z:
    (q - z) * s = ((maxq - q) - (maxq - z)) * -s, exactly. codes [out, in], scales [groups, out], zero [out, groups]."""
    negative = scales < 0
    if not negative.any():
        return codes, scales, zero
    maxq = (1 << bits) - 1
    neg = negative.t()  # [out, groups]
    columns = torch.arange(codes.shape[1]) // (codes.shape[1] if g == -1 else g)
    codes = torch.where(neg[:, columns], maxq - codes, codes)
    return codes, scales.abs(), torch.where(neg, maxq - zero, zero)


def _settings(where: str, qc: dict) -> dict:
    bits, g = qc.get("bits"), qc.get("group_size", -1)
    sym, desc_act = qc.get("sym", True), qc.get("desc_act", False)
    if not isinstance(g, int) or isinstance(g, bool) or not (g == -1 or g > 0):
        raise ImportRefused(where, f"group_size {g!r} is not -1 or a positive int", _FIX_EXPORT)
    if not isinstance(sym, bool) or not isinstance(desc_act, bool):
        raise ImportRefused(where, f"sym={sym!r} and desc_act={desc_act!r} must be booleans", _FIX_EXPORT)
    return {"bits": bits, "group_size": g, "sym": sym, "desc_act": desc_act}
