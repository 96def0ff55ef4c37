"""The evaluation record of a quantized model: storage and quality beside the float model, as a terminal table
and as JSON a model card can embed (``hf-quant eval --json``, read by ``hf-quant push --eval-json``).

Schema (``validate_record`` checks it; every key is required, extra keys are refused)::

    {"hf_quant_version": str, "model": str, "quantization_config": dict,
     "storage": {"bits_per_weight": float,            # whole model, every stored tensor
                 "quantized_bits_per_weight": float,  # quantized modules only
                 "bytes_before": int, "bytes_after": int,
                 "modules": {name: {"format": str, "bits_per_weight": float, ...}}},
     "quality": [{"metric": "perplexity" | "embedding_cosine", "dataset": str, "tokens": int,
                  "float": float, "quantized": float}]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from .storage import StorageReport, size_line

__all__ = [
    "METRICS",
    "QualityResult",
    "evaluate_causal_lm",
    "evaluate_encoder",
    "format_table",
    "make_record",
    "read_record",
    "validate_record",
    "write_record",
]

METRICS = ("perplexity", "embedding_cosine")
BOTCHAN = "botchan"  # hf_quant.assets.botchan_text(): the same English text for every method


@dataclass(frozen=True)
class QualityResult:
    metric: str
    dataset: str
    tokens: int  # tokens scored (perplexity) or embedded (embedding_cosine)
    float: float
    quantized: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {self.metric!r}")


def evaluate_causal_lm(
    float_model: nn.Module, quantized_model: nn.Module, tokenizer, text: str | None = None, *,
    dataset: str = BOTCHAN, max_tokens: int = 2048, window: int = 512,
) -> QualityResult:
    """Perplexity of both models on the same text and token budget (default: Botchan)."""
    from .quality import perplexity

    if text is None:
        from ..assets import botchan_text

        text = botchan_text()
    n = min(max_tokens, len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]))
    kwargs = dict(max_tokens=max_tokens, window=window, stride=window)
    return QualityResult("perplexity", dataset, n, perplexity(float_model, tokenizer, text, **kwargs),
                         perplexity(quantized_model, tokenizer, text, **kwargs))


def evaluate_encoder(
    float_model: nn.Module, quantized_model: nn.Module, tokenizer, sentences: Sequence[str] | None = None, *,
    dataset: str = BOTCHAN, n_sentences: int = 128,
) -> QualityResult:
    """Mean cosine of the quantized encoder's sentence embeddings to the float model's (float = 1 by definition)."""
    from .quality import botchan_sentences, embedding_cosine

    if sentences is None:
        sentences = botchan_sentences(n_sentences)
    tokens = sum(len(ids) for ids in tokenizer(list(sentences), truncation=True, max_length=256)["input_ids"])
    cosine = embedding_cosine(float_model, quantized_model, tokenizer, sentences)
    return QualityResult("embedding_cosine", dataset, tokens, 1.0, cosine)


def make_record(model: str, quantization_config: Mapping, storage: StorageReport,
                quality: Sequence[QualityResult]) -> dict:
    from ..version import __version__

    record = {
        "hf_quant_version": __version__,
        "model": str(model),
        "quantization_config": dict(quantization_config),
        "storage": storage.to_dict(),
        "quality": [asdict(q) for q in quality],
    }
    validate_record(record)
    return record


_TOP = {"hf_quant_version": str, "model": str, "quantization_config": dict, "storage": dict, "quality": list}
_STORAGE = {"bits_per_weight": float, "quantized_bits_per_weight": float, "bytes_before": int, "bytes_after": int,
            "modules": dict}
_QUALITY = {"metric": str, "dataset": str, "tokens": int, "float": float, "quantized": float}


def _check_fields(obj, spec: Mapping[str, type], where: str, *, extra_ok: bool = False) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be an object, got {type(obj).__name__}")
    missing = [k for k in spec if k not in obj]
    if missing:
        raise ValueError(f"{where} lacks field(s) {missing}")
    unknown = [k for k in obj if k not in spec]
    if unknown and not extra_ok:
        raise ValueError(f"{where} has unknown field(s) {unknown}; allowed: {list(spec)}")
    for key, typ in spec.items():
        value = obj[key]
        ok = isinstance(value, (int, float)) if typ is float else isinstance(value, typ)
        if not ok or (typ in (int, float) and isinstance(value, bool)):
            raise ValueError(f"{where}.{key} must be {typ.__name__}, got {value!r}")


def validate_record(record) -> None:
    """Raises ValueError naming the first field that does not follow the schema."""
    _check_fields(record, _TOP, "record")
    _check_fields(record["storage"], _STORAGE, "record.storage")
    for name, module in record["storage"]["modules"].items():
        _check_fields(module, {"format": str, "bits_per_weight": float}, f"record.storage.modules[{name!r}]",
                      extra_ok=True)
    for i, q in enumerate(record["quality"]):
        _check_fields(q, _QUALITY, f"record.quality[{i}]")
        if q["metric"] not in METRICS:
            raise ValueError(f"record.quality[{i}].metric must be one of {list(METRICS)}, got {q['metric']!r}")


def write_record(record: dict, path: str | os.PathLike) -> None:
    validate_record(record)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")


def read_record(path: str | os.PathLike) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); write it with `hf-quant eval --json`") from e
    validate_record(record)
    return record


def format_table(record: dict, *, per_module: bool = False) -> str:
    """The record as a terminal table."""
    s = record["storage"]
    lines = [f"hf_quant {record['hf_quant_version']} evaluation of {record['model']}"]
    if per_module and s["modules"]:
        width = max(len(n) for n in s["modules"])
        lines.append(f"  {'module':<{width}}  {'format':<14} {'bits/w':>7}")
        for name, m in s["modules"].items():
            lines.append(f"  {name:<{width}}  {m['format']:<14} {m['bits_per_weight']:>7.3f}")
    formats = sorted({m["format"] for m in s["modules"].values()})
    lines += [
        f"  quantized modules      {len(s['modules'])} ({', '.join(formats) or 'none'})",
        f"  bits per weight        {s['quantized_bits_per_weight']:.3f} quantized modules, "
        f"{s['bits_per_weight']:.3f} whole model (every stored tensor)",
        f"  size                   {size_line(s['bytes_before'], s['bytes_after'])}",
    ]
    if record["quality"]:
        lines.append(f"  {'metric':<17} {'dataset':<9} {'tokens':>7} {'float':>9} {'quantized':>10} {'change':>8}")
        for q in record["quality"]:
            change = q["quantized"] / q["float"] - 1 if q["float"] else float("nan")
            lines.append(f"  {q['metric']:<17} {q['dataset']:<9} {q['tokens']:>7} {q['float']:>9.4f} "
                         f"{q['quantized']:>10.4f} {100 * change:>+7.2f}%")
    return "\n".join(lines)
