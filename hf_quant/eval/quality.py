"""Quality metrics shared by every quantization method, so their numbers compare.

- ``perplexity``: windowed perplexity of a causal LM over a fixed token budget; ``window_losses`` gives it per
  window and ``paired_log_ppl_difference`` compares two models on the same windows with a standard error.
- ``sentence_embeddings`` / ``embedding_cosine``: how far a quantized encoder's sentence
  embeddings move from the float model's (sentence-transformers style pooling).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["botchan_sentences", "embedding_cosine", "paired_log_ppl_difference", "perplexity",
           "sentence_embeddings", "window_losses"]


def _device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    first = next(model.parameters(), None)
    if first is None:
        first = next(model.buffers())
    return first.device


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the measurement, then restore what the caller had.

    no_grad rather than inference_mode: some libraries' quantized tensors (optimum-quanto's) cannot run under
    inference_mode, and every method must be measured by the same code."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class _Window:
    start: int  # first token fed to the model
    end: int  # one past the last token fed
    n_scored: int  # how many of the last tokens of the window count towards the loss


def _windows(n_tokens: int, window: int, stride: int) -> list[_Window]:
    """The standard sliding-window schedule (as in the transformers perplexity guide).

    Each window scores only the tokens not scored by an earlier one, with up to
    ``window - stride`` tokens of context before them. With ``stride == window`` this is
    plain non-overlapping chunks, each scored in full.
    """
    out = []
    prev_end = 0
    for start in range(0, n_tokens, stride):
        end = min(start + window, n_tokens)
        # The window's first token has no context inside the window, so it is never scored.
        n_scored = min(end - prev_end, end - start - 1)
        if n_scored > 0:
            out.append(_Window(start, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _batches(windows: list[_Window], batch_size: int) -> Iterator[list[_Window]]:
    """Consecutive windows of equal length, at most ``batch_size`` at a time.

    Only the last (and, when sliding, the first) window can differ in length, so this
    batches nearly everything without ever padding, which keeps results identical to
    scoring the windows one by one (up to float reduction order).
    """
    batch: list[_Window] = []
    for w in windows:
        if batch and (len(batch) == batch_size or w.end - w.start != batch[0].end - batch[0].start):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def perplexity(model: nn.Module, tokenizer, text: str, **schedule) -> float:
    """Perplexity of a causal LM on the first ``max_tokens`` tokens of ``text``.

    The text is tokenised once without special tokens (so every window sees raw text,
    whatever the tokenizer's BOS habits) and cut to ``max_tokens``. Windows of ``window``
    tokens start every ``stride`` tokens; each scores only its new tokens, so every token
    but the first of the budget (and, when ``stride == window``, the first of each window)
    is predicted exactly once. Deterministic for a given model, text and settings.
    ``schedule``: ``max_tokens`` (4096), ``window`` (512), ``stride`` (512), ``batch_size`` (4), as in
    ``window_losses``, whose per-window losses this sums.
    """
    losses = window_losses(model, tokenizer, text, **schedule)
    return math.exp(sum(nll for nll, _ in losses) / sum(n for _, n in losses))


def window_losses(
    model: nn.Module,
    tokenizer,
    text: str,
    *,
    max_tokens: int = 4096,
    window: int = 512,
    stride: int = 512,
    batch_size: int = 4,
) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, tokens scored) of each window of ``perplexity``'s schedule, in text order.

    Two models scored on the same windows can be compared window by window (a paired difference with a standard
    error), which tells a real gap from the text's own variation; ``perplexity`` is exp(total nll / total tokens)."""
    if window < 2:
        raise ValueError(f"window must be at least 2, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    # verbose=False: a long text legitimately exceeds model_max_length before we cut it.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text has {len(ids)} token(s); perplexity needs at least 2")

    device = _device(model)
    tokens = torch.tensor(ids, dtype=torch.long, device=device)
    out: list[tuple[float, int]] = []
    with _eval_mode(model):
        for batch in _batches(_windows(len(ids), window, stride), batch_size):
            input_ids = torch.stack([tokens[w.start : w.end] for w in batch])
            logits = model(input_ids=input_ids, use_cache=False).logits
            for row, w in enumerate(batch):
                # Logit at position j predicts token j + 1: score the last n_scored tokens.
                length = w.end - w.start
                pred = logits[row, length - 1 - w.n_scored : length - 1].float()
                target = input_ids[row, length - w.n_scored :]
                out.append((F.cross_entropy(pred, target, reduction="sum").double().item(), w.n_scored))
            del logits  # (batch, window, vocab) floats: free before the next batch
    return out


def paired_log_ppl_difference(a: Sequence[tuple[float, int]], b: Sequence[tuple[float, int]]) -> tuple[float, float]:
    """(difference of log-perplexities b - a, its standard error), from two models' ``window_losses`` on the same
    windows. The difference is exact (log ppl_b - log ppl_a); the standard error treats the windows as independent
    samples of the text (a paired, token-weighted estimate), so a gap within about two standard errors is not
    evidence that one model is better."""
    if len(a) != len(b) or any(na != nb for (_, na), (_, nb) in zip(a, b)):
        raise ValueError("the two window lists do not cover the same windows (different text, budget or window)")
    if len(a) < 2:
        raise ValueError("a standard error needs at least two windows")
    counts = torch.tensor([n for _, n in a], dtype=torch.float64)
    d = torch.tensor([(nb - na) for (na, _), (nb, _) in zip(a, b)], dtype=torch.float64) / counts
    w = counts / counts.sum()
    mean = float((w * d).sum())
    # Variance of a weighted mean of independent per-window differences (weights = token shares).
    var = float((w.pow(2) * (d - mean).pow(2)).sum()) * len(a) / (len(a) - 1)
    return mean, math.sqrt(var)


# --------------------------------------------------------------------------- embeddings


def sentence_embeddings(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    batch_size: int = 32,
    *,
    max_length: int = 256,
) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings, as sentence-transformers computes
    them for all-MiniLM-L6-v2 (``max_length=256`` is that model's ``max_seq_length``).

    Returns a float32 CPU tensor of shape ``(len(sentences), hidden_size)``.
    """
    if isinstance(sentences, str):
        raise TypeError("sentences must be a sequence of strings, not a single string")
    device = _device(model)
    out = []
    with _eval_mode(model):
        for i in range(0, len(sentences), batch_size):
            enc = tokenizer(
                list(sentences[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            hidden = model(**enc).last_hidden_state.float()
            # Average over real tokens only: padding must not change a sentence's embedding.
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out.append(F.normalize(pooled, p=2, dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def embedding_cosine(
    model_a: nn.Module,
    model_b: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    batch_size: int = 32,
) -> float:
    """Mean cosine similarity between two models' embeddings of the same sentences."""
    emb_a = sentence_embeddings(model_a, tokenizer, sentences, batch_size)
    emb_b = sentence_embeddings(model_b, tokenizer, sentences, batch_size)
    # Both are unit vectors, so the row-wise dot product is the cosine.
    return (emb_a.double() * emb_b.double()).sum(dim=-1).mean().item()


# --------------------------------------------------------------------------- data


# A sentence ends at . ! or ? (maybe followed by a closing quote) before a capitalised
# word; titles and initials ("Mr. K. Natsume") are not sentence ends.
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"')]))"
    r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\b[A-Z]\.)"
    r"\s+(?=[\"'(]?[A-Z])"
)
_ENDS_SENTENCE = re.compile(r"[.!?][\"')]?$")


