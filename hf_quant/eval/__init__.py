"""Evaluation helpers: the same quality metrics for every quantization method."""

from hf_quant.eval.quality import botchan_sentences, embedding_cosine, perplexity, sentence_embeddings

__all__ = ["botchan_sentences", "embedding_cosine", "perplexity", "sentence_embeddings"]
