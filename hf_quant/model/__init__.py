"""The one walker over a transformers model: which weights hf_quant quantizes (linears, GPT-2 Conv1D, fused MoE
expert tensors, tied heads, embeddings), the decoder blocks calibration runs through, and the modules kept in float. Loading,
calibration, allocation and export all find their targets here, so they agree."""

from .walker import (
    EmbeddingTarget,
    Target,
    check_patterns_match,
    check_target_shapes,
    decoder_blocks,
    default_modules_to_not_convert,
    embedding_names,
    find_embedding_targets,
    expert_params,
    find_targets,
    is_fused_experts,
    is_float_linear,
    modules_kept_float,
    output_head_name,
    resolve_placement,
    tied_linear_targets,
)

__all__ = ["EmbeddingTarget", "Target", "check_patterns_match", "check_target_shapes", "decoder_blocks",
           "default_modules_to_not_convert", "embedding_names", "expert_params", "find_embedding_targets",
           "find_targets", "is_float_linear", "is_fused_experts", "modules_kept_float", "output_head_name",
           "resolve_placement", "tied_linear_targets"]