def botchan_sentences(n: int = 256, *, min_words: int = 6, max_words: int = 60) -> list[str]:
    """The first ``n`` sentences of Botchan with ``min_words``..``max_words`` words.

    Only the book itself (between the Project Gutenberg start and end markers) is used.
    The file has hard line wraps and no blank lines between paragraphs, so lines are
    joined back together, with headings (lines with no lower-case letter, e.g.
    "CHAPTER I") as breaks; fragments that do not end like a sentence are dropped.
    """
    from hf_quant.assets import botchan_text

    text = botchan_text()
    start = text.index("\n", text.index("*** START OF")) + 1
    end = text.index("*** END OF", start)
    blocks: list[list[str]] = [[]]
    for line in text[start:end].splitlines():
        if any(c.islower() for c in line):
            blocks[-1].append(line.strip())
        elif blocks[-1]:
            blocks.append([])

    sentences: list[str] = []
    for block in blocks:
        for sentence in _SENTENCE_END.split(" ".join(" ".join(block).split())):
            if min_words <= len(sentence.split()) <= max_words and _ENDS_SENTENCE.search(sentence):
                sentences.append(sentence)
                if len(sentences) == n:
                    return sentences
    raise ValueError(f"Botchan has only {len(sentences)} sentences of {min_words}-{max_words} words, asked for {n}")
