"""`QuantScheme`: the settings one weight tensor is quantized with, resolved from `HfQuantConfig`.

Format-specific rules (which bits, planes, symmetric and double_quant values a format accepts) belong to the format
object (`format.Format.validate`); this module checks the fields every format shares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .format import Format, format_names, get_format

GROUP_SIZES = (32, 64, 128, 256, -1)
METHODS = ("rtn", "mse", "gptq", "awq")
CALIBRATION_METHODS = ("gptq", "awq")
MAX_OUTLIERS_PER_ROW = 1024
MAX_LOWRANK_RANK = 1024


@dataclass(frozen=True)
class QuantScheme:
    """How one weight is stored.

    format: the name of a registered `Format`: "int" (affine integer), "nf4", "fp4" (E2M1), "fp8" (E4M3) codebooks,
        "ternary" trit-planes or "vq" vector codebooks.
    bits: code width; for codebook formats it is implied by the format.
    group_size: weights along the input dimension sharing one scale; -1 means one scale per output channel.
    symmetric: int only; zero-point fixed at 2**(bits-1) and not stored.
    method: "mse" (data-free error-minimizing scales/zeros), "rtn" (round to nearest, min/max scales) or "gptq"
        (calibrated, hf_quant.algorithms.gptq) or "awq" (activation-aware scales folded into the preceding
        norm/linear, then the mse search; hf_quant.algorithms.awq). The stored layout is the same for all.
    double_quant: store scales (and zero-points) as 8-bit codes with a float16 scale/offset per 64 of them.
    lowrank_rank: > 0 adds a low-rank correction W += U V (U [out, r], V [r, in], float16) stored beside the codes
        (formats/lowrank.py).
    planes: format "ternary": 1 or 2 trit-planes {-1, 0, +1}, each with its own per-group scale
        (formats/ternary.py); format "vq": 1 or 2 residual codebooks (formats/vq.py).
    outliers_per_row: > 0 keeps that many weights per output row exactly (float16 residuals with int16 column
        indices, SpQR-style sparse outliers; formats/sparse.py) beside the low-bit codes.

    Fields beyond the first six are extensions: `to_dict` leaves them out at their defaults, so the metadata of
    checkpoints that do not use them is unchanged.
    """

    format: str = "int"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    method: str = "mse"
    double_quant: bool = False
    lowrank_rank: int = 0
    planes: int = 1
    outliers_per_row: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            check_scheme_field(f.name, getattr(self, f.name))
        self.codec.validate(self)

    @property
    def codec(self) -> Format:
        """The registered `Format` object of this scheme's format (its layout, coding and checks)."""
        return get_format(self.format)

    @property
    def has_zero(self) -> bool:
        return self.codec.has_zero(self)

    @property
    def label(self) -> str:
        return self.codec.label(self)

    def describe(self) -> str:
        """Short name of the stored form, e.g. 'int4 g128', 'int8-sym ch', 'nf4 g64 dq', 'int4 g64 lowrank_rank=8'
        (any other setting that differs from its default is appended as name=value)."""
        group = "ch" if self.group_size == -1 else f"g{self.group_size}"
        extra = "".join(f" {f.name}={getattr(self, f.name)}" for f in fields(self)
                        if f.name not in _DESCRIBED_FIELDS and getattr(self, f.name) != f.default)
        return f"{self.label} {group}{' dq' if self.double_quant else ''}{extra}"

    def group_layout(self, in_features: int) -> tuple[int, int, int]:
        """(group size, number of groups, padded in_features). Padding is zero-filled and cropped on dequantize."""
        g = in_features if self.group_size == -1 else self.group_size
        n_groups = -(-in_features // g)
        return g, n_groups, n_groups * g

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in EXTENSION_FIELDS:
            if d[name] == QuantScheme.__dataclass_fields__[name].default:
                del d[name]
        return d


SCHEME_FIELDS = tuple(f.name for f in fields(QuantScheme))
_DESCRIBED_FIELDS = ("format", "bits", "group_size", "symmetric", "method", "double_quant")
EXTENSION_FIELDS = ("lowrank_rank", "planes", "outliers_per_row")
# The output head's settings under HfQuantConfig(lm_head="int8") (its default): 8-bit integer codes, one scale per
# output channel, symmetric, rounded data-free (calibration covers the decoder blocks only). Every field that could
# change the stored layout is explicit, so the config's own format, width or additive terms do not reach the head.
HEAD_INT8 = {"format": "int", "bits": 8, "group_size": -1, "symmetric": True, "method": "mse", "double_quant": False,
             "lowrank_rank": 0, "outliers_per_row": 0}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_choice(field: str, value, allowed) -> None:
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
        raise ValueError(f"{field} must be one of {list(allowed)}, got {value!r}")
    if value not in allowed:
        raise ValueError(f"{field} must be one of {list(allowed)}, got {value!r}")


def _bits_choices() -> list[int]:
    return sorted({b for name in format_names() for b in get_format(name).bits})


def check_scheme_field(name: str, value: Any) -> None:
    """Type and range check of one scheme field on its own (the rules between fields are the format's)."""
    if name == "format":
        get_format(value)
    elif name == "bits":
        if not _is_int(value) or value not in _bits_choices():
            per_format = ", ".join(f"{n}: {sorted(get_format(n).bits)}" for n in format_names())
            raise ValueError(f"bits must be an int accepted by the format ({per_format}), got {value!r}")
    elif name == "group_size":
        if not _is_int(value) or value not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {list(GROUP_SIZES)} (-1: one group per row), got {value!r}")
    elif name == "method":
        if not isinstance(value, str) or value not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {value!r}")
    elif name in ("symmetric", "double_quant"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool (True or False), got {value!r}")
    elif name == "lowrank_rank":
        if not _is_int(value) or not 0 <= value <= MAX_LOWRANK_RANK:
            raise ValueError(f"lowrank_rank must be an int in [0, {MAX_LOWRANK_RANK}] (0: no low-rank correction), "
                             f"got {value!r}")
    elif name == "outliers_per_row":
        if not _is_int(value) or not 0 <= value <= MAX_OUTLIERS_PER_ROW:
            raise ValueError(f"outliers_per_row must be an int in [0, {MAX_OUTLIERS_PER_ROW}] (0: none), got {value!r}")
    elif name == "planes":
        if not _is_int(value) or value not in (1, 2):
            raise ValueError(f"planes must be 1 or 2 (ternary trit-planes / vq codebooks), got {value!r}")
    else:
        raise ValueError(f"unknown scheme field {name!r}; fields: {list(SCHEME_FIELDS)}")


def default_bits(format_name: str) -> int:
    return get_format(format_name).default_bits


def resolve_scheme(inherited: Mapping[str, Any], settings: Mapping[str, Any]) -> QuantScheme:
    """The scheme of `settings` (an override, a candidate) over the `inherited` field values. Switching format
    takes the new format's default width, and drops inherited `symmetric` / `planes` / `group_size` values it does not
    accept (given explicitly they are an error, not dropped)."""
    for name, value in settings.items():
        check_scheme_field(name, value)
    values = {f: inherited[f] for f in SCHEME_FIELDS}
    if "format" in settings:
        fmt = get_format(settings["format"])
        if "bits" not in settings and len(fmt.bits) == 1:  # a codebook's fixed width; int keeps the inherited one
            values["bits"] = fmt.default_bits
        if "symmetric" not in settings and values["symmetric"] not in fmt.symmetric:
            values["symmetric"] = fmt.symmetric[0]
        if "planes" not in settings and values["planes"] not in fmt.planes:
            values["planes"] = fmt.planes[0]
        if "group_size" not in settings and fmt.group_sizes and values["group_size"] not in fmt.group_sizes:
            values["group_size"] = fmt.group_sizes[0]
    values.update(settings)
    return QuantScheme(**values)
