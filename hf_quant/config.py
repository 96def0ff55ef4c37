"""`HfQuantConfig`: the transformers `quantization_config` of hf_quant."""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Mapping
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats.scheme import CODEBOOK_BITS, FORMATS, GROUP_SIZES, INT_BITS, METHODS, PLANE_FORMATS, QuantScheme

QUANT_METHOD = "hf_quant"
# Version of the on-disk layout (formats/base.py). Bump on any change a reader must know about.
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
_SCHEME_FIELDS = ("format", "bits", "group_size", "symmetric", "method", "double_quant", "lowrank_rank", "planes",
                  "outliers_per_row")
FIELDS = (
    "bits", "format", "group_size", "symmetric", "method", "double_quant", "modules_to_not_convert", "overrides",
    "quantize_experts", "format_version", "target_bits", "allocation_candidates", "lowrank_rank",
    "planes", "outliers_per_row",
)
DEFAULT_INT_BITS = 4
# Settings of calibration-based methods (hf_quant.algorithms.calibration); data-free methods ignore them.
CALIBRATION_FIELDS = (
    "calibration", "calibration_dataset", "n_samples", "seq_len", "damp", "act_order", "static_groups", "rotation",
    "rotation_seed", "token_weighting",
)
FIELDS = FIELDS + CALIBRATION_FIELDS
CALIBRATION_METHODS = ("gptq", "awq")
_DATASET_KEYS = ("path", "name", "split", "text_field")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_scheme_settings(settings: Mapping[str, Any]) -> None:
    """Type and range checks of scheme fields, one field at a time (cross-field rules are QuantScheme's)."""
    if "format" in settings and (not isinstance(settings["format"], str) or settings["format"] not in FORMATS):
        raise ValueError(f"format must be one of {list(FORMATS)}, got {settings['format']!r}")
    if "bits" in settings:
        bits = settings["bits"]
        if not _is_int(bits) or bits not in (*INT_BITS, *CODEBOOK_BITS.values()):
            raise ValueError(
                f"bits must be an int, one of {list(INT_BITS)} for format 'int' (nf4/fp4: 4, fp8: 8), got {bits!r}"
            )
    if "group_size" in settings:
        gs = settings["group_size"]
        if not _is_int(gs) or gs not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {list(GROUP_SIZES)} (-1: one group per row), got {gs!r}")
    if "method" in settings and (not isinstance(settings["method"], str) or settings["method"] not in METHODS):
        raise ValueError(f"method must be one of {list(METHODS)}, got {settings['method']!r}")
    for name in ("symmetric", "double_quant"):
        if name in settings and not isinstance(settings[name], bool):
            raise ValueError(f"{name} must be a bool (True or False), got {settings[name]!r}")


def _override_items(overrides) -> list[tuple[Any, Any]]:
    """(regex, settings) pairs in precedence order, from a dict or from a list of [regex, settings] pairs (the
    saved form)."""
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    if isinstance(overrides, (list, tuple)) and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in overrides
    ):
        seen = set()
        for pattern, _ in overrides:
            if not isinstance(pattern, str):
                continue  # reported by the caller
            if pattern in seen:
                raise ValueError(f"overrides lists the regex {pattern!r} more than once; give each regex once")
            seen.add(pattern)
        return [tuple(pair) for pair in overrides]
    raise ValueError(
        "overrides must be a dict {regex: {setting: value} or None}, e.g. {'down_proj': {'bits': 8}} (or a list of "
        f"[regex, settings] pairs, the saved form), got {overrides!r}"
    )


