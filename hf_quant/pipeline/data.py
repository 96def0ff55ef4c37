"""Calibration data: a list of texts, a local text file, a `datasets` dataset, or by default the part of Botchan
after the first `BOTCHAN_EVAL_TOKENS` tokens (which hf_quant's perplexity evaluation never reads), tokenised into
`n_samples` windows of `seq_len` tokens."""

from __future__ import annotations

from pathlib import Path

import torch

# hf_quant's perplexity evaluation reads at most the first 4096 tokens of Botchan (`eval.perplexity` default);
# calibration starts well after them, so calibrated results are not measured on their own calibration text.
BOTCHAN_EVAL_TOKENS = 8192


def _read_dataset_text(spec: dict, min_chars: int) -> str:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            "calibration_dataset needs the `datasets` package (pip install datasets), or pass "
            "calibration=<list of texts or a local text file>"
        ) from None
    ds = datasets.load_dataset(spec["path"], spec.get("name"), split=spec.get("split", "train"))
    field = spec.get("text_field", "text")
    if field not in ds.column_names:
        raise ValueError(f"calibration_dataset: {spec['path']!r} has no column {field!r} (columns: {ds.column_names}); "
                         "set calibration_dataset['text_field']")
    parts, size = [], 0
    for row in ds:
        text = row[field]
        if text:
            parts.append(text)
            size += len(text)
            if size >= min_chars:
                break
    return "\n\n".join(parts)


def calibration_text(config) -> tuple[str | None, str]:
    """(text, description) of the configured calibration source; text None means the built-in Botchan slice."""
    if config.calibration_dataset is not None:
        spec = config.calibration_dataset
        # Roughly 4 characters per token, twice over so the windows need not overlap.
        return _read_dataset_text(spec, 8 * config.n_samples * config.seq_len), f"dataset {spec['path']}"
    source = config.calibration
    if source is None or source == "botchan":
        return None, f"Botchan after its first {BOTCHAN_EVAL_TOKENS} tokens"
    if isinstance(source, str):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"calibration={source!r} is not a file; give a UTF-8 text file, a list of texts, or "
                             "'botchan'")
        return path.read_text(encoding="utf-8"), f"file {path}"
    return "\n\n".join(source), f"{len(source)} texts"


def calibration_token_ids(tokenizer, config) -> torch.Tensor:
    """[n_samples, seq_len] token ids: windows spread evenly over the tokenised calibration text (they overlap only
    when the text has fewer than n_samples * seq_len tokens)."""
    text, what = calibration_text(config)
    if text is None:
        from ..assets import botchan_text

        ids = tokenizer(botchan_text(), add_special_tokens=False, verbose=False)["input_ids"][BOTCHAN_EVAL_TOKENS:]
    else:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n, length = config.n_samples, config.seq_len
    if len(ids) < length:
        raise ValueError(f"calibration data ({what}) has {len(ids)} tokens, fewer than seq_len={length}; give more "
                         "text or lower seq_len")
    starts = torch.linspace(0, len(ids) - length, n).round().long().tolist()
    tokens = torch.tensor(ids, dtype=torch.long)
    return torch.stack([tokens[s : s + length] for s in starts])
