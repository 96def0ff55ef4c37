"""Tiny models of the families the engine exporters cover (Llama, Qwen2, Qwen3, Gemma 3) and a tiny byte-level
BPE tokenizer to go with them (GGUF files carry the tokenizer)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

VOCAB = 300  # 256 byte tokens, a few merges, two special tokens


def byte_level_tokenizer(folder):
    """A tiny byte-level BPE tokenizer (GPT-2 style) saved in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")
    fast.add_special_tokens({"bos_token": "<|bos|>", "eos_token": "<|eos|>"})
    fast.save_pretrained(folder)
    return fast


def tiny_family(kind: str):
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    if kind == "qwen3":
        # head_dim 128: transformers' GGUF reader ignores qwen3.attention.key_length (llama.cpp reads it) and
        # takes Qwen3Config's default
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=128, tie_word_embeddings=True))
    if kind == "gemma3":
        # six layers: llama.cpp's Gemma 3 makes every 6th layer global (the default layer_types)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=32,
                                                   sliding_window=8))
        with torch.no_grad():  # random norm weights: a missed +1 shift would show in the logits
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0, 0.3)
        return model
    raise ValueError(kind)


def sentencepiece_style_tokenizer(folder, space_prefix: bool = True):
    """A tiny SentencePiece-style BPE tokenizer (byte fallback, "▁" for spaces; Llama 2 / Gemma style) saved in
    `folder`; `space_prefix`: a "▁" put before the text (Llama 2's dummy prefix; Gemma's tokenizer has none)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("a", "n"), ("▁", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast
