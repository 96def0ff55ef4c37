"""Serving targets: what a quantization recipe must stay within so that `hf_quant.export` writes it exactly for an
engine (`HfQuantConfig(target=...)`). Each target lists the defaults it sets for fields the user did not give and
checks every scheme the config can produce (`check_scheme`) and every module's shape (`check_shape`); the export
targets (hf_quant/export) remain the authority on what they hold, and tests check that a config accepted here
exports without refusals.

    gguf  llama.cpp / ollama: int 4, 5 or 8 bits, symmetric, group_size 32 (Q4_0 / Q5_0 / Q8_0 blocks)
    vllm  vLLM / SGLang (GPTQ and compressed-tensors, Marlin kernels): int 4 or 8 bits, symmetric, group_size
          32, 64, 128 or -1 dividing each module's in_features

Both: integer codes with float16 scales (no double_quant), no additive terms (outliers, low-rank), no online
rotation (`rotation="hadamard"`; the folded `rotation="residual"` is fine), fused MoE experts and GPT-2 Conv1D kept
in float (no exporter writes them yet).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .format import active_terms, get_format
from .scheme import QuantScheme


@dataclass(frozen=True)
class ServingTarget:
    name: str
    engines: str
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    defaults: dict = field(default_factory=dict)  # fields set when the user does not give them

    def _fix(self) -> str:
        return (f"quantize with bits in {list(self.bits)}, symmetric=True, group_size in {list(self.group_sizes)}, "
                "format='int', double_quant=False and no outliers/low-rank terms, or drop target=")

    def check_format(self, where: str, name: str) -> None:
        """Before a scheme is built (whose own checks would blame the target's defaults instead)."""
        if not getattr(get_format(name), "affine_int", False):
            raise ValueError(f"target={self.name!r} ({self.engines}): {where} has format={name!r}; the "
                             f"{self.engines} export holds affine integer codes; fix: {self._fix()}")

    def check_scheme(self, where: str, scheme: QuantScheme) -> None:
        """ValueError naming `where` (a config field) when `scheme` cannot be exported exactly to this target."""
        problems = []
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


SERVING_TARGETS = {
    "gguf": ServingTarget("gguf", "llama.cpp GGUF", bits=(4, 5, 8), group_sizes=(32,),
                          defaults={"symmetric": True, "group_size": 32, "quantize_experts": False}),
    "vllm": ServingTarget("vllm", "vLLM GPTQ / compressed-tensors", bits=(4, 8), group_sizes=(32, 64, 128, -1),
                          defaults={"symmetric": True, "quantize_experts": False}),
}
