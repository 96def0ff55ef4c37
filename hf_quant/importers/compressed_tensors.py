"""compressed-tensors checkpoints (llm-compressor; quant_method "compressed-tensors"), format "pack-quantized".

Layout (the inverse of hf_quant/export/compressed_tensors.py; the library's `PackedQuantizationCompressor`) of a
Linear weight [out, in] with `num_bits` b:

    weight_packed      int32  [out, ceil(in * b / 32)]  codes q + 2**(b-1) as one LSB-first bit stream per row
    weight_scale       float  [out, n_groups]  (channel: [out, 1]; tensor: [1])
    weight_zero_point  int32  [ceil(out * b / 32), n_groups]  asymmetric: zp + 2**(b-1), packed along `out`
    weight_shape       int    [2]  (out, in)
    weight_g_idx       int    [in]  optional; must be i // group_size

decoded w = (q - zp) * scale in the scale's dtype. The stored unsigned fields are hf_quant's codes and integer
zero-points (symmetric: zp = 0 is hf_quant's implied 2**(b-1)), so hf_quant's float32 dequantization is exactly
(q - zp) * scale in float32; the library's decode in a float16 (bfloat16) scale dtype is its float16 (bfloat16)
rounding. Scales must be exact float16 values (float32 or bfloat16 scales are checked, not rounded).

Mixed precision: each `config_groups` entry is a scheme with `targets` (module names, "re:" regexes or class names,
matched as the library matches them); `ignore` lists float modules. Refused: every scheme hf_quant cannot run
weight-only and exactly — float weights (FP8, NVFP4, MXFP4), activation quantization (input/output activations, static
or dynamic: importing only the weights would silently change the model's results), a KV-cache scheme, sparsity
(2:4) and transforms (online rotations), block / tensor-group strategies, dynamic weight scales, bits hf_quant lacks
(1 and 7), group sizes hf_quant lacks or that do not divide `in`, act-order group indices, formats other than
pack-quantized, checkpoints not in the "compressed" status, and tensors whose dtype, shape or values do not match
the config.
"""

from __future__ import annotations

import json
import re

import torch

from ..config import _regexes
from ..export.packing import packed_words, unpack_int32
from ..formats import get_format
from .common import ImportedWeight, ImportRefused, check_bits, check_g_idx, fp16_scales, hf_group_size, n_groups

PACK_QUANTIZED = "pack-quantized"
CT_INT = "int"  # compressed-tensors' QuantizationType.INT (the library's word, not an hf_quant format name)
_FIX = "load it with transformers' compressed-tensors support or vLLM (hf_quant imports int pack-quantized weights only)"
_ACT_FIX = ("load it with vLLM or transformers' compressed-tensors support; hf_quant runs weights only, so importing "
            "the weights alone would change the model's results")


