"""`HfQuantConfig`: the transformers `quantization_config` of hf_quant.

Every field is declared once, in `DECLARATIONS`: its name, default, group, documentation and own check. The accepted
keyword arguments, `FIELDS`, `to_dict()`, the "unknown field" hint and the docstring's Args section derive from it;
the rules between fields are in `_check_across`. What a format accepts is the format's business
(`formats.scheme`): apart from the default `format`, this module names no format.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats.format import FORMATS, format_names
from .formats.targets import SERVING_TARGETS
from .formats.scheme import (
    CALIBRATION_METHODS, GROUP_SIZES, METHODS, SCHEME_FIELDS, QuantScheme, check_scheme_field, default_bits,
    resolve_scheme,
)

try:
    from re import _parser as _sre  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre

QUANT_METHOD = "hf_quant"
# Version of the on-disk layout (formats/base.py). Bump on any change a reader must know about.
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
_DATASET_KEYS = ("path", "name", "split", "text_field")


# --- checks of one field on its own: check(name, value) -> the value as stored, or raise ValueError -----------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scheme_field(name: str, value):
    check_scheme_field(name, value)
    return value


def _bits(name: str, value):
    return value if value is None else _scheme_field(name, value)  # None: the format's default, set in _check_across


def _bool(name: str, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def _int_at_least(low: int) -> Callable[[str, Any], Any]:
    def check(name: str, value):
        if not _is_int(value) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        return value
    return check


def _one_of(*allowed) -> Callable[[str, Any], Any]:
    def check(name: str, value):
        if value not in allowed:
            names = [repr(a) for a in allowed]
            raise ValueError(f"{name} must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}")
        return value
    check.allowed = allowed
    return check


def _digest(name: str, value):
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
        raise ValueError(f"{name} must be None or a SHA-256 hex digest (64 hex digits; written by hf_quant when "
                         f"saving), got {value!r}")
    return value


def _format_version(name: str, value):
    if not _is_int(value):
        quotes = "; write it without quotes in config.json" if isinstance(value, str) else ""
        raise ValueError(f"{name} must be an int (the on-disk layout version, e.g. {FORMAT_VERSION}), got {value!r}"
                         + quotes)
    if value not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(
            f"{name}={value!r} is not supported by this hf_quant (it reads versions "
            f"{list(SUPPORTED_FORMAT_VERSIONS)}); upgrade hf_quant to load this checkpoint (pip install -U hf-quant)"
        )
    return value


def _seed(name: str, value):
    if not _is_int(value) or not 0 <= value < 2**32:  # seeds torch.Generator as seed * 1_000_003 + in_features
        raise ValueError(f"{name} must be an int in [0, 2**32), got {value!r}")
    return value


# --- regular expressions: a config ships with a checkpoint, so its patterns are untrusted ---------------------------
# Python's `re` backtracks: `^(.|\w|[a-z_.])*!` takes exponential time on a module name, and `.?` written 30 times
# or `.*` 5 times takes hours over a model's names. So each pattern is judged before it is ever matched, on its parsed
# form (`_ways`): no backreferences or conditionals; no repeat of something that can itself match in several ways
# (nested repetition, a repeated alternation); and at most _MAX_WAYS ways to match a name from one position, counted
# as the product of the choices in sequence (an alternation: its options; a variable-length repeat: its counts, at most
# _NAME_LENGTH + 1), so one pattern costs at most milliseconds per module name.
MAX_PATTERN_LENGTH = 1000
_NAME_LENGTH = 64
_MAX_WAYS = 10_000
_MAX_WAYS_PER_FIELD = 100_000  # summed over a field's patterns, all of which may be tried on every name
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}
_NO_BACKREFS = "it uses a backreference or a conditional group"
_PATTERN_FIX = r"list the module names, or use a pattern without nested or stacked repetition (e.g. 'layers\.\d+\.mlp')"


class _Unsafe(Exception):
    pass


def _ways(parsed) -> int:
    """An upper bound on the ways a parsed (sub)pattern can match from one position; raises _Unsafe for constructs
    that can backtrack catastrophically."""
    ways = 1
    for op, av in parsed:
        if op in _REPEATS:
            low, high, body = av
            inner = _ways(body)
            if inner > 1 and high > 1:
                raise _Unsafe("it repeats a group that can itself match in several ways (nested repetition)")
            ways *= inner * (min(high - low, _NAME_LENGTH) + 1)
        elif op is _sre.BRANCH:
            ways *= sum(_ways(option) for option in av[1])
        elif op is _sre.SUBPATTERN:
            ways *= _ways(av[-1])
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            ways *= _ways(av[1])
        elif op is getattr(_sre, "ATOMIC_GROUP", None):
            ways *= _ways(av)
        elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
            raise _Unsafe(_NO_BACKREFS)
        if ways > _MAX_WAYS:
            raise _Unsafe(f"it can match a name in over {_MAX_WAYS:,} ways (each *, + or {{m,}} counts as "
                          f"{_NAME_LENGTH + 1}, ? as 2, an alternation as its options, multiplied in sequence)")
    return ways


def _regexes(name: str, patterns, template: str = "{}") -> None:
    """Check the regexes of the field `name` (see above); `template` is how the field's user embeds each one."""
    total = 0
    for pattern in patterns:
        shown = repr(pattern) if len(pattern) <= 80 else repr(pattern[:60]) + f"... ({len(pattern)} characters)"
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise ValueError(f"{name} entry {shown} is longer than {MAX_PATTERN_LENGTH} characters; {_PATTERN_FIX}")
        try:
            re.compile(template.format(pattern))  # its syntax, in the form it is matched in
            total += _ways(_sre.parse(pattern))
            if total > _MAX_WAYS_PER_FIELD:
                raise _Unsafe(f"with the entries before it, {name} can match a name in over "
                              f"{_MAX_WAYS_PER_FIELD:,} ways")
        except re.error as e:
            raise ValueError(f"{name} entry {shown} is not a valid regular expression: {e}") from None
        except RecursionError:
            raise ValueError(f"{name} entry {shown} nests its groups too deeply; {_PATTERN_FIX}") from None
        except _Unsafe as e:
            raise ValueError(f"{name} entry {shown} is refused because {e}: matching such a pattern against module "
                             f"names can take hours (Python's re backtracks); {_PATTERN_FIX}") from None


