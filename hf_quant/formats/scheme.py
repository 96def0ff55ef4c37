"""`QuantScheme`: the settings one weight tensor is quantized with, resolved from `HfQuantConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

FORMATS = ("int", "nf4", "fp4", "fp8", "ternary", "vq")
INT_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128, 256, -1)
METHODS = ("rtn", "mse", "gptq", "awq")
# Bit width each codebook format is fixed to.
# ternary: 2-bit codes unpacked, 5 trits a byte stored; vq: 8-bit indices of 8-weight vectors (1 bit per weight)
CODEBOOK_BITS = {"nf4": 4, "fp4": 4, "fp8": 8, "ternary": 2, "vq": 8}
# Formats made of additive stages (`planes`): ternary trit-planes, residual VQ codebooks.
PLANE_FORMATS = ("ternary", "vq")


@dataclass(frozen=True)
class QuantScheme:
    """How one weight is stored.

    format: "int" (affine integer), "nf4", "fp4" (E2M1) or "fp8" (E4M3) codebooks.
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
        check_choice("format", self.format, FORMATS)
        if self.format == "int":
            check_choice("bits", self.bits, INT_BITS)
        elif self.bits != CODEBOOK_BITS[self.format]:
            raise ValueError(
                f"bits={self.bits!r} does not fit format={self.format!r}: {self.format} codes are "
                f"{CODEBOOK_BITS[self.format]} bits (leave `bits` unset or set it to {CODEBOOK_BITS[self.format]})"
            )
        check_choice("group_size", self.group_size, GROUP_SIZES)
        check_choice("method", self.method, METHODS)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be a bool, got {self.double_quant!r}")
        if self.symmetric and self.format != "int":
            raise ValueError(f"symmetric=True only applies to format='int'; {self.format} codebooks are symmetric already")
        check_extension_fields(self)

    @property
    def has_zero(self) -> bool:
        return self.format == "int" and not self.symmetric

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


EXTENSION_FIELDS = ("lowrank_rank", "planes", "outliers_per_row")
MAX_OUTLIERS_PER_ROW = 1024
MAX_LOWRANK_RANK = 1024


def check_extension_fields(scheme: QuantScheme) -> None:
    r = scheme.lowrank_rank
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= MAX_LOWRANK_RANK:
        raise ValueError(f"lowrank_rank must be an int in [0, {MAX_LOWRANK_RANK}] (0: no low-rank correction), got {r!r}")
    k = scheme.outliers_per_row
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_OUTLIERS_PER_ROW:
        raise ValueError(f"outliers_per_row must be an int in [0, {MAX_OUTLIERS_PER_ROW}] (0: none), got {k!r}")
    if isinstance(scheme.planes, bool) or scheme.planes not in (1, 2):
        raise ValueError(f"planes must be 1 or 2 (ternary trit-planes / vq codebooks), got {scheme.planes!r}")
    if scheme.planes != 1 and scheme.format not in PLANE_FORMATS:
        raise ValueError(f"planes={scheme.planes} only applies to formats {list(PLANE_FORMATS)} (got format={scheme.format!r})")
    if scheme.format in PLANE_FORMATS and scheme.double_quant:
        raise ValueError(f"double_quant=True does not apply to format={scheme.format!r} (its scales are float16); leave it False")


def check_choice(field: str, value, allowed) -> None:
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
        raise ValueError(f"{field} must be one of {list(allowed)}, got {value!r}")
    if value not in allowed:
        raise ValueError(f"{field} must be one of {list(allowed)}, got {value!r}")
