"""The compressed-tensors target (llm-compressor's format; vLLM, SGLang and transformers load it).

Layout, as the compressed-tensors library (0.20, `PackedQuantizationCompressor`, format "pack-quantized") writes and
reads it, for a Linear weight [out, in] with `num_bits` b:

    weight_packed      int32  [out, ceil(in * b / 32)]   codes as one LSB-first bit stream of 32-bit words per row
                                                         (dense: 3/5/6/7-bit codes straddle words), each code stored
                                                         as q + 2**(b-1), q its signed value in [-2**(b-1), 2**(b-1))
    weight_scale       float  [out, n_groups]           (channel strategy: [out, 1])
    weight_zero_point  int32  [ceil(out * b / 32), n_groups]  asymmetric only: signed zero-points zp, packed like
                                                         the codes (zp + 2**(b-1)) but along the output dimension
    weight_shape       int64  [2]                       (out, in)

and decodes w = (q - zp) * scale, computed in the scale's dtype (symmetric: zp = 0). With hf_quant's unsigned codes
c = q + 2**(b-1) and zero-point z = zp + 2**(b-1) that is (c - z) * scale: hf_quant's own decoding, the packed code
fields are hf_quant's codes and the packed zero-point fields hf_quant's integer zero-points unchanged (symmetric:
hf_quant's implied zero-point 2**(b-1) is the library's zp = 0).

Groups must divide `in` (the library's group strategy reshapes the row into equal groups). FP8 (E4M3) weights
export as format "naive-quantized": `weight` float8_e4m3fn [out, in] and `weight_scale`, decoded as
weight.to(scale dtype) * scale.

Exactness: the scales are written in `scale_dtype`, float16 by default (hf_quant's own scale precision). The
library then decodes in float16: the float16 rounding of hf_quant's float32 weight, bit for bit (hf_quant's
float32 product (c - z) * s is exact, c - z having at most 9 bits and s 11). A loader that casts the scales to a
float32 model decodes hf_quant's float32 weight bit for bit; `scale_dtype=torch.float32` stores float32 scales
(double-quantized scales, which decode to float32 values, are exact only so). A bfloat16 model rounds the scales to
bfloat16 on load (transformers and vLLM create the scale parameter in the model's dtype): serve in float16 or
float32 for hf_quant's exact weights.
"""

from __future__ import annotations

import json
from collections import Counter

import torch

from ..formats.scalar import ExportRefused
from ..version import __version__
from .packing import pack_int32

PACK_QUANTIZED = "pack-quantized"
NAIVE_QUANTIZED = "naive-quantized"


def _group_check(scheme, shape):
    *lead, out, in_features = shape
    if lead:
        raise ExportRefused(f"stacked expert weights {tuple(shape)} are not exported yet (compressed-tensors stores "
                            "one tensor per expert, under the per-expert module names)",
                            "quantize with quantize_experts=False (experts kept in float) to export the rest")
    g = scheme.group_size
    if g != -1 and in_features % g:
        raise ExportRefused(f"in_features={in_features} is not a multiple of group_size={g}: hf_quant's last group "
                            f"of each row is short ({in_features % g} columns) and compressed-tensors' group strategy "
                            "needs equal groups",
                            f"quantize this module with a group_size dividing {in_features} (or group_size=-1, one "
                            "scale per output channel); requantize=True cannot change the group layout")


def _weight_args(scheme, kind: str, symmetric: bool) -> dict:
    channel = scheme.group_size == -1
    return {
        "num_bits": scheme.bits,
        "type": kind,
        "symmetric": symmetric,
        "group_size": None if channel else scheme.group_size,
        "strategy": "channel" if channel else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": None,
        "observer_kwargs": {},
    }


class CompressedTensorsTarget:
    """Packs what the formats hand over (`Format.export_tensors`) in the compressed-tensors layout (module doc)."""

    name = "compressed-tensors"

    def __init__(self, scale_dtype: torch.dtype = torch.float16):
        if scale_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"scale_dtype must be torch.float16 or torch.float32 for compressed-tensors, got "
                             f"{scale_dtype}")
        self.scale_dtype = scale_dtype
        self.scale_fix = "export with scale_dtype=torch.float32 (compressed-tensors stores float32 scales exactly)"

    # --- affine integers ("pack-quantized") ---------------------------------------------------------

    def check_affine_int(self, scheme, shape):
        _group_check(scheme, shape)

    def zero_range(self, scheme):
        maxq = (1 << scheme.bits) - 1
        return 0, maxq, f"compressed-tensors stores zero-points as {scheme.bits}-bit integers", (
            "quantize with symmetric=True or method='rtn' (zero-points within the code range)")

    def affine_int(self, scheme, codes, scale, zero, shape):
        out, in_features = shape
        tensors = {
            "weight_packed": pack_int32(codes, scheme.bits, dim=-1),
            "weight_scale": scale.to(self.scale_dtype).contiguous(),
            "weight_shape": torch.tensor([out, in_features], dtype=torch.int64),
        }
        if zero is not None:
            tensors["weight_zero_point"] = pack_int32(zero.to(torch.int64), scheme.bits, dim=0)
        description = {"weights": _weight_args(scheme, "int", zero is None), "input_activations": None,
                       "output_activations": None, "format": PACK_QUANTIZED}
        return tensors, description

    # --- float8 E4M3 ("naive-quantized") -------------------------------------------------------------

    def check_float8_e4m3(self, scheme, shape):
        _group_check(scheme, shape)

    def float8_e4m3(self, scheme, codes, scale, shape):
        tensors = {"weight": codes.contiguous().view(torch.float8_e4m3fn),
                   "weight_scale": scale.to(self.scale_dtype).contiguous()}
        description = {"weights": _weight_args(scheme, "float", True), "input_activations": None,
                       "output_activations": None, "format": NAIVE_QUANTIZED}
        return tensors, description

    # --- the checkpoint -----------------------------------------------------------------------------

    def quantization_config(self, model, schemes: dict[str, dict], float_linears: list[str]) -> tuple[dict, dict]:
        """(config.json's quantization_config, {file name: JSON} of extra files). One config group per distinct
        scheme, its targets the exact module names; every float linear is listed in `ignore` (vLLM requires each
        linear layer to match a group or be ignored)."""
        groups: dict[str, dict] = {}
        by_scheme: dict[str, tuple[dict, list[str]]] = {}
        for name, description in schemes.items():
            key = json.dumps(description, sort_keys=True)
            by_scheme.setdefault(key, (description, []))[1].append(name)
        # largest group first, named group_0, group_1, ...
        for i, (description, names) in enumerate(sorted(by_scheme.values(), key=lambda v: -len(v[1]))):
            groups[f"group_{i}"] = {"targets": sorted(names), **description}
        formats = Counter(d["format"] for d in schemes.values())
        config = {
            "quant_method": "compressed-tensors",
            "format": next(iter(formats)) if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": sorted(float_linears),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
            "version": _library_version(),
            # a dict, as ModelOpt writes it: vLLM reads quantization_config["producer"]["name"]
            "producer": {"name": "hf_quant", "version": __version__},
        }
        return config, {}


def _library_version() -> str:
    """The compressed-tensors version the layout was checked against (the installed one when present)."""
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # noqa: BLE001 - the library is optional: the layout does not depend on it
        return "0.20.1"
