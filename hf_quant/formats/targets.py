"""Serving targets: what a quantization recipe must stay within so that `hf_quant.export` writes it exactly for an
engine (`HfQuantConfig(target=...)`). Each target lists the defaults it sets for fields the user did not give and
checks every scheme the config can produce (`check_scheme`) and every module's shape (`check_shape`); the export
targets (hf_quant/export) remain the authority on what they hold, and tests check that a config accepted here
exports without refusals.

    gguf  llama.cpp / ollama: int 4, 5 or 8 bits, symmetric, group_size 32 (Q4_0 / Q5_0 / Q8_0 blocks), or
          format "kquant" (Q4_K / Q5_K / Q6_K super-blocks of 256; in_features a multiple of 256), alone or mixed
          through `overrides` (llama.cpp's Q4_K_M mixes K-quants with Q5_0/Q8_0 for the rows 256 does not divide)
    vllm  vLLM / SGLang (GPTQ and compressed-tensors, Marlin kernels): int 4 or 8 bits, symmetric, group_size
          32, 64, 128 or -1 dividing each module's in_features

Both: integer codes with float16 scales (no double_quant), no additive terms (outliers, low-rank), no online
rotation (`rotation="hadamard"`; the folded `rotation="residual"` is fine), fused MoE experts and GPT-2 Conv1D kept
in float (no exporter writes them yet). Each target also holds the 8-bit scheme the default `lm_head="int8"` gives
the output head (`head_int8`: gguf Q8_0, vllm int8 per channel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .format import active_terms, get_format
from .scheme import HEAD_INT8, QuantScheme


@dataclass(frozen=True)
class ServingTarget:
    name: str
    engines: str
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    defaults: dict = field(default_factory=dict)  # fields set when the user does not give them
    k_quant: bool = False  # also holds formats with the `k_quant` trait (their blocks fix bits/group layout)
    # defaults when the config's format is such a block format (its own blocks decide symmetric and group_size)
    block_defaults: dict = field(default_factory=dict)
    # the output head's settings under lm_head="int8" (HfQuantConfig): an 8-bit scheme this target exports
    head_int8: dict = field(default_factory=lambda: dict(HEAD_INT8))
    # ... given only to a head whose in_features and out_features (the vocabulary) are multiples of this; otherwise the
    # head stays float (GPTQ readers allocate qweight rows and columns in 32s)
    head_multiple: int = 1

    def holds_blocks(self, format_name) -> bool:
        fmt = _format_or_none(format_name)
        return self.k_quant and fmt is not None and getattr(fmt, "k_quant", False)

    def defaults_for(self, format_name) -> dict:
        """The defaults for the fields the user did not give, given the config's format."""
        return self.block_defaults if self.holds_blocks(format_name) else self.defaults

    def _fix(self) -> str:
        blocks = " (or format='kquant')" if self.k_quant else ""
        return (f"quantize with bits in {list(self.bits)}, symmetric=True, group_size in {list(self.group_sizes)}, "
                f"format='int'{blocks}, double_quant=False and no outliers/low-rank terms, or drop target=")

    def check_format(self, where: str, name: str) -> None:
        """Before a scheme is built (whose own checks would blame the target's defaults instead)."""
        if not getattr(get_format(name), "affine_int", False) and not self.holds_blocks(name):
            raise ValueError(f"target={self.name!r} ({self.engines}): {where} has format={name!r}; the "
                             f"{self.engines} export holds affine integer codes; fix: {self._fix()}")

    def check_scheme(self, where: str, scheme: QuantScheme) -> None:
        """ValueError naming `where` (a config field) when `scheme` cannot be exported exactly to this target."""
        problems = []
        if self.holds_blocks(scheme.format):
            # the format's own blocks (checked by the format) are exactly the target's; only extras can leave it
            problems += [f"{t.field}={getattr(scheme, t.field)}" for t in active_terms(scheme)]
            if scheme.double_quant:
                problems.append("double_quant=True")
            if problems:
                raise ValueError(f"target={self.name!r} ({self.engines}): {where} has {', '.join(problems)}; "
                                 f"fix: {self._fix()}")
            return
        if not getattr(scheme.codec, "affine_int", False):
            problems.append(f"format={scheme.format!r} (the {self.engines} export holds affine integer codes)")
        elif scheme.bits not in self.bits:
            problems.append(f"bits={scheme.bits}")
        if not scheme.symmetric:
            problems.append("symmetric=False (asymmetric zero-points fitted by mse/gptq are fractional)")
        if scheme.group_size not in self.group_sizes:
            problems.append(f"group_size={scheme.group_size}")
        if scheme.double_quant:
            problems.append("double_quant=True (8-bit scale codes, not float16 scales)")
        for term in active_terms(scheme):
            problems.append(f"{term.field}={getattr(scheme, term.field)}")
        if problems:
            raise ValueError(f"target={self.name!r} ({self.engines}): {where} has {', '.join(problems)}; "
                             f"fix: {self._fix()}")

    def check_shape(self, module: str, scheme: QuantScheme, in_features: int) -> str | None:
        """The reason `module` cannot be exported with its group size, or None."""
        g = scheme.group_size
        if g != -1 and in_features % g:
            return (f"{module}: in_features={in_features} is not a multiple of group_size={g} (the {self.engines} "
                    "export needs equal groups)")
        return None


def _format_or_none(name):
    try:
        return get_format(name)
    except (KeyError, ValueError, TypeError):  # an unknown name: the config's own check names it
        return None


SERVING_TARGETS = {
    "gguf": ServingTarget("gguf", "llama.cpp GGUF", bits=(4, 5, 8), group_sizes=(32,),
                          defaults={"symmetric": True, "group_size": 32, "quantize_experts": False},
                          k_quant=True, block_defaults={"quantize_experts": False},
                          head_int8={**HEAD_INT8, "group_size": 32}),  # Q8_0
    "vllm": ServingTarget("vllm", "vLLM GPTQ / compressed-tensors", bits=(4, 8), group_sizes=(32, 64, 128, -1),
                          defaults={"symmetric": True, "quantize_experts": False}, head_multiple=32),
}
