"""Registers hf_quant with transformers (config, quantizer). Idempotent: safe to call many times."""

from __future__ import annotations


def register() -> None:
    """Add hf_quant's config and quantizer to transformers' quantization registries (their public extension points)."""
    from transformers.quantizers import auto

    from ..config import QUANT_METHOD, HfQuantConfig
    from ..quantizer import HfQuantQuantizer

    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not HfQuantConfig:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantization_config(QUANT_METHOD)(HfQuantConfig)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not HfQuantQuantizer:
        auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantizer(QUANT_METHOD)(HfQuantQuantizer)