class CompressedTensorsSource:
    name = "compressed-tensors"
    quantized_only = ("weight_scale",)  # other tensors marking a quantized module
    marker = "weight_packed"
    tensors = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
    method = "rtn"

    def __init__(self, qc: dict, where: str):
        status = qc.get("quantization_status", "compressed")
        if status != "compressed":
            raise ImportRefused(where, f"quantization_status {status!r}: the weights are stored as float, not packed",
                                "save the model compressed (llm-compressor's default), or load it as a float model")
        for key, what in (("kv_cache_scheme", "a KV-cache quantization scheme"),
                          ("sparsity_config", "a sparsity config (e.g. 2:4)"),
                          ("transform_config", "transforms (online rotations)")):
            value = qc.get(key)
            if value and not (key == "sparsity_config" and value.get("format") in (None, "dense")):
                raise ImportRefused(where, f"{what}: hf_quant imports weight-only int quantization", _ACT_FIX)
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ImportRefused(where, "no config_groups", _FIX)
        self.default_format = qc.get("format")
        self.groups = {}
        for gname, group in groups.items():
            if not isinstance(group, dict):
                raise ImportRefused(where, f"config_groups[{gname!r}] is not a dict", _FIX)
            targets = group.get("targets") or []
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise ImportRefused(where, f"config_groups[{gname!r}].targets must be a list of names", _FIX)
            self.groups[gname] = (_matchers(where, targets), group)
        ignore = qc.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
            raise ImportRefused(where, "`ignore` must be a list of names", _FIX)
        self.ignore = _matchers(where, ignore)

    def kept_float(self, name: str, module) -> bool:
        return _matches(self.ignore, name, module)

    def read(self, ckpt, name: str, out: int, in_features: int, allowed_groups, module=None) -> ImportedWeight:
        if self.kept_float(name, module):
            raise ImportRefused(name, "the config's `ignore` list keeps this module in float but the checkpoint "
                                "stores it packed (weight_packed)", _FIX)
        matched = [(g, group) for g, (m, group) in self.groups.items() if _matches(m, name, module)]
        if not matched:
            raise ImportRefused(name, "no config group targets this module, but the checkpoint stores it packed", _FIX)
        schemes = {json.dumps(group.get("weights"), sort_keys=True) for _, group in matched}
        if len(schemes) > 1 or len({group.get("format") for _, group in matched}) > 1:
            raise ImportRefused(name, f"targeted by config groups {[g for g, _ in matched]} with different schemes",
                                "give each module one config group")
        gname, group = matched[0]
        where = f"{name} (config group {gname!r})"
        for key in ("input_activations", "output_activations"):
            if group.get(key):
                kind = "dynamic" if group[key].get("dynamic") else "static"
                raise ImportRefused(where, f"{kind} {key.replace('_', ' ')} quantization", _ACT_FIX)
        fmt = group.get("format") or self.default_format
        w = group.get("weights")
        if not isinstance(w, dict):
            raise ImportRefused(where, "the group has no weight quantization", _FIX)
        kind = w.get("type", CT_INT)
        if kind != CT_INT or fmt != PACK_QUANTIZED:
            raise ImportRefused(where, f"{kind} weights in format {fmt!r}: hf_quant imports int weights in the "
                                f"{PACK_QUANTIZED!r} format", _FIX)
        if w.get("dynamic", False) is not False:
            raise ImportRefused(where, f"dynamic weight scales ({w.get('dynamic')!r})", _FIX)
        strategy = w.get("strategy")
        if strategy not in ("group", "channel", "tensor"):
            raise ImportRefused(where, f"strategy {strategy!r}: hf_quant imports group, channel and tensor scales",
                                _FIX)
        bits = check_bits(where, w.get("num_bits"), tuple(get_format("int").bits), _FIX)
        symmetric = w.get("symmetric", True)
        if not isinstance(symmetric, bool) or (strategy == "tensor" and not symmetric):
            raise ImportRefused(where, f"symmetric={symmetric!r} with strategy {strategy!r}", _FIX)
        g = w.get("group_size") if strategy == "group" else -1
        if strategy == "group" and (not isinstance(g, int) or isinstance(g, bool) or g <= 0 or in_features % g):
            raise ImportRefused(where, f"group_size {g!r} does not divide in_features={in_features} (the library "
                                "needs equal groups)", _FIX)
        groups = n_groups(g, in_features)
        hf_g = hf_group_size(where, g, in_features, allowed_groups)
        fix = "re-export the checkpoint with llm-compressor / compressed-tensors"
        shape = ckpt.read(f"{name}.weight_shape", (torch.int64, torch.int32), (2,), fix)
        if shape.tolist() != [out, in_features]:
            raise ImportRefused(f"{name}.weight_shape", f"is {shape.tolist()}, but the model's config makes this "
                                f"weight [{out}, {in_features}]", fix)
        packed = ckpt.read(f"{name}.weight_packed", (torch.int32,), (out, packed_words(in_features, bits)), fix)
        scale_shape = (out, groups) if strategy != "tensor" else tuple(ckpt.shape(f"{name}.weight_scale")
                                                                       if f"{name}.weight_scale" in ckpt else ())
        if strategy == "tensor" and scale_shape not in ((), (1,)):
            raise ImportRefused(f"{name}.weight_scale", f"has shape {list(scale_shape)}, expected [1]", fix)
        scale = fp16_scales(f"{name}.weight_scale", ckpt.read(
            f"{name}.weight_scale", (torch.float16, torch.bfloat16, torch.float32), scale_shape, fix))
        scale = scale.reshape(-1, 1).expand(out, 1).contiguous() if strategy == "tensor" else scale
        zp_key = f"{name}.weight_zero_point"
        if symmetric:
            if zp_key in ckpt:  # the library subtracts a stored zero-point even when symmetric: it must be 0
                zp = ckpt.read(zp_key, (torch.int8, torch.int32, torch.int64), None, fix)
                if zp.numel() and (zp != 0).any():
                    raise ImportRefused(zp_key, "a symmetric scheme with non-zero zero-points", fix)
            zero = None
        else:
            zp = ckpt.read(zp_key, (torch.int32,), (packed_words(out, bits), groups), fix)
            zero = unpack_int32(zp, bits, out, dim=0).float()  # zp + 2**(b-1): hf_quant's zero-point
        if f"{name}.weight_g_idx" in ckpt:
            g_idx = ckpt.read(f"{name}.weight_g_idx", (torch.int32, torch.int64), (in_features,), fix)
            check_g_idx(f"{name}.weight_g_idx", g_idx, g, in_features, groups)
        codes = unpack_int32(packed, bits, in_features, dim=1).to(torch.uint8)
        return ImportedWeight(codes.contiguous(), scale, None if zero is None else zero.contiguous(), bits, hf_g,
                              self.method)


def _matchers(where: str, targets: list[str]) -> list:
    """Each target as the library matches it: "re:" + regex (re.match), else the exact name or a class name."""
    out = []
    for t in targets:
        if t.startswith("re:"):
            try:
                _regexes(f"{where}: target", [t[3:]])  # untrusted: judged before it is ever matched
            except ValueError as e:
                raise ImportRefused(where, str(e), "list the module names instead of the pattern") from None
            out.append(re.compile(t[3:]))
        else:
            out.append(t)
    return out


def _matches(matchers: list, name: str, module) -> bool:
    classes = {c.__name__ for c in type(module).__mro__} if module is not None else set()
    for m in matchers:
        if isinstance(m, str):
            if m == name or m in classes:
                return True
        elif m.match(name):
            return True
    return False
