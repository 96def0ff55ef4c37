"""A quantized KV cache for transformers' `generate`: `HfQuantCache` (cache.py) over the key/value codec (codec.py);
`HfQuantCache(max_cache_len=...)` builds `HfQuantStaticLayer`s (preallocated, compileable)."""

from .cache import HfQuantCache, HfQuantLayer, HfQuantStaticLayer
from .codec import KV_BITS, KVSpec, dequantize, quantize

__all__ = ["HfQuantCache", "HfQuantLayer", "HfQuantStaticLayer", "KVSpec", "KV_BITS", "dequantize", "quantize"]