def _module_names(name: str, value):
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not all(
        isinstance(m, str) for m in value
    ):
        raise ValueError(f"{name} must be None or a list of module names (str), e.g. ['lm_head'], got {value!r}")
    # transformers' should_convert_module matches each entry as a regex, embedded in a module-boundary suffix.
    _regexes(name, value, r"(?:{})(?:(?<=\.)|(?=\.|$))")
    return list(value)


def _settings(where: str, settings) -> dict[str, Any]:
    """An override's / candidate's settings dict: known scheme fields only (values are checked when resolved)."""
    unknown = set(settings) - set(SCHEME_FIELDS)
    if unknown:
        raise ValueError(f"{where} has unknown setting(s) {sorted(unknown)}; allowed: {list(SCHEME_FIELDS)}")
    return dict(settings)


def _override_items(overrides) -> list[tuple[Any, Any]]:
    """(regex, settings) pairs in precedence order, from a dict or a list of [regex, settings] pairs (the saved
    form)."""
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    if isinstance(overrides, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in overrides):
        seen = set()
        for pattern in (p for p, _ in overrides if isinstance(p, str)):  # other keys are reported by the caller
            if pattern in seen:
                raise ValueError(f"overrides lists the regex {pattern!r} more than once; give each regex once")
            seen.add(pattern)
        return [tuple(pair) for pair in overrides]
    raise ValueError(
        "overrides must be a dict {regex: {setting: value} or None}, e.g. {'down_proj': {'bits': 8}} (or a list of "
        f"[regex, settings] pairs, the saved form), got {overrides!r}"
    )


def _overrides(name: str, value) -> dict[str, dict[str, Any] | None]:
    result = {}
    for pattern, settings in _override_items({} if value is None else value):
        if not isinstance(pattern, str):
            raise ValueError(f"{name} keys must be regular expressions (str), got {pattern!r}")
        if settings is not None and not isinstance(settings, Mapping):
            raise ValueError(f"{name}[{pattern!r}] must be a dict of settings (allowed: {list(SCHEME_FIELDS)}) or "
                             f"None (keep in float), got {settings!r}")
        result[pattern] = None if settings is None else _settings(f"{name}[{pattern!r}]", settings)
    _regexes(name, result)
    return result


def _override_pairs(overrides: dict) -> list:
    # A list of [regex, settings] pairs, not a dict: the order decides which override wins, and transformers writes
    # config.json with sorted keys.
    return [[pattern, copy.deepcopy(settings)] for pattern, settings in overrides.items()]


def _calibration(name: str, value):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(t, str) and t for t in value):
        return list(value)
    raise ValueError(f"{name} must be None, 'botchan', the path of a text file (str) or a non-empty list of non-empty "
                     f"texts, got {value!r}")


def _dataset(name: str, value):
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("path"), str) or set(value) - set(_DATASET_KEYS):
        raise ValueError(f"{name} must be None or a dict with a 'path' (str) and optionally 'name', 'split', "
                         f"'text_field', e.g. {{'path': 'wikitext', 'name': 'wikitext-2-raw-v1'}}, got {value!r}")
    return dict(value)


def _damp(name: str, value):
    if value == "cv":
        return value
    if not _is_number(value) or not 0 < value <= 10:
        raise ValueError(f"{name} must be a number in (0, 10] (a fraction of the mean Hessian diagonal) or 'cv' (chosen "
                         f"by cross-validation), got {value!r}")
    return value


