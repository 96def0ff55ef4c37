"""What the importers share: the refusal error, the checkpoint's tensors read with their dtype and shape checked
before use, and one imported weight (codes, scales, zero-points) in hf_quant's canonical terms."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..export.exporter import lines_by_fix
from ..formats.scalar import FP16_TINY


class ImportRefused(ValueError):
    """A foreign checkpoint (or one of its modules or tensors) that hf_quant cannot hold exactly: `where` names the
    module, tensor or file, `reason` says why, `fix` what to do about it."""

    def __init__(self, where: str, reason: str, fix: str):
        self.where, self.reason, self.fix = where, reason, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}. Fix: {self.fix}"


class ImportRefusedModules(ImportRefused):
    """Every refusal of one checkpoint (`refusals`), grouped by fix in the message (up to SHOWN per group)."""

    SHOWN = 8

    def __init__(self, source: str, path: str, refusals: list[ImportRefused]):
        self.refusals = refusals
        lines = [f"cannot import {len(refusals)} module(s)/tensor(s) of the {source} checkpoint {path} exactly:"]
        lines += lines_by_fix(refusals, lambda r: r.where, self.SHOWN, "ImportRefusedModules")
        super().__init__(path, "\n".join(lines), "see each group's fix above")

    def __str__(self) -> str:
        return self.reason


@dataclass
class ImportedWeight:
    """One foreign weight in hf_quant's terms: unsigned codes and the affine-integer scheme settings, such that
    (codes - zero) * scale is the foreign reader's decoding."""

    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # float32 [out, n_groups], each value exact in float16
    zero: torch.Tensor | None  # float32 [out, n_groups] integer zero-points; None: symmetric (2**(bits-1))
    bits: int
    group_size: int  # hf_quant's: 32, 64, 128, 256 or -1 (one group per row)
    method: str  # how the foreign library made the codes, as hf_quant names it (a label only)


class Checkpoint:
    """The safetensors tensors of a checkpoint folder: headers read once (`model.checkpoint.read_headers`: safetensors
    only, no key stored twice), each tensor's dtype and shape checked against what its reader expects before it is
    read."""

    def __init__(self, headers: dict[str, tuple[str, object, tuple[int, ...]]]):
        self.headers = headers
        self.consumed: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.headers

    def keys(self) -> Iterable[str]:
        return self.headers.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.headers[key][2]

    def dtype(self, key: str):
        return self.headers[key][1]

    def read(self, key: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...] | None,
             fix: str = "re-export the checkpoint with the library that wrote it") -> torch.Tensor:
        """The tensor `key`, refused (naming it) unless its dtype is one of `dtypes` and its shape is `shape`."""
        if key not in self.headers:
            raise ImportRefused(key, "the tensor is missing from the checkpoint", fix)
        path, dtype, stored = self.headers[key]
        if dtype not in dtypes:
            raise ImportRefused(key, f"stored as {dtype}, expected {' or '.join(map(str, dtypes))}", fix)
        if shape is not None and tuple(stored) != tuple(shape):
            raise ImportRefused(key, f"has shape {list(stored)}, expected {list(shape)} (from the model's config and "
                                "the quantization settings)", fix)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            tensor = f.get_tensor(key)
        self.consumed.add(key)
        return tensor


def hf_group_size(where: str, group_size: int, in_features: int, allowed: tuple[int, ...]) -> int:
    """hf_quant's group size for a foreign one (-1: one group per row): the same when hf_quant has it, else -1 when
    one group spans the whole row, else refused."""
    if group_size in allowed:
        return group_size
    if group_size >= in_features:
        return -1
    raise ImportRefused(where, f"group size {group_size} (in_features={in_features}): hf_quant's group sizes are "
                        f"{[g for g in allowed if g != -1]} or one group per row",
                        "keep this module in float (load it with its own library and dequantize), or requantize it "
                        "with hf_quant")


def n_groups(group_size: int, in_features: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def check_bits(where: str, bits, allowed: tuple[int, ...], fix: str) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in allowed:
        raise ImportRefused(where, f"{bits!r}-bit codes: hf_quant imports {', '.join(map(str, sorted(allowed)))}-bit "
                            "integer codes from this layout", fix)
    return bits


def fp16_scales(key: str, scale: torch.Tensor) -> torch.Tensor:
    """float32 scales from stored ones, refused unless every value is a positive normal float16 (hf_quant stores
    float16 scales; any other value would decode differently)."""
    if scale.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ImportRefused(key, f"scales stored as {scale.dtype}", "store float16, bfloat16 or float32 scales")
    s = scale.float()
    if not torch.isfinite(s).all() or not (s > 0).all():
        bad = s[~(torch.isfinite(s) & (s > 0))][0]
        raise ImportRefused(key, f"a scale is {float(bad)!r} (scales must be finite and > 0)",
                            "the checkpoint is damaged or was not written by a quantizer; re-download or re-export it")
    exact = s.to(torch.float16).float() == s
    if not exact.all() or (s < FP16_TINY).any():
        bad = s[~exact | (s < FP16_TINY)][0]
        raise ImportRefused(key, f"scale {float(bad):.9g} is not a normal float16 value (hf_quant stores float16 "
                            f"scales >= {FP16_TINY:.3g}); importing would change the weights",
                            "load this checkpoint with its own library (transformers / vLLM), or keep the module in "
                            "float")
    return s


def int_codes(key: str, t: torch.Tensor, dtypes=(torch.int32,)) -> torch.Tensor:
    if t.dtype not in dtypes:
        raise ImportRefused(key, f"stored as {t.dtype}, expected {' or '.join(map(str, dtypes))}",
                            "re-export the checkpoint with the library that wrote it")
    return t


def check_g_idx(key: str, g_idx: torch.Tensor, group_size: int, in_features: int, groups: int) -> None:
    """A stored group index must be i // group_size: hf_quant's groups are contiguous runs of columns."""
    if g_idx.dim() != 1 or g_idx.numel() != in_features:
        raise ImportRefused(key, f"has shape {list(g_idx.shape)}, expected [{in_features}]",
                            "re-export the checkpoint with the library that wrote it")
    g = g_idx.to(torch.int64)
    if (g < 0).any() or (g >= groups).any():
        raise ImportRefused(key, f"group indices outside [0, {groups}) (e.g. {int(g[(g < 0) | (g >= groups)][0])})",
                            "the checkpoint is damaged; re-download or re-export it")
    expected = torch.arange(in_features, dtype=torch.int64) // (in_features if group_size == -1 else group_size)
    if torch.equal(g, expected):
        return
    counts = torch.bincount(g, minlength=groups)
    if group_size != -1 and (counts[: groups - 1] == group_size).all():
        raise ImportRefused(key, "activation-order (desc_act) group indices: column i is not in group i // "
                            f"{group_size}, and hf_quant's groups are contiguous columns (no per-column group index)",
                            "use a checkpoint quantized without desc_act/actorder='group' (or with static groups), or "
                            "load it with its own library")
    raise ImportRefused(key, "inconsistent group indices (groups do not hold group_size columns each)",
                        "the checkpoint is damaged; re-download or re-export it")
