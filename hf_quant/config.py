"""`HfQuantConfig`: the transformers `quantization_config` of hf_quant."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats.scheme import CODEBOOK_BITS, FORMATS, QuantScheme

QUANT_METHOD = "hf_quant"
# Version of the on-disk layout (formats/base.py). Bump on any change a reader must know about.
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
_SCHEME_FIELDS = ("format", "bits", "group_size", "symmetric", "method", "double_quant")


class HfQuantConfig(QuantizationConfigMixin):
    """Quantization settings for `from_pretrained(..., quantization_config=HfQuantConfig(...))`.

    Args:
        bits: code width of "int" weights (2, 3, 4, 5, 6, 8). Default: 4 for "int", the format's own width otherwise.
        format: "int" (affine integer), "nf4", "fp4" (E2M1) or "fp8" (E4M3, weight-only).
        group_size: 32, 64, 128, 256, or -1 for one scale per output channel. In-features that are not a multiple
            of the group size are zero-padded to the next multiple; the padding is part of the stored layout.
        symmetric: "int" only: no stored zero-point.
        method: "mse" (default; data-free error-minimizing scale/zero search) or "rtn" (round to nearest).
        double_quant: store scales/zero-points as 8-bit codes (about 0.12 fewer bits per weight at group 128).
        modules_to_not_convert: module names (or dotted prefixes) kept in float. Default (None): the output
            embedding, tied weights and the last module, as transformers computes them. Embeddings are never
            quantized.
        overrides: {regex: {setting: value}} applied to modules whose full name matches the regex
            (`re.search`); the first matching entry wins, e.g. `{r"down_proj": {"bits": 8}}`. A value of None
            (instead of a dict) keeps matching modules in float.
        quantize_experts: also quantize fused MoE expert tensors (3-D parameters of transformers v5 experts).
        format_version: the on-disk layout version; set by hf_quant, checked when loading.
    """

    def __init__(
        self,
        bits: int | None = None,
        format: str = "int",
        group_size: int = 128,
        symmetric: bool = False,
        method: str = "mse",
        double_quant: bool = False,
        modules_to_not_convert: list[str] | None = None,
        overrides: dict[str, dict[str, Any] | None] | None = None,
        quantize_experts: bool = True,
        format_version: int = FORMAT_VERSION,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(
                f"HfQuantConfig got unknown field(s) {sorted(kwargs)}; known fields: "
                f"{sorted(['bits', 'format', 'group_size', 'symmetric', 'method', 'double_quant', 'modules_to_not_convert', 'overrides', 'quantize_experts', 'format_version'])}"
            )
        if format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
        self.bits = bits if bits is not None else CODEBOOK_BITS.get(format, 4)
        self.format = format
        self.group_size = group_size
        self.symmetric = symmetric
        self.method = method
        self.double_quant = double_quant
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.overrides = dict(overrides or {})
        self.quantize_experts = quantize_experts
        self.format_version = format_version
        self.post_init()

    def post_init(self) -> None:
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"format_version={self.format_version!r} is not supported by this hf_quant (it reads versions "
                f"{list(SUPPORTED_FORMAT_VERSIONS)}); upgrade hf_quant to load this checkpoint"
            )
        self.default_scheme = self._scheme({})  # validates the defaults
        if self.modules_to_not_convert is not None and not all(isinstance(m, str) for m in self.modules_to_not_convert):
            raise ValueError(f"modules_to_not_convert must be a list of module names, got {self.modules_to_not_convert!r}")
        if not isinstance(self.quantize_experts, bool):
            raise ValueError(f"quantize_experts must be a bool, got {self.quantize_experts!r}")
        self._override_patterns = []
        for pattern, settings in self.overrides.items():
            try:
                regex = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"overrides key {pattern!r} is not a valid regular expression: {e}") from None
            if settings is None:
                self._override_patterns.append((regex, None))
                continue
            if not isinstance(settings, dict):
                raise ValueError(f"overrides[{pattern!r}] must be a dict of settings or None, got {settings!r}")
            unknown = set(settings) - set(_SCHEME_FIELDS)
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}] has unknown setting(s) {sorted(unknown)}; allowed: {list(_SCHEME_FIELDS)}"
                )
            try:
                self._override_patterns.append((regex, self._scheme(settings)))
            except ValueError as e:
                raise ValueError(f"overrides[{pattern!r}]: {e}") from None

    def _scheme(self, settings: dict[str, Any]) -> QuantScheme:
        values = {f: getattr(self, f) for f in _SCHEME_FIELDS}
        if "format" in settings and "bits" not in settings:
            values["bits"] = CODEBOOK_BITS.get(settings["format"], values["bits"])
        values.update(settings)
        if values["format"] != "int":
            values["symmetric"] = False  # codebooks are symmetric by construction; nothing is stored for it
        return QuantScheme(**values)

    def scheme_for(self, module_name: str) -> QuantScheme | None:
        """The scheme of the module `module_name`, or None when an override keeps it in float."""
        for regex, scheme in self._override_patterns:
            if regex.search(module_name):
                return scheme
        return self.default_scheme

    # --- serialization -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "bits": self.bits,
            "format": self.format,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "method": self.method,
            "double_quant": self.double_quant,
            "modules_to_not_convert": copy.copy(self.modules_to_not_convert),
            "overrides": copy.deepcopy(self.overrides),
            "quantize_experts": self.quantize_experts,
        }

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        config_dict = dict(config_dict)
        method = config_dict.get("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"quant_method is {method!r}; HfQuantConfig reads only {QUANT_METHOD!r} configs")
        if "format_version" not in config_dict:
            raise ValueError("quantization_config has no format_version; it was not written by hf_quant")
        config = cls(**config_dict)
        unused = {}
        for key, value in kwargs.items():
            if hasattr(config, key):
                setattr(config, key, value)
            else:
                unused[key] = value
        return (config, unused) if return_unused_kwargs else config

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other) -> bool:
        return isinstance(other, HfQuantConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"HfQuantConfig {self.to_json_string()}"
