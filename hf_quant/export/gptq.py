"""The GPTQ target (AutoGPTQ's layout, checkpoint_format "gptq", i.e. GPTQ v1; vLLM, SGLang, TGI, GPTQModel and
transformers read it).

Layout of a Linear weight [out, in] with b bits (b in 2, 3, 4, 8) and group size g (in % g == 0; g = in for one
scale per channel), written as AutoGPTQ's `QuantLinear.pack` writes it and read back as its (and GPTQModel's)
`dequantize_weight` reads it:

    qweight  int32    [in * b / 32, out]   the codes of each output column as one LSB-first bit stream of 32-bit
                                           words along the input dimension (3 bits: 32 codes in 3 words, codes 10
                                           and 21 straddling word boundaries)
    qzeros   int32    [in / g, out * b / 32]  zero-point - 1 per group (the v1 convention), packed the same way
                                           along the output dimension
    scales   float16  [in / g, out]
    g_idx    int32    [in]                 i // g (no activation reordering: desc_act false)

decoded w = scales[g_idx[i]] * (q - (qzeros field + 1)): hf_quant's codes and integer zero-points unchanged
(symmetric: hf_quant's implied zero-point 2**(b-1), stored as 2**(b-1) - 1 like every GPTQ checkpoint). Readers
decode in float16: the float16 rounding of hf_quant's float32 weight, bit for bit (in float32 arithmetic, hf_quant's
float32 weight itself).

Refused: a zero-point of 0 (a group whose weights are all >= 0). v1 would store it as -1: AutoGPTQ and vLLM read each
field on its own and add 1 (giving 2**b), GPTQModel converts whole words to its v2 layout with a carry-propagating
add (giving 0, and shifting the next field): the file would mean different weights to different readers. Also
refused: 5-7 bits (GPTQModel's "planar" packing, read by neither vLLM nor transformers), double-quantized scales
that are not exact in float16, short last groups, and in/out features that are not multiples of 32 (the readers
allocate in // 32 * b rows of qweight and out // 32 * b columns of qzeros).

Mixed precision: the most common (bits, group size) is the config's; other modules are listed in GPTQModel's
`dynamic` overrides ("+:^name$": {"bits", "group_size"}; vLLM reads them too), float linears as "-:^name$".
All modules must share `sym` (a reader ignoring `dynamic` would otherwise misread them silently; differing bits
or group sizes change the tensor shapes, so such a reader fails loudly instead).
"""

from __future__ import annotations

import json
import re
from collections import Counter

import torch

from ..formats.scalar import ExportRefused
from ..version import __version__
from .packing import pack_int32, refuse_stacked

GPTQ_BITS = (2, 3, 4, 8)


class GPTQTarget:
    """Packs what the formats hand over (`Format.export_tensors`) in GPTQ's v1 layout (module doc)."""

    name = "gptq"
    scale_dtype = torch.float16
    scale_fix = "quantize without double_quant (GPTQ stores float16 scales)"

    def check_affine_int(self, scheme, shape):
        refuse_stacked(shape, "GPTQ")
        out, in_features = shape
        if scheme.bits not in GPTQ_BITS:
            raise ExportRefused(f"GPTQ has {', '.join(map(str, GPTQ_BITS))}-bit codes, not {scheme.bits} (GPTQModel's "
                                "5-7-bit planar packing is read by neither vLLM nor transformers)",
                                f"quantize this module with bits in {list(GPTQ_BITS)}, or export to "
                                "compressed-tensors (1-8 bits)")
        if in_features % 32 or out % 32:
            raise ExportRefused(f"GPTQ readers need in_features and out_features that are multiples of 32 (they "
                                f"allocate in // 32 * bits rows of qweight); this weight is [{out}, {in_features}]",
                                "keep this module in float (modules_to_not_convert), or export to compressed-tensors")
        g = scheme.group_size
        if g != -1 and in_features % g:
            raise ExportRefused(f"in_features={in_features} is not a multiple of group_size={g}: hf_quant's last "
                                f"group of each row is short ({in_features % g} columns), GPTQ's groups are equal",
                                f"quantize this module with a group_size dividing {in_features} (or group_size=-1); "
                                "requantize=True cannot change the group layout")

    def zero_range(self, scheme):
        maxq = (1 << scheme.bits) - 1
        return 1, maxq, ("GPTQ v1 stores zero-point - 1, so a zero-point of 0 (a group of weights all >= 0) would be "
                         "stored as -1, which AutoGPTQ/vLLM and GPTQModel decode differently"), (
            "quantize with symmetric=True, or export to compressed-tensors (which stores zero-points as they are)")

    def affine_int(self, scheme, codes, scale, zero, shape):
        out, in_features = shape
        g = in_features if scheme.group_size == -1 else scheme.group_size
        if zero is None:
            zero = torch.full_like(scale, float(1 << (scheme.bits - 1)))
        tensors = {
            "qweight": pack_int32(codes.t(), scheme.bits, dim=0),
            "qzeros": pack_int32((zero.to(torch.int64) - 1).t(), scheme.bits, dim=1),
            "scales": scale.t().to(torch.float16).contiguous(),
            "g_idx": (torch.arange(in_features, dtype=torch.int32) // g).to(torch.int32),
        }
        return tensors, {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.symmetric}

    def quantization_config(self, model, schemes: dict[str, dict], float_linears: list[str]) -> tuple[dict, dict]:
        syms = {d["sym"] for d in schemes.values()}
        if len(syms) > 1:
            asym = sorted(n for n, d in schemes.items() if not d["sym"])
            raise ExportRefused(
                f"GPTQ has one `sym` per checkpoint, and these modules are asymmetric while others are symmetric: "
                f"{asym[:8]}{' ...' if len(asym) > 8 else ''}",
                "quantize all modules symmetric or all asymmetric, or export to compressed-tensors (one group per "
                "scheme)")
        counts = Counter((d["bits"], d["group_size"]) for d in schemes.values())
        (bits, group_size), _ = counts.most_common(1)[0]
        head = _output_head_name(model)
        dynamic = {}
        for name in sorted(schemes):
            d = schemes[name]
            if (d["bits"], d["group_size"]) != (bits, group_size):
                dynamic[f"+:^{re.escape(name)}$"] = {"bits": d["bits"], "group_size": d["group_size"]}
        for name in sorted(float_linears):
            if name != head:
                dynamic[f"-:^{re.escape(name)}$"] = {}
        config = {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",  # GPTQModel, vLLM, optimum
            "format": "gptq",  # transformers 5's name for it
            "bits": bits,
            "group_size": group_size,
            "desc_act": False,
            "sym": syms.pop(),
            "static_groups": False,
            "true_sequential": True,
            "damp_percent": 0.01,
            "lm_head": head in schemes,
            "meta": {"quantizer": [f"hf_quant:{__version__}"]},
        }
        if dynamic:
            config["dynamic"] = dynamic
        return config, {"quantize_config.json": json.loads(json.dumps(config))}


def _output_head_name(model) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None
