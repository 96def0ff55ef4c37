"""Calibration data: a list of texts, a local text file, a `datasets` dataset, text the model writes itself
(`calibration="generated"`), or by default the part of Botchan after the first `BOTCHAN_EVAL_TOKENS` tokens (which
hf_quant's perplexity evaluation never reads), tokenised into `n_samples` windows of `seq_len` tokens."""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# hf_quant's perplexity evaluation reads at most the first 4096 tokens of Botchan (`eval.perplexity` default);
# calibration starts well after them, so calibrated results are not measured on their own calibration text.
BOTCHAN_EVAL_TOKENS = 8192
# calibration=GENERATED: the model writes its own calibration sequences (`generated_token_ids`).
GENERATED = "generated"


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
    if source == GENERATED:
        raise ValueError("calibration='generated' has no text: the model writes token ids (generated_token_ids); "
                         "this step needs calibration text, so give a text file, a list of texts or 'botchan'")
    if isinstance(source, str):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"calibration={source!r} is not a file; give a UTF-8 text file, a list of texts, or "
                             "'botchan'")
        return path.read_text(encoding="utf-8"), f"file {path}"
    return "\n\n".join(source), f"{len(source)} texts"


def calibration_token_ids(tokenizer, config, model=None) -> torch.Tensor:
    """[n_samples, seq_len] token ids: windows spread evenly over the tokenised calibration text (they overlap only
    when the text has fewer than n_samples * seq_len tokens), or with calibration="generated" sequences the float
    `model` writes itself."""
    if config.calibration == GENERATED:  # the config refuses calibration and calibration_dataset together
        if model is None:
            raise ValueError("calibration='generated' samples the calibration sequences from the model itself; pass "
                             "the float model (calibration_token_ids(tokenizer, config, model=...))")
        return generated_token_ids(model, tokenizer, config.n_samples, config.seq_len, config.calibration_seed)
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


_GENERATION_BATCH = 16  # sequences sampled together (one KV cache each)


@torch.no_grad()
def generated_token_ids(model, tokenizer, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[n_samples, seq_len] token ids the float causal LM `model` writes itself: data-free calibration as in LLM-QAT
    (Liu et al. 2023, "next token generation"). Each sequence starts from a token drawn uniformly from the
    tokenizer's vocabulary without its special tokens; every later token is drawn from the model's own next-token
    distribution (temperature 1, no top-k/top-p cut: truncating the tail would make the activations more typical than
    the model's real inputs), over the tokenizer's ids only (embedding rows past them are padding).

    Deterministic in `seed` (a private generator; the global RNG is untouched). Costs n_samples * seq_len decode
    steps of the float model, in batches of 16 sequences with a KV cache."""
    causal = getattr(model, "can_generate", lambda: False)() and not getattr(model.config, "is_encoder_decoder", False)
    if not causal:
        raise ValueError(f"calibration='generated' samples text from the model itself, which needs a causal LM; "
                         f"{type(model).__name__} is not one: give calibration text (a text file, a list of "
                         "texts, 'botchan' or calibration_dataset)")
    vocab = len(tokenizer)
    logits_rows = model.get_output_embeddings().weight.shape[0]
    if vocab > logits_rows:
        raise ValueError(f"calibration='generated': the tokenizer has {vocab} tokens but the model scores only "
                         f"{logits_rows}; load the model's own tokenizer")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    starts = torch.ones(vocab, dtype=torch.bool)
    starts[special[special < vocab]] = False
    start_ids = starts.nonzero().squeeze(1)
    device = model.get_input_embeddings().weight.device
    if device.type == "meta":
        raise ValueError("calibration='generated' runs the float model to write its calibration text, but its "
                         "weights are not loaded (meta device: streamed or offloaded loading); give calibration text "
                         "instead, or load the model fully")
    # transformers 5 renamed `past_key_values` to `cache` (argument and output field); use this version's name.
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    generator = torch.Generator().manual_seed(seed)
    logger.info("calibration='generated': the float model writes %d sequences of %d tokens (seed %d)", n_samples,
                seq_len, seed)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    out = []
    try:
        for first in range(0, n_samples, _GENERATION_BATCH):
            rows = min(_GENERATION_BATCH, n_samples - first)
            ids = torch.empty(rows, seq_len, dtype=torch.long)
            ids[:, :1] = start_ids[torch.randint(len(start_ids), (rows, 1), generator=generator)]
            cache = {}
            for t in range(1, seq_len):
                result = model(input_ids=ids[:, t - 1 : t].to(device), use_cache=True, **cache)
                cache = {cache_name: result[cache_name]}  # the model made the cache it needs on the first step
                probs = torch.softmax(result.logits[:, -1, :vocab].float().cpu(), dim=-1)
                ids[:, t : t + 1] = torch.multinomial(probs, 1, generator=generator)
            out.append(ids)
            del cache, result
    finally:
        model.train(was_training)
    logger.info("calibration='generated': %d tokens written in %.1f s", n_samples * seq_len,
                time.perf_counter() - start)
    return torch.cat(out)
