"""AWQ checkpoints in AutoAWQ's GEMM layout (quant_method "awq", version "gemm"; what transformers, vLLM and SGLang
read as AWQ).

Layout of a Linear weight [out, in], 4 bits, group size g (in % g == 0):

    qweight  int32    [in, out / 8]     8 codes per word along `out`, in AWQ's interleaved order: field j (bits
                                        [4j, 4j + 4)) of word w holds column 8w + [0, 2, 4, 6, 1, 3, 5, 7][j]
    qzeros   int32    [in / g, out / 8] zero-points, packed the same way
    scales   float16  [in / g, out]

decoded w[o, i] = (q - z) * s (AutoAWQ's `dequantize_gemm`: unpack, reverse the order, subtract, multiply in
float16): hf_quant's codes, float16 scales and integer zero-points as they are, so hf_quant's float32 dequantization
is exactly (q - z) * s, and AutoAWQ's float16 decode is its float16 rounding.

Refused: versions other than GEMM (GEMV, GEMV-fast, Marlin, ...: other packings), the llm-awq backend's layout,
zero_point=False, bits other than 4, group sizes hf_quant lacks or that do not divide `in`, out % 8 != 0, and tensors
whose dtype or shape does not match the config. `modules_to_not_convert` entries (substrings of module names, as
AutoAWQ matches them) stay float.
"""

from __future__ import annotations

import torch

from ..export.packing import unpack_int32
from .common import ImportedWeight, ImportRefused, check_bits, fp16_scales, hf_group_size, int_codes

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field j of a word holds column AWQ_ORDER[j] of its 8
_FIX = "re-export the checkpoint with AutoAWQ (version 'gemm')"


class AWQSource:
    name = "AWQ"
    quantized_only = ("qzeros",)  # other tensors marking a quantized module
    marker = "qweight"
    tensors = ("qweight", "qzeros", "scales")
    method = "awq"

    def __init__(self, qc: dict, where: str):
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ImportRefused(where, f"AWQ version {qc.get('version')!r}: hf_quant imports AutoAWQ's GEMM layout "
                                "only (GEMV and the kernel-specific versions pack codes differently)",
                                "convert the checkpoint to AutoAWQ's GEMM version, or load it with its own library")
        backend = str(qc.get("backend", "autoawq")).lower()
        if backend != "autoawq":
            raise ImportRefused(where, f"AWQ backend {qc.get('backend')!r}: hf_quant reads AutoAWQ's layout",
                                "convert the checkpoint with AutoAWQ")
        if qc.get("zero_point", True) is not True:
            raise ImportRefused(where, "zero_point=False: AutoAWQ's GEMM layout stores zero-points; a checkpoint "
                                "without them is not one hf_quant can read exactly", _FIX)
        self.bits = qc.get("bits", qc.get("w_bit"))
        self.group_size = qc.get("group_size", qc.get("q_group_size", 128))
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or not (
                self.group_size == -1 or self.group_size > 0):
            raise ImportRefused(where, f"group_size {self.group_size!r} is not -1 or a positive int", _FIX)
        skip = qc.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
            raise ImportRefused(where, f"modules_to_not_convert must be a list of names, got {skip!r}", _FIX)
        self.skip = skip

    def kept_float(self, name: str) -> bool:
        return any(key in name for key in self.skip)  # AutoAWQ's substring match

    def read(self, ckpt, name: str, out: int, in_features: int, allowed_groups) -> ImportedWeight:
        if self.kept_float(name):
            raise ImportRefused(name, "modules_to_not_convert keeps this module in float but the checkpoint stores "
                                "it packed (qweight)", _FIX)
        bits = check_bits(name, self.bits, (4,), "AutoAWQ's GEMM layout is 4-bit; load other widths with their "
                          "own library")
        g = in_features if self.group_size == -1 else self.group_size
        if in_features % g or out % 8:
            raise ImportRefused(name, f"weight [{out}, {in_features}] with group_size {g}: AWQ's GEMM layout needs "
                                "in_features % group_size == 0 and out_features % 8 == 0", _FIX)
        hf_g = hf_group_size(name, self.group_size, in_features, allowed_groups)
        groups = in_features // g
        qweight = int_codes(f"{name}.qweight", ckpt.read(f"{name}.qweight", (torch.int32,), (in_features, out // 8),
                                                         _FIX))
        qzeros = ckpt.read(f"{name}.qzeros", (torch.int32,), (groups, out // 8), _FIX)
        scales = ckpt.read(f"{name}.scales", (torch.float16, torch.bfloat16, torch.float32), (groups, out), _FIX)
        codes = _unpack_awq(qweight, out).t()  # [out, in]
        zero = _unpack_awq(qzeros, out).t().float()  # [out, groups]
        scale = fp16_scales(f"{name}.scales", scales).t().contiguous()
        return ImportedWeight(codes.to(torch.uint8).contiguous(), scale, zero.contiguous(), bits, hf_g, self.method)


def _unpack_awq(words: torch.Tensor, out: int) -> torch.Tensor:
    """[rows, out / 8] words -> [rows, out] codes in column order (AutoAWQ's unpack + reverse order)."""
    fields = unpack_int32(words, 4, out, dim=1)  # field j of word w at position 8w + j
    column_of_field = torch.tensor(AWQ_ORDER).repeat(out // 8) + torch.arange(out).div(8, rounding_mode="floor") * 8
    codes = torch.empty_like(fields)
    codes[:, column_of_field] = fields
    return codes