def _target_bits(name: str, value):
    if value is not None and (not _is_number(value) or not 1 <= value <= 16):
        raise ValueError(f"{name} must be None or a number of bits per weight in [1, 16], e.g. 2.5, got {value!r}")
    return value


def _candidates(name: str, value):
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, Mapping) for c in value):
        raise ValueError(f"{name} must be None or a non-empty list of settings dicts, e.g. "
                         f"[{{'bits': 2}}, {{'bits': 4}}], got {value!r}")
    return [_settings(f"{name}[{i}]", c) for i, c in enumerate(value)]


# --- the declarations ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One HfQuantConfig field. `check(name, value)` validates the value on its own and returns it as stored;
    `dump` gives its `to_dict` form."""

    name: str
    default: Any
    group: str  # "version" (checkpoint record), "scheme", "placement", "calibration" or "allocation"
    doc: str
    check: Callable[[str, Any], Any]
    dump: Callable[[Any], Any] = copy.deepcopy
    choices: Callable[[], tuple] | None = None  # the accepted values, where they are a list (else see `check`)

    def allowed(self) -> tuple | None:
        """The accepted values where they form a list (the check's own list for `_one_of` fields), else None:
        what `hf-quant --help` lists, so the CLI cannot drift from the config."""
        if self.choices is not None:
            return tuple(self.choices())
        return getattr(self.check, "allowed", None)


# Declaration order is `to_dict` order and check order; format_version comes first so that a config from a newer
# hf_quant fails on its version, not on a field it does not know yet.
DECLARATIONS: tuple[Field, ...] = (
    Field("format_version", FORMAT_VERSION, "version",
          "the on-disk layout version; set by hf_quant, checked when loading. A saved config must carry it "
          "(`from_dict` rejects a config without it).", _format_version),
    Field("weights_digest", None, "version",
          "set by hf_quant when saving: the SHA-256 of the records the weights carry (config fields, each module's "
          "scheme and tensor digests, every float tensor's digest), linking config.json to exactly those weights; "
          "checked when loading (stale or foreign weight files are refused). None: not a saved checkpoint.",
          _digest),
    # Scheme fields (compressed-tensors' QuantizationScheme/QuantizationArgs): what each weight is stored as.
    Field("format", "int", "scheme",
          'the weight format: "int" (affine integer), "nf4", "fp4" (E2M1), "fp8" (E4M3, weight-only), "ternary" '
          '(trit-planes), "vq" (8-dim vector codebooks; see `planes`) or "kquant" (llama.cpp\'s K-quant blocks: '
          'bits 4, 5, 6 = GGUF Q4_K, Q5_K, Q6_K; group_size 256, set when not given).', _scheme_field,
          choices=format_names),
    Field("bits", None, "scheme",
          'code width of "int" weights (2, 3, 4, 5, 6, 8). Default (None): 4 for "int", the format\'s own width for '
          "codebook formats (nf4, fp4: 4; fp8: 8). The resolved width is stored, so `to_dict()` always holds an int "
          "and a round trip gives an equal config. Codebook formats reject any other width.", _bits),
    Field("group_size", 128, "scheme",
          "32, 64, 128, 256, or -1 for one scale per output channel. In-features that are not a multiple of the group "
          "size are zero-padded to the next multiple; the padding is part of the stored layout.", _scheme_field,
          choices=lambda: GROUP_SIZES),
    Field("symmetric", False, "scheme",
          '"int" only: no stored zero-point. True with a codebook format is an error.', _scheme_field),
    Field("method", "mse", "scheme",
          '"mse" (default; data-free error-minimizing scale/zero search), "rtn" (round to nearest) or "gptq" '
          "(calibrated while loading: GPTQ block by block on the calibration data below; every format, GPTVQ for "
          '"vq", and with low-rank / sparse-outlier terms) or "awq" (calibrated activation-aware per-channel scales '
          'folded into the preceding norm/linear, then "mse").', _scheme_field, choices=lambda: METHODS),
    Field("double_quant", False, "scheme",
          "store scales/zero-points as 8-bit codes (about 0.12 fewer bits per weight at group 128).", _scheme_field),
    Field("lowrank_rank", 0, "scheme",
          "> 0 stores a rank-r correction W ~ Q(W) + U V beside the codes (float16 factors, SVD of the quantization "
          "residual; hf_quant.formats.lowrank), added in the forward. Costs 16 r (out + in) bits per layer. "
          "0 (default): none.", _scheme_field),
    Field("planes", 1, "scheme",
          'format "ternary" only: 1 (BitNet b1.58 style, ~1.6 bits + scales) or 2 trit-planes (PTQTP-style '
          "progressive fit, ~3.2 bits + scales), each {-1, 0, +1} with per-group float16 scales. Format \"vq\": 1 or 2 "
          "residual codebooks of 256 8-dim vectors (1 or 2 bits per weight + scales + codebooks).", _scheme_field),
    Field("outliers_per_row", 0, "scheme",
          "> 0 keeps the k largest weights of each output row exactly, as float16 residuals with int16 column indices "
          "beside the codes (SpQR-style sparse outliers; 32 k / in_features bits per weight).", _scheme_field),
    # Placement fields: which modules get which scheme.
    Field("modules_to_not_convert", None, "placement",
          "list of module names (or dotted prefixes) kept in float. Default (None): the output embedding, tied "
          "weights and the last module, as transformers computes them; the resolved list is recorded in the config "
          "when the model is loaded (with quantize_embeddings, the embeddings are left out of that default; the "
          "output head is left out unless lm_head=\"float\"). Entries are matched as regexes up to a module "
          "boundary (transformers' `should_convert_module`), under the rules of `overrides`.", _module_names),
    Field("overrides", None, "placement",
          "{regex: {setting: value}} applied to modules whose full name matches the regex (`re.search`); the first "
          'matching entry (in insertion order) wins, e.g. `{r"down_proj": {"bits": 8}}`. A value of None (instead of '
          "a dict) keeps matching modules in float. Settings not given are inherited from the config, except that an "
          "override switching format takes that format's width if it has only one (unless it sets `bits`) and drops "
          "inherited `symmetric`/`planes` values the format does not accept. `to_dict()` (and config.json) hold the "
          "overrides as a list of [regex, settings] pairs, which keeps their order; such a list is accepted here too. "
          "A regex that could backtrack for hours (nested repetition such as `(\\w+\\.)*`, backreferences, many "
          "open-ended repeats in a row) or is over 1000 characters is refused, here and in modules_to_not_convert.",
          _overrides, _override_pairs),
    Field("lm_head", "int8", "placement",
          'the output head (get_output_embeddings(), e.g. lm_head), read for every generated token: "int8" (default: '
          "8-bit int, one scale per output channel, symmetric, rounded data-free; with `target`, the 8-bit scheme the "
          'target exports: gguf Q8_0, vllm int8 per channel, float where its vocabulary is not a multiple of 32), '
          '"float" (kept float: the default before this field existed) or "same" (the config\'s own scheme). Applied '
          "once, when a float model is quantized with "
          "modules_to_not_convert=None: the head leaves the resolved modules_to_not_convert and, for \"int8\", gets an "
          "anchored override appended to `overrides` (both recorded in the saved config, so a reload never reads this "
          "field; configs saved without it reload as saved). Your own modules_to_not_convert, or an override matching "
          "the head, wins. A tied head is untied and quantized from the embedding after loading (with "
          "quantize_embeddings it shares the embedding's packed table instead). With a calibration method (gptq, "
          'awq) the head, outside the decoder blocks, is rounded data-free ("same": its scheme with method "mse"). '
          'With target_bits, "int8" keeps the head float (outside the budget, as before) and "same" lets the '
          "allocator choose its scheme.", _one_of("int8", "float", "same")),
    Field("target", None, "placement",
          'the engine the checkpoint is for: "gguf" (llama.cpp; int 4/5/8-bit symmetric, group_size 32) or "vllm" '
          "(GPTQ / compressed-tensors; int 4/8-bit symmetric, group_size 32/64/128/-1). Every scheme the config "
          "can produce is checked so that `hf_quant.export` writes it exactly (no requantize), and the fields not "
          "given default to what the target needs (symmetric=True; gguf: group_size=32; quantize_experts=False). "
          "None: no restriction.", _one_of(None, *SERVING_TARGETS)),
    Field("quantize_experts", True, "placement",
          "also quantize fused MoE expert tensors (3-D parameters of transformers v5 experts).", _bool),
    Field("quantize_embeddings", False, "placement",
          "also quantize nn.Embedding tables (token embeddings; transformers' scaled word embeddings too) with the "
          "scheme `overrides` give their name (e.g. `{\"embed_tokens\": {\"bits\": 8}}`), else the default one; "
          "rows are grouped along the hidden dimension and a lookup decodes only the gathered rows. Scalar formats "
          "only (int, nf4, fp4, fp8; double_quant allowed; no lowrank_rank/outliers_per_row). A head tied to a "
          "quantized embedding (lm_head with tie_word_embeddings) shares its packed table, whatever "
          "modules_to_not_convert says of the head. False (default): embeddings stay float.", _bool),
    # Calibration fields (hf_quant.pipeline); data-free methods ignore them.
    Field("calibration", None, "calibration",
          'calibration-based methods only: None or "botchan" (default: the Botchan text after its first 8192 tokens, '
          "disjoint from hf_quant's perplexity evaluation), the path of a UTF-8 text file, or a list of texts, "
          "tokenised with the model's tokenizer into `n_samples` windows of `seq_len` tokens; or \"generated\": no "
          "data, the float causal LM writes its own `n_samples` sequences of `seq_len` tokens (LLM-QAT's data-free "
          "generation: a random first token, then sampling the model's next-token distribution; seeded by "
          "`calibration_seed`; costs n_samples * seq_len decode steps and loads the whole float model, no "
          "streaming).", _calibration),
    Field("calibration_dataset", None, "calibration",
          'instead of `calibration`, a `datasets` dataset: {"path": ..., "name": None, "split": "train", '
          '"text_field": "text"} (needs `pip install datasets`).', _dataset),
    Field("calibration_seed", 0, "calibration",
          'seed of calibration="generated"\'s sampling, in [0, 2**32) (other calibration sources are '
          "deterministic and ignore it).", _seed),
    Field("n_samples", 16, "calibration", "number of calibration sequences.", _int_at_least(1)),
    Field("seq_len", 512, "calibration", "length (tokens) of each calibration sequence.", _int_at_least(2)),
    Field("damp", 0.01, "calibration",
          "GPTQ damping, as a fraction of the mean Hessian diagonal added to it (raised tenfold, with a warning, while "
          "the Hessian is not positive definite). \"cv\": chosen for each group of linears reading one input among "
          "0.01, 0.03, 0.1 and 0.3 by two-fold cross-validation over the calibration sequences (GPTQ of 128 sampled "
          "rows fitted on the even sequences' Hessian and scored on the odd ones', and the reverse), then halved "
          "for the solve on all of them (hf_quant.algorithms.gptq.cross_validated_damp); not for fused MoE expert "
          "tensors. Eight extra Hessian factorisations per input group: about 3-4x GPTQ's time. Off by default: it lowers "
          "the held-out layer error, not the perplexity (BENCHMARKS.md, \"GPTQ's damping cross-validated\").", _damp),
    Field("act_order", True, "calibration",
          "GPTQ visits input columns by decreasing Hessian diagonal (needs static_groups).", _bool),
    Field("static_groups", True, "calibration",
          "GPTQ computes every group's scale/zero-point from the float weight before quantizing (False: when GPTQ "
          "reaches the group, from the error-updated weight; not with double_quant).", _bool),
    Field("refit_scales", False, "calibration",
          "after GPTQ has chosen the codes, refit each group's scale (and its zero-point where the scheme stores a "
          "fractional one: 4-bit and wider asymmetric int) by least squares against the calibration Hessian, codes "
          "kept (hf_quant.solvers.gptq.refit_group_params). A weight's rows keep their old parameters where the "
          "refit would not lower their calibration error. For the int, nf4, fp4 and fp8 formats; the K-quant, "
          "ternary and VQ formats fit their scales in their own GPTQ step. Off by default: better perplexity on "
          "SmolLM2, not on Qwen2.5-Coder-0.5B (BENCHMARKS.md, \"GPTQ's scale refit\").", _bool),
    Field("rotation", None, "calibration",
          'None, "hadamard" or "residual". "hadamard": the linears inside the transformer blocks store W R (R a '
          "randomised Hadamard rotation, hf_quant.algorithms.rotation) and rotate their input online (x R), which "
          'spreads weight outliers before quantizing; exact at full precision. "residual" (QuaRot\'s folded form, '
          "Llama-style decoders): the residual stream is rotated by folding R into the embedding, the RMSNorm gains "
          "and the linears reading/writing the stream, so nothing runs online (o_proj/down_proj inputs stay "
          'unrotated; a tied lm_head is untied). Both quantize after loading; not with method "awq".',
          _one_of(None, "hadamard", "residual")),
    Field("rotation_seed", 0, "calibration",
          "seed of the rotation's random signs, in [0, 2**32) (recorded, so a reload rebuilds the same R).", _seed),
    Field("token_weighting", None, "calibration",
          'GPTQ only: None, or "attention" (RSQ-style): each token\'s row of the Hessian is weighted by the attention '
          "it receives in the block (mean over heads, summed over queries, relative to its sequence's mean, clipped "
          "to [0.1, 10]). Calibration then runs with eager attention.", _one_of(None, "attention")),
    Field("moe_calibrate_all_experts", False, "calibration",
          "GPTQ on fused MoE experts: True collects every expert's input statistics from every calibration token (as "
          "if each token were routed to each expert; llm-compressor's moe_calibrate_all_experts), so no expert is "
          "left to data-free rounding; the block's outputs still follow the router. Costs about num_experts / top_k "
          "times the experts' statistics work. False: each expert sees the tokens routed to it (experts no token "
          "reached are rounded data-free, with a warning). Either way the calibration report gives the tokens each "
          "expert saw.", _bool),
    # Allocation fields (hf_quant.algorithms.allocation): mixed precision under a bit budget.
    Field("target_bits", None, "allocation",
          "mixed precision under a budget: when quantizing, choose one scheme per linear layer from "
          "`allocation_candidates` so that the average true bits per quantized weight (everything stored) is at most "
          "this, minimising the summed weight reconstruction error (exact knapsack). The choice is written into "
          "`overrides` (one anchored regex per layer, after the user's own, which keep their layers fixed), so the "
          "saved checkpoint reloads like any other. None: one scheme for all.", _target_bits),
    Field("allocation_candidates", None, "allocation",
          "list of settings dicts (as in `overrides`) the allocator may choose from; None: the default ladder "
          "`allocation.DEFAULT_CANDIDATES` (int 2-8 bits, double-quantized scales).", _candidates),
)
_DECLARED = {f.name: f for f in DECLARATIONS}
FIELDS = tuple(_DECLARED)

# Other libraries' names for our fields (transformers' GPTQConfig, AwqConfig, BitsAndBytesConfig, HqqConfig,
# compressed-tensors' QuantizationArgs): passing one is an error that names our equivalent. None is an exact alias
# (a silently accepted name would also be written back under our name, so a config would not round-trip as given).
# name -> (whose name it is, what hf_quant calls it and how it differs)
FOREIGN_NAMES: dict[str, tuple[str, str]] = {
    "sym": ("GPTQConfig", "symmetric (True: no stored zero-point; the default here is False)"),
    "desc_act": ("GPTQConfig", "act_order (True by default here)"),
    "damp_percent": ("GPTQConfig", "damp (the same fraction of the mean Hessian diagonal: 0.01 = 1%; default 0.01)"),
    "dataset": ("GPTQConfig", "calibration ('botchan', the path of a text file or a list of texts) or "
                              "calibration_dataset ({'path': ..., 'name': ..., 'split': ..., 'text_field': ...}); "
                              "give method='gptq' or 'awq' to calibrate"),
    "nsamples": ("GPTQConfig", "n_samples"),
    "model_seqlen": ("GPTQConfig", "seq_len"),
    "tokenizer": ("GPTQConfig", "nothing: calibration text is tokenised with the model's own tokenizer (no field)"),
    "true_sequential": ("GPTQConfig", "nothing: GPTQ runs block by block, each block on the previous blocks' "
                                      "quantized outputs (no field)"),
    "use_exllama": ("GPTQConfig", "nothing: the kernel is chosen per device and format (HF_QUANT_KERNEL overrides it)"),
    "modules_in_block_to_quantize": ("GPTQConfig", "modules_to_not_convert (modules kept in float) or overrides "
                                                   "({regex: None} keeps matching modules in float)"),
    "w_bit": ("AwqConfig", "bits"),
    "q_group_size": ("AwqConfig", "group_size"),
    "zero_point": ("AwqConfig", "symmetric (zero_point=False is symmetric=True); give method='awq' for AWQ"),
    "load_in_4bit": ("BitsAndBytesConfig", "format='fp4' or 'nf4' (bitsandbytes' 4-bit codebooks; its default is "
                                           "fp4), or bits=4 with format='int' (the default here)"),
    "load_in_8bit": ("BitsAndBytesConfig", "bits=8 (e.g. bits=8, group_size=-1, symmetric=True: per-channel int8; "
                                           "outliers_per_row keeps outlier weights exact)"),
    "bnb_4bit_quant_type": ("BitsAndBytesConfig", "format ('nf4' or 'fp4', the same codebooks)"),
    "bnb_4bit_use_double_quant": ("BitsAndBytesConfig", "double_quant"),
    "bnb_4bit_compute_dtype": ("BitsAndBytesConfig", "nothing: computation runs in the model's dtype "
                                                     "(from_pretrained(..., dtype=torch.bfloat16))"),
    "llm_int8_skip_modules": ("BitsAndBytesConfig", "modules_to_not_convert"),
    "llm_int8_threshold": ("BitsAndBytesConfig", "outliers_per_row (a number of weights per row kept exact; "
                                                 "hf_quant keeps weight outliers, not activation outliers)"),
    "nbits": ("HqqConfig", "bits"),
    "num_bits": ("compressed-tensors", "bits"),
    "actorder": ("compressed-tensors", "act_order"),
    "ignore": ("compressed-tensors", "modules_to_not_convert"),
}


def _unknown_fields_message(unknown: list[str]) -> str:
    """The error for unknown keyword arguments: our name for another library's, else the nearest field names."""
    hints = []
    for k in unknown:
        if k in FOREIGN_NAMES:
            whose, ours = FOREIGN_NAMES[k]
            hints.append(f"unknown field {k!r} ({whose}'s name): hf_quant calls it {ours}")
        elif near := difflib.get_close_matches(k, FIELDS, n=1):
            hints.append(f"{k!r}: did you mean {near[0]!r}?")
    return (f"HfQuantConfig got unknown field(s) {unknown}" + (f": {'; '.join(hints)}" if hints else "")
            + f"; known fields: {list(FIELDS)}")

CALIBRATION_FIELDS = tuple(f.name for f in DECLARATIONS if f.group == "calibration")


def _resolved(where: str, inherited: Mapping[str, Any], settings: Mapping[str, Any]) -> QuantScheme:
    try:
        return resolve_scheme(inherited, settings)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _check_across(values: dict[str, Any]) -> dict[str, Any]:
    """The rules between fields (each field's own check has passed). Completes `values` (bits=None) and returns the
    derived state: the default scheme and the compiled overrides."""
    if values["bits"] is None:
        values["bits"] = default_bits(values["format"])
    own = {f: values[f] for f in SCHEME_FIELDS}
    if values["target"] is not None:
        SERVING_TARGETS[values["target"]].check_format("the default scheme", values["format"])
    default_scheme = QuantScheme(**own)  # the format's own rules (bits, symmetric, planes, ...)
    patterns = [(re.compile(p), None if s is None else _resolved(f"overrides[{p!r}]", own, s))
                for p, s in values["overrides"].items()]
    for i, settings in enumerate(values["allocation_candidates"] or ()):
        _resolved(f"allocation_candidates[{i}]", own, settings)
    if values["calibration"] is not None and values["calibration_dataset"] is not None:
        raise ValueError("give either calibration or calibration_dataset, not both")
    if values["damp"] == "cv" and values["n_samples"] < 2:
        raise ValueError(f"damp='cv' cross-validates over two halves of the calibration sequences: it needs "
                         f"n_samples >= 2, got {values['n_samples']}")
    if values["act_order"] and not values["static_groups"]:
        raise ValueError("act_order=True needs static_groups=True (the stored formats have no per-column group index); "
                         "set static_groups=True or act_order=False")
    if values["rotation"] is not None and values["method"] == "awq":
        raise ValueError(f"rotation={values['rotation']!r} does not combine with method='awq' (AWQ folds its scales "
                         "into the norms the rotation relies on); use method='gptq' or 'mse' with the rotation")
    if values["double_quant"] and not values["static_groups"]:
        raise ValueError("double_quant=True needs static_groups=True (its 8-bit scale codes are fitted to all of a "
                         "layer's scales at once)")
    if values["target"] is not None:
        _check_target(SERVING_TARGETS[values["target"]], values, default_scheme, patterns)
    return {"default_scheme": default_scheme, "_override_patterns": patterns}


def _check_target(target, values: dict[str, Any], default_scheme: QuantScheme, patterns) -> None:
    """Every scheme the config can produce, and the fields outside the schemes, within what `target` exports."""
    target.check_scheme("the default scheme", default_scheme)
    for pattern, scheme in patterns:
        if scheme is not None:
            target.check_scheme(f"overrides[{pattern.pattern!r}]", scheme)
    own = {f: values[f] for f in SCHEME_FIELDS}
    for i, settings in enumerate(values["allocation_candidates"] or ()):
        target.check_scheme(f"allocation_candidates[{i}]", resolve_scheme(own, settings))
    if values["target_bits"] is not None and values["allocation_candidates"] is None:
        raise ValueError(f"target={target.name!r}: target_bits with the default candidate ladder (2-8 bits, "
                         "double-quantized scales) leaves the target; give allocation_candidates the target holds")
    if values["rotation"] == "hadamard":
        raise ValueError(f"target={target.name!r}: rotation='hadamard' rotates inputs online, which "
                         f"{target.engines} loaders do not do; use rotation='residual' (folded into the weights)")
    if values["quantize_experts"]:
        raise ValueError(f"target={target.name!r}: quantize_experts=True, but no exporter writes fused MoE experts "
                         "yet; set quantize_experts=False (experts kept in float)")
    if values["quantize_embeddings"]:
        raise ValueError(f"target={target.name!r}: quantize_embeddings=True, but no exporter writes quantized "
                         "embeddings yet; set quantize_embeddings=False (embeddings kept in float)")


def _args_doc() -> str:
    """The docstring's Args section, from the declarations' docs."""
    entries = (textwrap.fill(f"{f.name}: {f.doc}", 116, initial_indent=" " * 8, subsequent_indent=" " * 12,
                             break_on_hyphens=False) for f in DECLARATIONS)
    return "\n    Args:\n" + "\n".join(entries) + "\n"


class HfQuantConfig(QuantizationConfigMixin):
    """Quantization settings for `from_pretrained(..., quantization_config=HfQuantConfig(...))`.

    Every field is validated when the config is built, changed through `update`, or assigned as an attribute: a bad
    value raises ValueError naming the field and what it accepts, and leaves the config unchanged. (A value changed
    in place, e.g. `config.overrides[regex] = ...`, is not seen: assign the field or use `update`.)
    """

    def __init__(self, **kwargs):
        method_given = kwargs.pop("quant_method", QUANT_METHOD)
        if method_given != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r} for HfQuantConfig, got {method_given!r}")
        unknown = sorted(set(kwargs) - set(FIELDS))
        if unknown:
            raise ValueError(_unknown_fields_message(unknown))
        self.quant_method = QUANT_METHOD
        preset = SERVING_TARGETS.get(kwargs.get("target")) if isinstance(kwargs.get("target"), str) else None
        if preset is not None:  # the target's defaults for the fields not given (given ones are checked, not changed)
            kwargs = {**preset.defaults_for(kwargs.get("format")), **kwargs}
        fmt = FORMATS.get(kwargs.get("format")) if isinstance(kwargs.get("format"), str) else None
        if fmt is not None and fmt.group_sizes and "group_size" not in kwargs:
            kwargs["group_size"] = fmt.group_sizes[0]  # a format whose blocks fix the group size (kquant: 256)
        self._apply({f.name: kwargs.get(f.name, f.default) for f in DECLARATIONS})

    def _apply(self, values: Mapping[str, Any]) -> None:
        """Validate a full set of field values and commit them; nothing changes when a check fails."""
        values = {f.name: f.check(f.name, values[f.name]) for f in DECLARATIONS}
        derived = _check_across(values)
        self.__dict__.update(values, **derived)

    def _values(self) -> dict[str, Any]:
        return {name: self.__dict__[name] for name in FIELDS}

    def __setattr__(self, name: str, value) -> None:
        # A declared field is validated together with the others when set (by the user or transformers), so using
        # the config (`scheme_for`) needs no re-validation.
        if name in _DECLARED:
            self._apply({**self._values(), name: value})
        else:
            super().__setattr__(name, value)

    def update(self, **kwargs) -> dict[str, Any]:
        """Set fields (validated together, like a new config); returns the kwargs that are not fields.
        Changing `format` without giving `bits` resets `bits` to the new format's default."""
        fields = {k: v for k, v in kwargs.items() if k in _DECLARED}
        if "format" in fields and "bits" not in fields and fields["format"] != self.format:
            fields["bits"] = None  # the new format's default width, as for a new config
        fmt = FORMATS.get(fields.get("format")) if isinstance(fields.get("format"), str) else None
        if fmt is not None and fmt.group_sizes and "group_size" not in fields \
                and self.group_size not in fmt.group_sizes:
            fields["group_size"] = fmt.group_sizes[0]  # the group size its blocks fix, as for a new config
        if fields:
            self._apply({**self._values(), **fields})
        return {k: v for k, v in kwargs.items() if k not in _DECLARED}

    @property
    def needs_calibration(self) -> bool:
        """Whether any module's method is calibration-based (quantized after loading, on calibration data)."""
        schemes = [self.default_scheme] + [s for _, s in self._override_patterns if s is not None]
        return any(s.method in CALIBRATION_METHODS for s in schemes)

    @property
    def quantizes_after_loading(self) -> bool:
        """Whether weights load in float and are quantized after loading (calibration or rotation)."""
        return self.needs_calibration or self.rotation is not None

    def scheme_with(self, settings: Mapping[str, Any]) -> QuantScheme:
        """The scheme an override with these `settings` gives (the config's other fields inherited)."""
        return resolve_scheme({f: getattr(self, f) for f in SCHEME_FIELDS}, settings)

    def scheme_for(self, module_name: str) -> QuantScheme | None:
        """The scheme of the module `module_name`, or None when an override keeps it in float."""
        for regex, scheme in self._override_patterns:
            if regex.search(module_name):
                return scheme
        return self.default_scheme

    # --- serialization -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, **{f.name: f.dump(getattr(self, f.name)) for f in DECLARATIONS}}

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
        # Written before the lm_head field: the head's placement is in the recorded modules_to_not_convert/overrides,
        # and its policy then was "float".
        config_dict.setdefault("lm_head", "float")
        config_dict.update({k: v for k, v in kwargs.items() if k in _DECLARED})
        config = cls(**config_dict)
        unused = {k: v for k, v in kwargs.items() if k not in _DECLARED}
        return (config, unused) if return_unused_kwargs else config

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __eq__(self, other) -> bool:
        return isinstance(other, HfQuantConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"HfQuantConfig {self.to_json_string()}"


if HfQuantConfig.__doc__:  # None under python -OO
    HfQuantConfig.__doc__ = HfQuantConfig.__doc__.rstrip() + "\n" + _args_doc()
# help() and IDEs show the declared fields as keyword arguments.
HfQuantConfig.__init__.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
    + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in DECLARATIONS]
)