class HfQuantConfig(QuantizationConfigMixin):
    """Quantization settings for `from_pretrained(..., quantization_config=HfQuantConfig(...))`.

    Every field is validated when the config is built (and again when it is changed through `update`, or an
    attribute is set and the config is used): a bad value raises ValueError naming the field and what it accepts.

    Args:
        bits: code width of "int" weights (2, 3, 4, 5, 6, 8). Default (None): 4 for "int", the format's own width
            for codebook formats (nf4, fp4: 4; fp8: 8). The resolved width is stored, so `to_dict()` always holds
            an int and a round trip gives an equal config. Codebook formats reject any other width.
        format: "int" (affine integer), "nf4", "fp4" (E2M1), "fp8" (E4M3, weight-only), "ternary" (trit-planes)
            or "vq" (8-dim vector codebooks); see `planes`.
        group_size: 32, 64, 128, 256, or -1 for one scale per output channel. In-features that are not a multiple
            of the group size are zero-padded to the next multiple; the padding is part of the stored layout.
        symmetric: "int" only: no stored zero-point. True with a codebook format is an error.
        method: "mse" (default; data-free error-minimizing scale/zero search), "rtn" (round to nearest) or "gptq"
            (calibrated while loading: GPTQ block by block on the calibration data below; every format, GPTVQ for
            "vq", and with low-rank / sparse-outlier terms) or "awq"
            (calibrated activation-aware per-channel scales folded into the preceding norm/linear, then "mse").
        double_quant: store scales/zero-points as 8-bit codes (about 0.12 fewer bits per weight at group 128).
        modules_to_not_convert: list of module names (or dotted prefixes) kept in float. Default (None): the
            output embedding, tied weights and the last module, as transformers computes them; the resolved list is
            recorded in the config when the model is loaded. Embeddings are never quantized.
        overrides: {regex: {setting: value}} applied to modules whose full name matches the regex
            (`re.search`); the first matching entry (in insertion order) wins, e.g. `{r"down_proj": {"bits": 8}}`.
            A value of None (instead of a dict) keeps matching modules in float. Settings not given are inherited
            from the config, except that an override switching to a codebook format takes that format's width
            (unless it sets `bits`) and is never symmetric. `to_dict()` (and config.json) hold the overrides as a
            list of [regex, settings] pairs, which keeps their order; such a list is accepted here too.
        quantize_experts: also quantize fused MoE expert tensors (3-D parameters of transformers v5 experts).
        format_version: the on-disk layout version; set by hf_quant, checked when loading. A saved config must
            carry it (`from_dict` rejects a config without it).
        calibration: calibration-based methods only: None or "botchan" (default: the Botchan text after its first
            8192 tokens, disjoint from hf_quant's perplexity evaluation), the path of a UTF-8 text file, or a list
            of texts. Tokenised with the model's tokenizer into `n_samples` windows of `seq_len` tokens.
        calibration_dataset: instead of `calibration`, a `datasets` dataset: {"path": ..., "name": None,
            "split": "train", "text_field": "text"} (needs `pip install datasets`).
        n_samples, seq_len: number and length (tokens) of calibration sequences.
        damp: GPTQ damping, as a fraction of the mean Hessian diagonal added to it (raised tenfold, with a warning,
            while the Hessian is not positive definite).
        act_order: GPTQ visits input columns by decreasing Hessian diagonal (needs static_groups).
        static_groups: GPTQ computes every group's scale/zero-point from the float weight before quantizing
            (False: when GPTQ reaches the group, from the error-updated weight; not with double_quant).
        rotation: None, "hadamard" or "residual". "hadamard": the linears inside the transformer blocks store W R
            (R a randomised Hadamard rotation, hf_quant.algorithms.rotation) and rotate their input online (x R),
            which spreads weight outliers before quantizing; exact at full precision. "residual" (QuaRot's folded
            form, Llama-style decoders): the residual stream is rotated by folding R into the embedding, the RMSNorm
            gains and the linears reading/writing the stream, so nothing runs online (o_proj/down_proj inputs stay
            unrotated; a tied lm_head is untied). Both quantize after loading; not with method "awq".
        rotation_seed: seed of the rotation's random signs (recorded, so a reload rebuilds the same R).
        token_weighting: GPTQ only: None, or "attention" (RSQ-style): each token's row of the Hessian is weighted by
            the attention it receives in the block (mean over heads, summed over queries, relative to its sequence's
            mean, clipped to [0.1, 10]). Calibration then runs with eager attention.
        target_bits: mixed precision under a budget (hf_quant.algorithms.allocation): when quantizing, choose one
            scheme per linear layer from `allocation_candidates` so that the average true bits per quantized weight
            (everything stored) is at most this, minimising the summed weight reconstruction error (exact knapsack).
            The choice is written into `overrides` (one anchored regex per layer, after the user's own, which keep
            their layers fixed), so the saved checkpoint reloads like any other. None: one scheme for all.
        allocation_candidates: list of settings dicts (as in `overrides`) the allocator may choose from; None: the
            default ladder `allocation.DEFAULT_CANDIDATES` (int 2-8 bits, double-quantized scales).
        lowrank_rank: > 0 stores a rank-r correction W ~ Q(W) + U V beside the codes (float16 factors, SVD of the
            quantization residual; hf_quant.algorithms.lowrank), added in the forward. Costs 16 r (out + in) bits
            per layer. 0 (default): none.
        planes: format "ternary" only: 1 (BitNet b1.58 style, ~1.6 bits + scales) or 2 trit-planes (PTQTP-style
            progressive fit, ~3.2 bits + scales), each {-1, 0, +1} with per-group float16 scales. Format "vq": 1 or 2
            residual codebooks of 256 8-dim vectors (1 or 2 bits per weight + scales + codebooks).
        outliers_per_row: > 0 keeps the k largest weights of each output row exactly, as float16 residuals with int16
            column indices beside the codes (SpQR-style sparse outliers; 32 k / in_features bits per weight).
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
        calibration: str | list[str] | None = None,
        calibration_dataset: dict[str, Any] | None = None,
        n_samples: int = 16,
        seq_len: int = 512,
        damp: float = 0.01,
        act_order: bool = True,
        static_groups: bool = True,
        rotation: str | None = None,
        rotation_seed: int = 0,
        token_weighting: str | None = None,
        target_bits: float | None = None,
        allocation_candidates: list[dict[str, Any]] | None = None,
        lowrank_rank: int = 0,
        planes: int = 1,
        outliers_per_row: int = 0,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        method_given = kwargs.pop("quant_method", QUANT_METHOD)
        if method_given != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r} for HfQuantConfig, got {method_given!r}")
        if kwargs:
            hints = {k: difflib.get_close_matches(k, FIELDS, n=1) for k in kwargs}
            hint = "; ".join(f"{k!r}: did you mean {h[0]!r}?" for k, h in hints.items() if h)
            raise ValueError(
                f"HfQuantConfig got unknown field(s) {sorted(kwargs)}; known fields: {list(FIELDS)}"
                + (f" ({hint})" if hint else "")
            )
        self.bits = bits
        self.format = format
        self.group_size = group_size
        self.symmetric = symmetric
        self.method = method
        self.double_quant = double_quant
        self.modules_to_not_convert = modules_to_not_convert
        self.overrides = {} if overrides is None else overrides
        self.quantize_experts = quantize_experts
        self.format_version = format_version
        self.calibration = calibration
        self.calibration_dataset = calibration_dataset
        self.n_samples = n_samples
        self.seq_len = seq_len
        self.damp = damp
        self.act_order = act_order
        self.static_groups = static_groups
        self.rotation = rotation
        self.rotation_seed = rotation_seed
        self.token_weighting = token_weighting
        self.target_bits = target_bits
        self.allocation_candidates = allocation_candidates
        self.lowrank_rank = lowrank_rank
        self.planes = planes
        self.outliers_per_row = outliers_per_row
        self.post_init()

    def post_init(self) -> None:
        """Validate every field and build the per-module schemes. Re-run automatically by `scheme_for` when an
        attribute was changed after construction."""
        fv = self.format_version
        if not _is_int(fv) or fv not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"format_version={fv!r} is not supported by this hf_quant (it reads versions "
                f"{list(SUPPORTED_FORMAT_VERSIONS)}); upgrade hf_quant to load this checkpoint "
                "(pip install -U hf-quant)"
            )
        _check_scheme_settings({"format": self.format})
        if self.bits is None:
            self.bits = CODEBOOK_BITS.get(self.format, DEFAULT_INT_BITS)
        _check_scheme_settings({f: getattr(self, f) for f in _SCHEME_FIELDS})
        if self.format != "int" and self.symmetric:
            raise ValueError(
                f"symmetric=True only applies to format='int'; {self.format} codebooks are symmetric already "
                "(leave symmetric=False)"
            )
        self.default_scheme = self._scheme({})

        mods = self.modules_to_not_convert
        if mods is not None:
            if isinstance(mods, (str, bytes)) or not isinstance(mods, (list, tuple)) or not all(
                isinstance(m, str) for m in mods
            ):
                raise ValueError(
                    "modules_to_not_convert must be None or a list of module names (str), e.g. ['lm_head'], "
                    f"got {mods!r}"
                )
            self.modules_to_not_convert = list(mods)
        if not isinstance(self.quantize_experts, bool):
            raise ValueError(f"quantize_experts must be a bool (True or False), got {self.quantize_experts!r}")

        overrides, patterns = {}, []
        for pattern, settings in _override_items(self.overrides):
            if not isinstance(pattern, str):
                raise ValueError(f"overrides keys must be regular expressions (str), got {pattern!r}")
            try:
                regex = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"overrides key {pattern!r} is not a valid regular expression: {e}") from None
            if settings is None:
                overrides[pattern] = None
                patterns.append((regex, None))
                continue
            if not isinstance(settings, Mapping):
                raise ValueError(
                    f"overrides[{pattern!r}] must be a dict of settings (allowed: {list(_SCHEME_FIELDS)}) or None "
                    f"(keep in float), got {settings!r}"
                )
            unknown = set(settings) - set(_SCHEME_FIELDS)
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}] has unknown setting(s) {sorted(unknown)}; allowed: {list(_SCHEME_FIELDS)}"
                )
            try:
                _check_scheme_settings(settings)
                patterns.append((regex, self._scheme(settings)))
            except ValueError as e:
                raise ValueError(f"overrides[{pattern!r}]: {e}") from None
            overrides[pattern] = dict(settings)
        self.overrides = overrides
        self._override_patterns = patterns
        self._check_calibration_fields()
        self._check_allocation_fields()
        self._validated = self._snapshot()

    def _check_allocation_fields(self) -> None:
        tb = self.target_bits
        if tb is not None and (isinstance(tb, bool) or not isinstance(tb, (int, float)) or not 1 <= tb <= 16):
            raise ValueError(f"target_bits must be None or a number of bits per weight in [1, 16], e.g. 2.5, got {tb!r}")
        cands = self.allocation_candidates
        if cands is None:
            return
        if not isinstance(cands, (list, tuple)) or not cands or not all(isinstance(c, Mapping) for c in cands):
            raise ValueError(
                "allocation_candidates must be None or a non-empty list of settings dicts, e.g. "
                f"[{{'bits': 2}}, {{'bits': 4}}], got {cands!r}"
            )
        for i, c in enumerate(cands):
            unknown = set(c) - set(_SCHEME_FIELDS)
            if unknown:
                raise ValueError(f"allocation_candidates[{i}] has unknown setting(s) {sorted(unknown)}; allowed: "
                                 f"{list(_SCHEME_FIELDS)}")
            try:
                _check_scheme_settings(c)
                self._scheme(c)
            except ValueError as e:
                raise ValueError(f"allocation_candidates[{i}]: {e}") from None
        self.allocation_candidates = [dict(c) for c in cands]


    def _check_calibration_fields(self) -> None:
        cal = self.calibration
        if cal is not None and not isinstance(cal, str) and not (
            isinstance(cal, (list, tuple)) and cal and all(isinstance(t, str) and t for t in cal)
        ):
            raise ValueError(
                "calibration must be None, 'botchan', the path of a text file (str) or a non-empty list of non-empty "
                f"texts, got {cal!r}"
            )
        if isinstance(cal, (list, tuple)):
            self.calibration = list(cal)
        ds = self.calibration_dataset
        if ds is not None:
            if not isinstance(ds, Mapping) or not isinstance(ds.get("path"), str) or set(ds) - set(_DATASET_KEYS):
                raise ValueError(
                    "calibration_dataset must be None or a dict with a 'path' (str) and optionally 'name', 'split', "
                    f"'text_field', e.g. {{'path': 'wikitext', 'name': 'wikitext-2-raw-v1'}}, got {ds!r}"
                )
            if cal is not None:
                raise ValueError("give either calibration or calibration_dataset, not both")
            self.calibration_dataset = dict(ds)
        for name, low in (("n_samples", 1), ("seq_len", 2)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp <= 10:
            raise ValueError(f"damp must be a number in (0, 10] (a fraction of the mean Hessian diagonal), got "
                             f"{self.damp!r}")
        for name in ("act_order", "static_groups"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool (True or False), got {getattr(self, name)!r}")
        if self.act_order and not self.static_groups:
            raise ValueError("act_order=True needs static_groups=True (the stored formats have no per-column group "
                             "index); set static_groups=True or act_order=False")
        if self.token_weighting not in (None, "attention"):
            raise ValueError(f"token_weighting must be None or 'attention', got {self.token_weighting!r}")
        if self.rotation not in (None, "hadamard", "residual"):
            raise ValueError(f"rotation must be None, 'hadamard' or 'residual', got {self.rotation!r}")
        if not _is_int(self.rotation_seed) or self.rotation_seed < 0:
            raise ValueError(f"rotation_seed must be an int >= 0, got {self.rotation_seed!r}")
        if self.rotation is not None and self.method == "awq":
            raise ValueError(f"rotation={self.rotation!r} does not combine with method='awq' (AWQ folds its scales "
                             "into the norms the rotation relies on); use method='gptq' or 'mse' with the rotation")
        if self.double_quant and not self.static_groups:
            raise ValueError("double_quant=True needs static_groups=True (its 8-bit scale codes are fitted to all of a "
                             "layer's scales at once)")

    @property
    def needs_calibration(self) -> bool:
        """Whether any module's method is calibration-based (quantized after loading, on calibration data)."""
        self._ensure_valid()
        schemes = [self.default_scheme] + [s for _, s in self._override_patterns if s is not None]
        return any(s.method in CALIBRATION_METHODS for s in schemes)

    @property
    def quantizes_after_loading(self) -> bool:
        """Whether weights load in float and are quantized after loading (calibration or rotation)."""
        return self.needs_calibration or self.rotation is not None

    def _scheme(self, settings: Mapping[str, Any]) -> QuantScheme:
        values = {f: getattr(self, f) for f in _SCHEME_FIELDS}
        if "format" in settings and "bits" not in settings:
            values["bits"] = CODEBOOK_BITS.get(settings["format"], values["bits"])
        if "format" in settings and "symmetric" not in settings and settings["format"] != "int":
            values["symmetric"] = False  # inherited only; an explicit symmetric=True with a codebook is an error
        if "format" in settings and "planes" not in settings and settings["format"] not in PLANE_FORMATS:
            values["planes"] = 1  # likewise: planes belong to ternary and vq only
        values.update(settings)
        return QuantScheme(**values)

    def _snapshot(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=repr)

    def _ensure_valid(self) -> None:
        if getattr(self, "_validated", None) != self._snapshot():
            self.post_init()

    def scheme_with(self, settings: Mapping[str, Any]) -> QuantScheme:
        """The scheme an override with these `settings` gives (the config's other fields inherited)."""
        self._ensure_valid()
        _check_scheme_settings(settings)
        return self._scheme(settings)

    def scheme_for(self, module_name: str) -> QuantScheme | None:
        """The scheme of the module `module_name`, or None when an override keeps it in float."""
        self._ensure_valid()
        for regex, scheme in self._override_patterns:
            if regex.search(module_name):
                return scheme
        return self.default_scheme

    def update(self, **kwargs) -> dict[str, Any]:
        """Set fields (validated together, like a new config); returns the kwargs that are not fields.
        Changing `format` without giving `bits` resets `bits` to the new format's default."""
        fields = {k: v for k, v in kwargs.items() if k in FIELDS}
        if "format" in fields and "bits" not in fields and fields["format"] != self.format:
            fields["bits"] = None  # the new format's default width, as for a new config
        if fields:
            new = type(self)(**{**self._fields(), **fields})
            self.__dict__.update(new.__dict__)
        return {k: v for k, v in kwargs.items() if k not in FIELDS}

    def _fields(self) -> dict[str, Any]:
        d = self.to_dict()
        d.pop("quant_method")
        return d

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
            # A list of [regex, settings] pairs, not a dict: the order decides which override wins, and
            # transformers writes config.json with sorted keys.
            "overrides": [[pattern, copy.deepcopy(settings)] for pattern, settings in self.overrides.items()],
            "quantize_experts": self.quantize_experts,
            "calibration": copy.copy(self.calibration),
            "calibration_dataset": copy.copy(self.calibration_dataset),
            "n_samples": self.n_samples,
            "seq_len": self.seq_len,
            "damp": self.damp,
            "act_order": self.act_order,
            "static_groups": self.static_groups,
            "rotation": self.rotation,
            "rotation_seed": self.rotation_seed,
            "token_weighting": self.token_weighting,
            "target_bits": self.target_bits,
            "allocation_candidates": copy.deepcopy(self.allocation_candidates),
            "lowrank_rank": self.lowrank_rank,
            "planes": self.planes,
            "outliers_per_row": self.outliers_per_row,
        }

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        # `dict(config)` (used by transformers where a config may be a dict or a config object): the fields only.
        yield from self.to_dict().items()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        if not isinstance(config_dict, Mapping):
            raise ValueError(f"quantization_config must be a dict, got {type(config_dict).__name__}")
        config_dict = dict(config_dict)
        method = config_dict.get("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"quant_method is {method!r}; HfQuantConfig reads only {QUANT_METHOD!r} configs")
        if "format_version" not in config_dict:
            raise ValueError(
                "quantization_config (quant_method 'hf_quant') has no 'format_version'. hf_quant writes it into every "
                "config it saves, so this config.json was not written by hf_quant or was edited: save the "
                "checkpoint again with hf_quant, or add the format_version it was written with "
                f"(this hf_quant reads {list(SUPPORTED_FORMAT_VERSIONS)}). To quantize a float model, pass "
                "HfQuantConfig(...) instead of a dict."
            )
        config_dict.update({k: v for k, v in kwargs.items() if k in FIELDS})
        config = cls(**config_dict)
        unused = {k: v for k, v in kwargs.items() if k not in FIELDS}
        return (config, unused) if return_unused_kwargs else config

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other) -> bool:
        return isinstance(other, HfQuantConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"HfQuantConfig {self.to_json_string()}"
