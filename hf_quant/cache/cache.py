"""`HfQuantCache`: a transformers `Cache` whose attention layers keep keys and values packed at 2/3/4/8 bits.

    cache = HfQuantCache(config=model.config, bits=2)
    model.generate(**inputs, cache=cache)          # (`past_key_values=` on older transformers)

Each attention layer (`HfQuantLayer`) holds
- the quantized part: the oldest Q tokens as packed codes + float16 scales/offsets (`codec`), never as floats;
- a float window of the most recent tokens: between `residual_length` and `residual_length + key_group_size - 1`
  of them (keys are grouped along tokens, so only whole groups of `key_group_size` tokens can be quantized).
Q depends only on the token count T: Q = key_group_size * floor(max(T - residual_length, 0) / key_group_size), so
the stored contents are the same however the tokens arrived (one prefill or many single-token steps).

`update` returns what transformers' attention needs, the whole history in float: the quantized part is decoded
block by block (`decode_block` tokens at a time) straight into the returned tensor, so besides that tensor only one
block's scratch exists, and nothing decoded is kept between steps. Tokens that arrive in this `update` (the prompt,
a prefill chunk, the new token) are returned as given, like transformers' `QuantizedCache`.

Layers of other kinds (linear attention, KV-shared "dummy" layers, ...) get transformers' own dynamic layer and are
not quantized. Sliding-window and chunked layers are quantized and keep all their tokens (the attention mask, built
from absolute positions, still limits what each query sees), so they do not shrink to their window.

Not supported: torch.compile of the decoding step (the cache grows and repacks, `is_compileable` is False, so
`generate` runs it eagerly, as with `DynamicCache`), `cache_implementation=` (transformers validates that name
against its fixed list and builds `QuantizedCache` only for its own backends: there is no registration hook), and
cropping quantized tokens (assisted generation).
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, get_layer_types_and_kwargs

from . import codec
from .codec import KV_BITS, KVSpec

# Layer types whose keys/values this cache quantizes; any other type keeps transformers' own layer class.
QUANTIZED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
ROTATIONS = (None, "hadamard")


def _check_int(name: str, value, low: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}. Fix: {fix}")


def check_settings(bits, key_group_size, value_group_size, residual_length, rotation, outliers, decode_block) -> None:
    """Clear errors naming the argument and the fix."""
    if isinstance(bits, bool) or bits not in KV_BITS:
        raise ValueError(f"bits must be one of {list(KV_BITS)}, got {bits!r}. Fix: pass bits=2, 3, 4 or 8")
    _check_int("key_group_size", key_group_size, 1,
               "tokens per key group, e.g. 32 (keys are quantized per channel over this many tokens)")
    _check_int("value_group_size", value_group_size, 1,
               "head_dim entries per value group, e.g. 32 (larger than head_dim: one group per token)")
    _check_int("residual_length", residual_length, 0, "the number of recent tokens kept in float, e.g. 128 (0: none)")
    _check_int("outliers", outliers, 0, "float outliers kept per token vector, e.g. 0 or 2")
    _check_int("decode_block", decode_block, 1, "tokens decoded at once, e.g. 1024")
    if decode_block % key_group_size:
        raise ValueError(f"decode_block ({decode_block}) must be a multiple of key_group_size ({key_group_size}). "
                         f"Fix: pass decode_block={-(-decode_block // key_group_size) * key_group_size}")
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {list(ROTATIONS)}, got {rotation!r}. Fix: rotation='hadamard' "
                         "(spreads outliers over head_dim) or None")


class HfQuantLayer(CacheLayerMixin):
    """One attention layer's cache: packed quantized part + float window of recent tokens (module doc)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, bits: int = 4, key_group_size: int = 32, value_group_size: int = 32,
                 residual_length: int = 128, rotation: str | None = None, outliers: int = 0, seed: int = 0,
                 decode_block: int = 1024):
        super().__init__()
        check_settings(bits, key_group_size, value_group_size, residual_length, rotation, outliers, decode_block)
        rotation_seed = seed if rotation is not None else None
        self.key_spec = KVSpec(bits, key_group_size, "channel", outliers, rotation_seed)
        self.value_spec = KVSpec(bits, value_group_size, "token", outliers, None if rotation_seed is None
                                 else rotation_seed + 1)
        self.residual_length = residual_length
        self.decode_block = decode_block
        self.cumulative_length = 0
        self._qkeys: dict[str, torch.Tensor] | None = None
        self._qvalues: dict[str, torch.Tensor] | None = None
        self._key_signs = self._value_signs = None

    # --- state ----------------------------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.key_dim, self.value_dim = key_states.shape[-1], value_states.shape[-1]
        if self.key_spec.outliers >= min(self.key_dim, self.value_dim):
            raise ValueError(f"outliers ({self.key_spec.outliers}) must be smaller than head_dim "
                             f"({min(self.key_dim, self.value_dim)}). Fix: pass a small count such as 2")
        if self.key_spec.rotation_seed is not None:
            for name, dim in (("key", self.key_dim), ("value", self.value_dim)):
                if codec.hadamard_block(dim) == 1:
                    raise ValueError(f"rotation='hadamard' needs an even {name} head_dim, got {dim}. "
                                     "Fix: pass rotation=None")
            self._key_signs = codec.rotation_signs(self.key_dim, self.key_spec.rotation_seed, self.device)
            self._value_signs = codec.rotation_signs(self.value_dim, self.value_spec.rotation_seed, self.device)
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.is_initialized = True

    @property
    def quantized_length(self) -> int:
        return 0 if self._qkeys is None else self._qkeys["codes"].shape[-2]

    def _target_quantized(self, total: int) -> int:
        g = self.key_spec.group_size
        return max(total - self.residual_length, 0) // g * g

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new states and return (keys, values) of the whole history in float (module doc)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        quantized = self.quantized_length
        window_k = torch.cat((self.keys, key_states), -2)
        window_v = torch.cat((self.values, value_states), -2)
        keys = self._decoded(self._qkeys, self.key_spec, self.key_dim, self._key_signs, window_k)
        values = self._decoded(self._qvalues, self.value_spec, self.value_dim, self._value_signs, window_v)

        self.cumulative_length += key_states.shape[-2]
        flush = self._target_quantized(self.cumulative_length) - quantized
        if flush > 0:
            self._qkeys = self._append(self._qkeys, codec.quantize(window_k[..., :flush, :], self.key_spec,
                                                                   self._key_signs))
            self._qvalues = self._append(self._qvalues, codec.quantize(window_v[..., :flush, :], self.value_spec,
                                                                       self._value_signs))
            window_k, window_v = window_k[..., flush:, :].clone(), window_v[..., flush:, :].clone()
        self.keys, self.values = window_k, window_v
        return keys, values

    def _decoded(self, stored, spec, dim, signs, window: torch.Tensor) -> torch.Tensor:
        """[dequantized stored part, window] written block by block into one tensor of the window's dtype."""
        if stored is None:
            return window
        n = stored["codes"].shape[-2]
        B, H, W, _ = window.shape
        out = torch.empty(B, H, n + W, dim, dtype=window.dtype, device=window.device)
        block = self.decode_block
        for t0 in range(0, n, block):
            t1 = min(t0 + block, n)
            out[..., t0:t1, :] = codec.dequantize(_tokens(stored, spec, t0, t1), spec, dim, window.dtype, signs)
        out[..., n:, :] = window
        return out

    @staticmethod
    def _append(stored, new):
        if stored is None:
            return new
        return {name: torch.cat((stored[name], t), -2) for name, t in new.items()}

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys, values) of the quantized part in float32, or None (tests and inspection)."""
        if self._qkeys is None:
            return None
        return (codec.dequantize(self._qkeys, self.key_spec, self.key_dim, torch.float32, self._key_signs),
                codec.dequantize(self._qvalues, self.value_spec, self.value_dim, torch.float32, self._value_signs))

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds: the packed quantized part and the float window."""
        out = {} if self._qkeys is None else {**{f"keys.{k}": v for k, v in self._qkeys.items()},
                                              **{f"values.{k}": v for k, v in self._qvalues.items()}}
        if self.is_initialized:
            out["keys.window"], out["values.window"] = self.keys, self.values
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    # --- the CacheLayerMixin interface --------------------------------------------------------------------------

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self._qkeys = self._qvalues = None
        self.cumulative_length = 0
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self._qkeys is not None:
            self._qkeys = {k: fn(v) for k, v in self._qkeys.items()}
            self._qvalues = {k: fn(v) for k, v in self._qvalues.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # groups never span batch rows, so reordering the packed tensors is exact
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last tokens while they are all still in the float window; quantized tokens cannot be removed
        (their key groups would have to be re-fitted)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > self.keys.shape[-2]:
            raise ValueError(f"cannot crop {n} tokens: only the last {self.keys.shape[-2]} are in the float window "
                             "and quantized tokens cannot be removed. Fix: use DynamicCache for assisted generation")
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
        self.cumulative_length -= n

    def offload(self):
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._map_batch(lambda t: t.to(self.device, non_blocking=True))


def _tokens(stored: dict[str, torch.Tensor], spec: KVSpec, t0: int, t1: int) -> dict[str, torch.Tensor]:
    """Tokens [t0, t1) of stored tensors (t0 a multiple of the key group: key scales are per group of tokens)."""
    if spec.axis == "channel":
        g = spec.group_size
        return {k: v[..., t0 // g: -(-t1 // g), :] if k in ("scale", "offset") else v[..., t0:t1, :]
                for k, v in stored.items()}
    return {k: v[..., t0:t1, :] for k, v in stored.items()}


class HfQuantCache(Cache):
    """A KV cache storing keys per channel and values per token at `bits` (2, 3, 4 or 8), with a float window of
    the `residual_length` most recent tokens (hf_quant/cache/cache.py's module doc).

    Args:
        config: the model's config (its decoder text config is used for the layer types); without it every layer
            is quantized and created on first use.
        bits: code width of keys and values.
        key_group_size: tokens per key group (keys: one scale/offset per channel per group of tokens).
        value_group_size: head_dim entries per value group (values: one scale/offset per group of a token).
        residual_length: recent tokens kept in float (plus up to key_group_size - 1 not yet forming a whole group).
        rotation: "hadamard" quantizes keys and values rotated along head_dim (x R, random-sign Walsh-Hadamard) and
            un-rotates them when decoding; None does not rotate.
        outliers: entries per token vector kept exactly in float16 (dense-and-sparse), 0 for none.
        seed: seed of the rotation's random signs.
        decode_block: tokens decoded at once when attention reads the cache (a multiple of key_group_size).
    """

    def __init__(self, config=None, bits: int = 4, key_group_size: int = 32, value_group_size: int = 32,
                 residual_length: int = 128, rotation: str | None = None, outliers: int = 0, seed: int = 0,
                 decode_block: int = 1024):
        check_settings(bits, key_group_size, value_group_size, residual_length, rotation, outliers, decode_block)
        self.settings = dict(bits=bits, key_group_size=key_group_size, value_group_size=value_group_size,
                             residual_length=residual_length, rotation=rotation, outliers=outliers, seed=seed,
                             decode_block=decode_block)
        make = functools.partial(HfQuantLayer, **self.settings)
        if config is None:
            super().__init__(layer_class_to_replicate=make)
            return
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        layers = [make() if kind in QUANTIZED_LAYER_TYPES else DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs)
                  for kind, kwargs in zip(layer_types, per_layer_kwargs)]
        super().__init__(layers=layers)

    def __repr__(self):
        return f"HfQuantCache({', '.join(f'{k}={v!r}' for k, v in self.settings.items())}, layers={len(self.layers)})"

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (packed codes, scales, offsets, outliers, float windows, and the
        float states of layers it does not quantize)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, HfQuantLayer):
                total += layer.nbytes()
            else:
                total += sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None),
                                                                      getattr(layer, "values", None))
                             if isinstance(t, torch.Tensor))
        return total
