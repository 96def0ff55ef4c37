"""`Format`: one object per weight format, owning everything about it, and the registry keyed by its name.

A format declares which settings it accepts (`bits`, `planes`, `symmetric`, `double_quant`), the tensors it stores
for a weight of a given shape (`specs`), how they decode (`dequantize`), how a float weight is coded without data
(`quantize`) and with GPTQ's error feedback (`gptq`), which stored values are invalid (`value_checks`) and how it is
named in reports (`label`). No other module branches on a format's name: kernels and exporters ask the format's
declared traits (`affine_int`, `codebook`), everything else calls its methods.

`AdditiveTerm`s (sparse outliers, low-rank factors) are corrections stored beside any format's codes; they too own
their tensors, decoding, fit and checks, and are active when their scheme field is non-zero.

Registering a format (`register_format`) is all a new format needs: QuantScheme validation, HfQuantConfig, the
packed modules, the reference kernel, checkpoints and reports find it through this registry
(tests/test_format_registry.py registers a format from a test file and round-trips a model through it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from .scheme import QuantScheme

TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class GPTQSettings:
    """How GPTQ's error feedback runs (HfQuantConfig's damp / act_order / static_groups / refit_scales)."""

    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = True
    block_size: int = 128
    refit_scales: bool = False


class Format:
    """Base class of the weight formats (see the module doc). Subclasses set the ClassVars and implement the
    methods that raise NotImplementedError."""

    name: ClassVar[str]
    bits: ClassVar[tuple[int, ...]]  # accepted code widths; the first is the default
    planes: ClassVar[tuple[int, ...]] = (1,)  # accepted additive stages (ternary trit-planes, residual codebooks)
    symmetric: ClassVar[tuple[bool, ...]] = (False,)  # accepted `symmetric` values
    double_quant: ClassVar[bool] = False  # whether scales may be stored as 8-bit codes
    # accepted `group_size` values when the format's block layout fixes them (the first is the one a config or an
    # override switching to the format takes when none is given); None: any
    group_sizes: ClassVar[tuple[int, ...] | None] = None
    # Traits kernels and exporters select on (instead of names):
    affine_int: ClassVar[bool] = False  # codes decode as (q - zero) * scale on a `bits`-bit integer grid
    codebook: ClassVar[bool] = False  # codes index a fixed table of `2**bits` values times a per-group scale

    @property
    def default_bits(self) -> int:
        return self.bits[0]

    # --- settings ---------------------------------------------------------------------------------

    def validate(self, scheme: QuantScheme) -> None:
        """Raise ValueError (naming the field and the fix) for settings this format does not accept."""
        if len(self.bits) == 1 and scheme.bits != self.bits[0]:
            raise ValueError(
                f"bits={scheme.bits!r} does not fit format={self.name!r}: {self.name} codes are {self.bits[0]} bits "
                f"(leave `bits` unset or set it to {self.bits[0]})"
            )
        if isinstance(scheme.bits, bool) or scheme.bits not in self.bits:
            raise ValueError(f"bits must be one of {list(self.bits)}, got {scheme.bits!r}")
        if scheme.symmetric not in self.symmetric:
            with_symmetric = [f.name for f in FORMATS.values() if True in f.symmetric]
            raise ValueError(f"symmetric={scheme.symmetric!r} does not apply to format={self.name!r}: symmetric=True "
                             f"only applies to formats {with_symmetric} ({self.name} codes are symmetric already); "
                             "leave symmetric=False")
        if scheme.planes not in self.planes:
            with_planes = [f.name for f in FORMATS.values() if len(f.planes) > 1]
            raise ValueError(f"planes={scheme.planes} only applies to formats {with_planes} (got format={self.name!r})")
        if scheme.double_quant and not self.double_quant:
            raise ValueError(f"double_quant=True does not apply to format={self.name!r} (its scales are float16); "
                             "leave it False")

    def has_zero(self, scheme: QuantScheme) -> bool:
        """Whether a zero-point tensor is stored."""
        return False

    def label(self, scheme: QuantScheme) -> str:
        """Short name in reports and module reprs (e.g. "int4-sym", "nf4")."""
        return self.name

    def stored_bits(self, scheme: QuantScheme) -> int:
        """Width each code takes in the canonical layout's bit packing (`packing.pack_bits`)."""
        return scheme.bits

    # --- layout -----------------------------------------------------------------------------------

    def specs(self, scheme: QuantScheme, shape: tuple[int, ...]) -> TensorSpecs:
        """Names, shapes and dtypes of the stored code tensors of a weight of logical shape [*lead, out, in]."""
        raise NotImplementedError

    def dequantize(self, scheme: QuantScheme, tensors: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        """Reference decoding of the code tensors to a float32 weight [*lead, out, in]."""
        raise NotImplementedError

    def expert_tensors(self, scheme: QuantScheme, tensors: dict[str, torch.Tensor], index: int,
                       shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """One expert's code tensors, of a stacked weight of logical `shape` [experts, out, in] (when `sliceable`)."""
        return {name: t[index] for name, t in tensors.items()}

    def dequantize_expert(self, scheme: QuantScheme, tensors: dict[str, torch.Tensor], index: int,
                          in_features: int) -> torch.Tensor:
        """Expert `index` of a stacked [experts, out, in] weight, decoded from all experts' tensors (only called
        when `sliceable` is False)."""
        raise NotImplementedError

    def sliceable(self, scheme: QuantScheme, shape: tuple[int, ...]) -> bool:
        """Whether one expert's tensors are the [index] slice of a stacked weight's tensors."""
        return True

    def value_checks(self, scheme: QuantScheme, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]):
        """(tensor name, values, mask of valid values, what valid means) for each check of the stored values of a
        weight of logical `shape` that a loader must make (shapes and dtypes are checked before): the checkpoint
        loader raises on the first failing one, naming the tensor. Every float tensor is checked finite and in the
        range hf_quant writes, every index tensor in range."""
        return []

    # --- coding -----------------------------------------------------------------------------------

    def quantize(self, weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        """Data-free coding of a float weight [*lead, out, in] into the stored code tensors."""
        raise NotImplementedError

    def gptq(self, weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme,
             settings: GPTQSettings) -> dict[str, torch.Tensor]:
        """Coding of one weight [out, in] against its input Hessian [in, in] with GPTQ's error feedback."""
        raise NotImplementedError(f"format {self.name!r} has no GPTQ rounding; use a data-free method")

    def gptq_stacked(self, weights: list[torch.Tensor], hessian: torch.Tensor, scheme: QuantScheme,
                     settings: GPTQSettings) -> list[dict[str, torch.Tensor]]:
        """GPTQ of several weights sharing one Hessian (q/k/v); formats whose rows are independent override this to
        run them as one stacked weight (the same codes, one pass)."""
        return [self.gptq(w, hessian, scheme, settings) for w in weights]


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    """Remove a registered format (test-only formats clean up after themselves)."""
    FORMATS.pop(name, None)


def get_format(name) -> Format:
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {name!r}")
    return fmt


def format_names() -> list[str]:
    return list(FORMATS)


class AdditiveTerm:
    """A correction stored beside the codes whose dense value adds to the decoded weight (W = base + term), e.g.
    low-rank factors. A registered term extends every format: its tensors join the specs, `dense` adds to the
    decoded weight, the packed modules add `linear(x)` to the kernel's output, and `fit` quantizes around it."""

    field: ClassVar[str]  # the QuantScheme field that activates it (> 0)

    def active(self, scheme: QuantScheme) -> bool:
        return getattr(scheme, self.field) > 0

    def inner(self, scheme: QuantScheme) -> QuantScheme:
        """The scheme of everything but this term."""
        import dataclasses

        return dataclasses.replace(scheme, **{self.field: 0})

    def specs(self, scheme: QuantScheme, shape: tuple[int, ...]) -> TensorSpecs:
        raise NotImplementedError

    def dense(self, scheme: QuantScheme, tensors: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        """The term as a float32 [*lead, out, in] weight."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """x [M, in] -> the term's output [M, out] (of one matrix), in x's dtype."""
        raise NotImplementedError

    def fit(self, weight: torch.Tensor, scheme: QuantScheme, quantize_rest, hessian: torch.Tensor | None,
            settings: GPTQSettings | None) -> dict[str, torch.Tensor]:
        """Stored tensors of `weight` under `scheme`: this term's plus those `quantize_rest(weight, self.inner(scheme))`
        gives for the rest. `hessian` is the input Hessian when calibrating (None: data-free)."""
        raise NotImplementedError

    def value_checks(self, scheme: QuantScheme, tensors: dict[str, torch.Tensor], shape: tuple[int, ...]):
        """As `Format.value_checks`, for this term's tensors."""
        return []


# Registration order is storage order; fitting runs the other way (the last registered term is fitted outermost).
ADDITIVE_TERMS: list[AdditiveTerm] = []


def register_additive_term(term: AdditiveTerm) -> AdditiveTerm:
    ADDITIVE_TERMS.append(term)
    return term


def active_terms(scheme: QuantScheme) -> list[AdditiveTerm]:
    return [t for t in ADDITIVE_TERMS if t.active(scheme)]
