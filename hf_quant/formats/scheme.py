"""`QuantScheme`: the settings one weight tensor is quantized with, resolved from `HfQuantConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

FORMATS = ("int", "nf4", "fp4", "fp8")
INT_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128, 256, -1)
METHODS = ("rtn", "mse")
# Bit width each codebook format is fixed to.
CODEBOOK_BITS = {"nf4": 4, "fp4": 4, "fp8": 8}


@dataclass(frozen=True)
class QuantScheme:
    """How one weight is stored.

    format: "int" (affine integer), "nf4", "fp4" (E2M1) or "fp8" (E4M3) codebooks.
    bits: code width; for codebook formats it is implied by the format.
    group_size: weights along the input dimension sharing one scale; -1 means one scale per output channel.
    symmetric: int only; zero-point fixed at 2**(bits-1) and not stored.
    method: "mse" (data-free error-minimizing scales/zeros) or "rtn" (round to nearest, min/max scales).
    double_quant: store scales (and zero-points) as 8-bit codes with a float16 scale/offset per 64 of them.
    """

    format: str = "int"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    method: str = "mse"
    double_quant: bool = False

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

    @property
    def has_zero(self) -> bool:
        return self.format == "int" and not self.symmetric

    def group_layout(self, in_features: int) -> tuple[int, int, int]:
        """(group size, number of groups, padded in_features). Padding is zero-filled and cropped on dequantize."""
        g = in_features if self.group_size == -1 else self.group_size
        n_groups = -(-in_features // g)
        return g, n_groups, n_groups * g

    def to_dict(self) -> dict:
        return asdict(self)


def check_choice(field: str, value, allowed) -> None:
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
        raise ValueError(f"{field} must be one of {list(allowed)}, got {value!r}")
    if value not in allowed:
        raise ValueError(f"{field} must be one of {list(allowed)}, got {value!r}")
