"""A quantized KV cache for transformers' `generate`: `HfQuantCache` (cache.py) over the key/value codec (codec.py)."""

from .cache import HfQuantCache, HfQuantLayer
from .codec import KV_BITS, KVSpec, dequantize, quantize

__all__ = ["HfQuantCache", "HfQuantLayer", "KVSpec", "KV_BITS", "dequantize", "quantize"]
