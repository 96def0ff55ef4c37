"""Tests for hf_quant.eval: the metrics every quantization method is judged by."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hf_quant.eval import botchan_sentences, embedding_cosine, perplexity, sentence_embeddings
from hf_quant.eval.quality import _windows

VOCAB = 256  # the byte tokenizer below


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box the thread
    barriers made these tests 10-50x slower (0.6 s -> 30 s). Real models keep the default."""
    if request.node.get_closest_marker("real_model"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ByteTokenizer:
    """Just enough of a tokenizer for `perplexity`: one token per UTF-8 byte."""

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def synthetic_text(n_chars: int = 1000, seed: int = 0) -> str:
    """Random lower-case words: arbitrary bytes the tiny model has no reason to predict."""
    gen = torch.Generator().manual_seed(seed)
    letters = torch.randint(ord("a"), ord("z") + 1, (n_chars,), generator=gen).tolist()
    spaces = torch.rand(n_chars, generator=gen) < 0.15
    return "".join(" " if s else chr(c) for c, s in zip(letters, spaces))


def reference_perplexity(model, ids: list[int], window: int, stride: int) -> float:
    """The transformers perplexity guide's loop, using the model's own shifted loss."""
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(ids), stride):
            end = min(start + window, len(ids))
            input_ids = torch.tensor([ids[start:end]])
            labels = input_ids.clone()
            labels[:, : -(end - prev_end)] = -100  # context only; scored elsewhere
            n_valid = int((labels[:, 1:] != -100).sum())
            if n_valid:
                nll += model(input_ids=input_ids, labels=labels).loss.item() * n_valid
                count += n_valid
            prev_end = end
            if end == len(ids):
                break
    return math.exp(nll / count)


# --------------------------------------------------------------------------- perplexity


def test_random_model_perplexity_is_about_vocab_size():
    # A freshly initialised model (std 0.02 weights) gives near-uniform next-token
    # distributions, so its perplexity is close to the vocabulary size (measured: 261.1).
    ppl = perplexity(tiny_llama(), ByteTokenizer(), synthetic_text(), max_tokens=512, window=128, stride=128)
    assert math.isfinite(ppl)
    assert VOCAB / 1.2 < ppl < VOCAB * 1.2


@pytest.mark.parametrize(
    ("max_tokens", "window", "stride", "batch_size"),
    [
        (512, 128, 128, 4),  # non-overlapping, windows fill the budget exactly
        (500, 128, 128, 3),  # ragged last window, a partial batch
        (500, 128, 32, 4),  # sliding: only the new tokens of each window count
        (500, 100, 64, 2),
    ],
)
def test_perplexity_matches_hand_computed_reference(max_tokens, window, stride, batch_size):
    model, tokenizer, text = tiny_llama(), ByteTokenizer(), synthetic_text()
    expected = reference_perplexity(model, tokenizer(text)["input_ids"][:max_tokens], window, stride)
    got = perplexity(model, tokenizer, text, max_tokens=max_tokens, window=window, stride=stride, batch_size=batch_size)
    assert got == pytest.approx(expected, rel=1e-5)


def test_perplexity_of_one_window_is_exp_cross_entropy():
    model, text = tiny_llama(), synthetic_text()
    ids = torch.tensor([ByteTokenizer()(text)["input_ids"][:64]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    expected = math.exp(F.cross_entropy(logits[:-1], ids[0, 1:]).item())
    got = perplexity(model, ByteTokenizer(), text, max_tokens=64, window=64, stride=64)
    assert got == pytest.approx(expected, rel=1e-5)


def test_sliding_with_stride_equal_window_is_non_overlapping():
    model, tokenizer, text = tiny_llama(), ByteTokenizer(), synthetic_text()
    ids = tokenizer(text)["input_ids"][:384]
    # Non-overlapping chunks scored one by one, each in full.
    nll = count = 0
    with torch.no_grad():
        for start in range(0, len(ids), 128):
            chunk = torch.tensor(ids[start : start + 128])
            logits = model(input_ids=chunk[None]).logits[0]
            nll += F.cross_entropy(logits[:-1], chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    got = perplexity(model, tokenizer, text, max_tokens=384, window=128, stride=128)
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_model_that_knows_the_text_has_perplexity_near_one():
    # Train the tiny model on a periodic text: every token but a window's first is then
    # determined by its predecessor. A scorer with an off-by-one shift would report a
    # huge perplexity here rather than ~1.
    text = "the quick brown fox jumps over the lazy dog. " * 40
    ids = torch.tensor(ByteTokenizer()(text)["input_ids"][:256]).view(4, 64)
    model = tiny_llama().train()
    before = perplexity(model, ByteTokenizer(), text, max_tokens=256, window=64, stride=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = perplexity(model, ByteTokenizer(), text, max_tokens=256, window=64, stride=64)
    assert before > 100
    assert after < 1.5
    assert model.training  # perplexity restores the caller's mode


def test_perplexity_is_deterministic_and_budgeted():
    model, tokenizer = tiny_llama(), ByteTokenizer()
    text = synthetic_text(2000)
    a = perplexity(model, tokenizer, text, max_tokens=300, window=100, stride=100)
    b = perplexity(model, tokenizer, text, max_tokens=300, window=100, stride=100)
    assert a == b
    # Only the first max_tokens tokens count: changing the text after them changes nothing.
    assert perplexity(model, tokenizer, text[:300] + "zzzz" * 100, max_tokens=300, window=100, stride=100) == a


@pytest.mark.parametrize(("n", "window", "stride"), [(1000, 128, 128), (1000, 128, 32), (130, 128, 100), (128, 128, 1)])
def test_windows_score_every_token_once(n, window, stride):
    windows = _windows(n, window, stride)
    scored = [i for w in windows for i in range(w.end - w.n_scored, w.end)]
    assert len(scored) == len(set(scored))
    assert all(w.end - w.start <= window and w.n_scored < w.end - w.start for w in windows)
    if stride == window:  # every chunk's first token is unpredictable
        assert sorted(scored) == [i for i in range(n) if i % window]
    else:
        assert sorted(scored) == list(range(1, n))


def test_perplexity_rejects_bad_arguments():
    model, tokenizer = tiny_llama(), ByteTokenizer()
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokenizer, "some text", window=8, stride=16)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, tokenizer, "x")


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_quant.assets import smollm2_path

    path = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    from hf_quant.assets import minilm_path

    path = minilm_path()
    model, info = AutoModel.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # every weight in the checkpoint, none missing
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.real_model
def test_smollm2_float_botchan_perplexity(smollm2):
    from hf_quant.assets import botchan_text

    model, tokenizer = smollm2
    assert model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    ppl = perplexity(model, tokenizer, botchan_text(), max_tokens=2048, window=512, stride=512)
    # Measured 33.21 (float32, torch 2.13 CPU, transformers 5.23); 4096 tokens gives 33.09.
    assert 33.21 * 0.85 < ppl < 33.21 * 1.15


@pytest.mark.real_model
def test_minilm_self_cosine_is_one(minilm):
    model, tokenizer = minilm
    sentences = botchan_sentences(64)
    emb = sentence_embeddings(model, tokenizer, sentences, batch_size=16)
    assert emb.shape == (64, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert embedding_cosine(model, model, tokenizer, sentences) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.real_model
def test_minilm_embeddings_are_meaningful_and_padding_free(minilm):
    model, tokenizer = minilm
    emb = sentence_embeddings(
        model, tokenizer, ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    )
    cos = emb @ emb.T
    # sentence-transformers' README reports 0.7553 for this pair (we measure 0.7553);
    # a pooling or normalisation bug would move it.
    assert cos[0, 1].item() == pytest.approx(0.7553, abs=0.005)
    assert cos[0, 1] > cos[0, 2] + 0.5  # paraphrase far closer than an unrelated sentence
    # Mask-weighted pooling: a short sentence embeds the same alone or padded in a batch.
    long = "the " * 50 + "end"
    alone = sentence_embeddings(model, tokenizer, ["A man is eating food."])
    padded = sentence_embeddings(model, tokenizer, ["A man is eating food.", long])[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


@pytest.mark.real_model
def test_minilm_cosine_drops_for_a_perturbed_copy(minilm):
    model, tokenizer = minilm
    sentences = botchan_sentences(64)
    noisy = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in noisy.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn_like(module.weight) * 0.1 * module.weight.std())
    cosine = embedding_cosine(model, noisy, tokenizer, sentences)
    assert 0.5 < cosine < 0.9999  # measured 0.951
