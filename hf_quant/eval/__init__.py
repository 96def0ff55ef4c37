"""Evaluation helpers: the same quality metrics and storage accounting for every quantization method."""

from hf_quant.eval.quality import (
    botchan_sentences,
    embedding_cosine,
    paired_log_ppl_difference,
    perplexity,
    sentence_embeddings,
    window_losses,
)
from hf_quant.eval.report import (
    QualityResult,
    evaluate_causal_lm,
    evaluate_encoder,
    format_table,
    make_record,
    read_record,
    validate_record,
    write_record,
)
from hf_quant.eval.storage import (
    ParameterCount,
    QuantizedModule,
    StorageReport,
    checkpoint_storage,
    count_parameters,
    model_storage,
)

__all__ = [
    "ParameterCount",
    "QualityResult",
    "QuantizedModule",
    "StorageReport",
    "botchan_sentences",
    "checkpoint_storage",
    "count_parameters",
    "embedding_cosine",
    "evaluate_causal_lm",
    "evaluate_encoder",
    "format_table",
    "make_record",
    "model_storage",
    "paired_log_ppl_difference",
    "perplexity",
    "read_record",
    "sentence_embeddings",
    "validate_record",
    "window_losses",
    "write_record",
]
