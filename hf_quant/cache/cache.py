"""`HfQuantCache`: a transformers `Cache` whose attention layers keep keys and values packed at 2/3/4/8 bits.

    cache = HfQuantCache(config=model.config, bits=2)
    model.generate(**inputs, cache=cache)          # (`past_key_values=` on older transformers)

Each attention layer (`HfQuantLayer`) holds, in token order,
- a float prefix (attention sinks; StreamingLLM, IntactKV): the first P = sink_length + left_padding tokens as
  given, never quantized. The first tokens take a large share of the attention mass and their keys are unlike the
  rest (they would also stretch the ranges of their key groups). With a left-padded batch the rows' first real
  tokens sit at different positions; `left_padding` (an int, or the prompt's attention mask, whose longest run of
  leading zeros is taken) extends the prefix so that every row's first `sink_length` real tokens are in it: a row
  with less padding than the longest keeps a few more real tokens in float. The prefix is shared by the batch
  (positions, not per-row token counts), so rows stay aligned and reordering/selecting rows is exact;
- the quantized part: the next Q tokens as packed codes + float16 scales/offsets (`codec`), never as floats;
- a float window of the most recent tokens: between `residual_length` and `residual_length + key_group_size - 1`
  of them (keys are grouped along tokens, so only whole groups of `key_group_size` tokens can be quantized).
Q depends only on the token count T: Q = key_group_size * floor(max(T - P - residual_length, 0) / key_group_size),
so the stored contents are the same however the tokens arrived (one prefill or many single-token steps).

Defaults depend on bits (`TWO_BIT_DEFAULTS`): at 2 bits rotation="hadamard", sink_length=4 and clip=True (ranges
chosen by least squared error), measured on SmolLM2-135M to take the perplexity cost from +14% to +0.6%; at 3, 4 and
8 bits no rotation, no sinks, min/max ranges (the behaviour before these options existed). Pass the arguments
explicitly to override (rotation=None, sink_length=0, clip=False is the plain 2-bit cache).

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

import dataclasses
import functools

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, get_layer_types_and_kwargs

from . import codec
from .codec import KV_BITS, KVSpec

# Layer types whose keys/values this cache quantizes; any other type keeps transformers' own layer class.
QUANTIZED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
ROTATIONS = (None, "hadamard")


# What bits=2 defaults to (measured on SmolLM2-135M, BENCHMARKS.md "Quantized KV cache (issue 19)"): without the
# float sinks, rotation and least-squares ranges 2-bit costs +14% perplexity, with them +0.6%. Other widths keep
# the plain defaults (no rotation, no sinks, min/max ranges).
TWO_BIT_DEFAULTS = dict(rotation="hadamard", sink_length=4, clip=True)
PLAIN_DEFAULTS = dict(rotation=None, sink_length=0, clip=False)
AUTO = "auto"


def resolve_defaults(bits, rotation, sink_length, clip) -> tuple:
    """(rotation, sink_length, clip) with "auto" / None replaced by the defaults for `bits`."""
    base = TWO_BIT_DEFAULTS if bits == 2 else PLAIN_DEFAULTS
    return (base["rotation"] if rotation == AUTO else rotation,
            base["sink_length"] if sink_length is None else sink_length,
            base["clip"] if clip is None else clip)


def _check_int(name: str, value, low: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}. Fix: {fix}")


def check_settings(bits, key_group_size, value_group_size, residual_length, rotation, outliers, decode_block,
                   sink_length=0, left_padding=0, clip=False) -> None:
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
    _check_int("sink_length", sink_length, 0, "the number of first tokens kept in float (attention sinks), e.g. 4")
    _check_int("left_padding", left_padding, 0,
               "the longest left padding of the batch (or pass the prompt's attention mask), e.g. 0")
    if decode_block % key_group_size:
        raise ValueError(f"decode_block ({decode_block}) must be a multiple of key_group_size ({key_group_size}). "
                         f"Fix: pass decode_block={-(-decode_block // key_group_size) * key_group_size}")
    if not isinstance(clip, bool):
        raise ValueError(f"clip must be True or False, got {clip!r}. Fix: clip=True (least-squares group ranges) or "
                         "clip=False (min/max ranges)")
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {list(ROTATIONS)}, got {rotation!r}. Fix: rotation='hadamard' "
                         "(spreads outliers over head_dim) or None")


class HfQuantLayer(CacheLayerMixin):
    """One attention layer's cache: packed quantized part + float window of recent tokens (module doc)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, bits: int = 4, key_group_size: int = 32, value_group_size: int = 32,
                 residual_length: int = 128, rotation: str | None = AUTO, outliers: int = 0, seed: int = 0,
                 decode_block: int = 1024, sink_length: int | None = None, left_padding: int = 0,
                 clip: bool | None = None):
        super().__init__()
        # an automatic rotation is dropped for an odd head_dim (an explicit one is refused there)
        self._rotation_auto = rotation == AUTO
        rotation, sink_length, clip = resolve_defaults(bits, rotation, sink_length, clip)
        check_settings(bits, key_group_size, value_group_size, residual_length, rotation, outliers, decode_block,
                       sink_length, left_padding, clip)
        rotation_seed = seed if rotation is not None else None
        self.key_spec = KVSpec(bits, key_group_size, "channel", outliers, rotation_seed, clip)
        self.value_spec = KVSpec(bits, value_group_size, "token", outliers, None if rotation_seed is None
                                 else rotation_seed + 1, clip)
        self.residual_length = residual_length
        self.sink_length, self.left_padding = sink_length, left_padding
        self.prefix_length = sink_length + left_padding  # tokens of the float prefix (module doc)
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
        if self._rotation_auto and 1 in (codec.hadamard_block(self.key_dim), codec.hadamard_block(self.value_dim)):
            self.key_spec = dataclasses.replace(self.key_spec, rotation_seed=None)
            self.value_spec = dataclasses.replace(self.value_spec, rotation_seed=None)
        if self.key_spec.rotation_seed is not None:
            for name, dim in (("key", self.key_dim), ("value", self.value_dim)):
                if codec.hadamard_block(dim) == 1:
                    raise ValueError(f"rotation='hadamard' needs an even {name} head_dim, got {dim}. "
                                     "Fix: pass rotation=None")
            self._key_signs = codec.rotation_signs(self.key_dim, self.key_spec.rotation_seed, self.device)
            self._value_signs = codec.rotation_signs(self.value_dim, self.value_spec.rotation_seed, self.device)
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.sink_keys, self.sink_values = self.keys.clone(), self.values.clone()
        self.is_initialized = True

    @property
    def quantized_length(self) -> int:
        return 0 if self._qkeys is None else self._qkeys["codes"].shape[-2]

    def _target_quantized(self, total: int) -> int:
        g = self.key_spec.group_size
        return max(total - self.prefix_length - self.residual_length, 0) // g * g

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new states and return (keys, values) of the whole history in float (module doc)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        quantized = self.quantized_length
        window_k = torch.cat((self.keys, key_states), -2)
        window_v = torch.cat((self.values, value_states), -2)
        keys = self._decoded(self._qkeys, self.key_spec, self.key_dim, self._key_signs, self.sink_keys, window_k)
        values = self._decoded(self._qvalues, self.value_spec, self.value_dim, self._value_signs, self.sink_values,
                               window_v)

        self.cumulative_length += key_states.shape[-2]
        take = min(self.prefix_length - self.sink_keys.shape[-2], window_k.shape[-2])
        if take > 0:  # the float prefix fills first; nothing is quantized before it is full
            self.sink_keys = torch.cat((self.sink_keys, window_k[..., :take, :]), -2)
            self.sink_values = torch.cat((self.sink_values, window_v[..., :take, :]), -2)
            window_k, window_v = window_k[..., take:, :], window_v[..., take:, :]
        flush = self._target_quantized(self.cumulative_length) - quantized
        if flush > 0:
            self._qkeys = self._append(self._qkeys, codec.quantize(window_k[..., :flush, :], self.key_spec,
                                                                   self._key_signs))
            self._qvalues = self._append(self._qvalues, codec.quantize(window_v[..., :flush, :], self.value_spec,
                                                                       self._value_signs))
            window_k, window_v = window_k[..., flush:, :].clone(), window_v[..., flush:, :].clone()
        self.keys, self.values = window_k, window_v
        return keys, values

    def _decoded(self, stored, spec, dim, signs, sinks: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """[float prefix, dequantized stored part, window] written block by block into one tensor of the window's
        dtype."""
        if stored is None:
            return torch.cat((sinks, window), -2) if sinks.shape[-2] else window
        n, s = stored["codes"].shape[-2], sinks.shape[-2]
        B, H, W, _ = window.shape
        out = torch.empty(B, H, s + n + W, dim, dtype=window.dtype, device=window.device)
        out[..., :s, :] = sinks
        block = self.decode_block
        for t0 in range(0, n, block):
            t1 = min(t0 + block, n)
            out[..., s + t0:s + t1, :] = codec.dequantize(_tokens(stored, spec, t0, t1), spec, dim, window.dtype,
                                                          signs)
        out[..., s + n:, :] = window
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
        """Every tensor this layer holds: the packed quantized part, the float prefix (sinks) and the float window."""
        out = {} if self._qkeys is None else {**{f"keys.{k}": v for k, v in self._qkeys.items()},
                                              **{f"values.{k}": v for k, v in self._qvalues.items()}}
        if self.is_initialized:
            out["keys.window"], out["values.window"] = self.keys, self.values
            out["keys.sink"], out["values.sink"] = self.sink_keys, self.sink_values
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
        self.sink_keys = self.sink_values = None
        self._qkeys = self._qvalues = None
        self.cumulative_length = 0
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
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


def padding_of(attention_mask: torch.Tensor) -> int:
    """The longest left padding (leading zeros) of a [batch, tokens] attention mask."""
    if attention_mask.dim() != 2:
        raise ValueError(f"left_padding takes an int or the prompt's [batch, tokens] attention mask, got shape "
                         f"{tuple(attention_mask.shape)}. Fix: pass the attention_mask given to generate")
    return int((attention_mask.cumsum(-1) == 0).sum(-1).max()) if attention_mask.numel() else 0


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
            Default "auto": "hadamard" at bits=2 (when head_dim is even), None otherwise.
        outliers: entries per token vector kept exactly in float16 (dense-and-sparse), 0 for none.
        seed: seed of the rotation's random signs.
        decode_block: tokens decoded at once when attention reads the cache (a multiple of key_group_size).
        sink_length: first tokens of the sequence kept in float, never quantized (attention sinks). Default: 4 at
            bits=2, 0 otherwise.
        left_padding: the batch's longest left padding (int), or the prompt's [batch, tokens] attention mask; the
            float prefix is sink_length + left_padding tokens, so each row's first sink_length real tokens are float.
        clip: choose each group's range by least squared error among the min/max range and ranges shrunk to
            0.95 ... 0.5 of it (entries outside clip to the end codes) instead of min/max. Default: True at bits=2.
    """

    def __init__(self, config=None, bits: int = 4, key_group_size: int = 32, value_group_size: int = 32,
                 residual_length: int = 128, rotation: str | None = AUTO, outliers: int = 0, seed: int = 0,
                 decode_block: int = 1024, sink_length: int | None = None, left_padding: int | torch.Tensor = 0,
                 clip: bool | None = None):
        if isinstance(left_padding, torch.Tensor):
            left_padding = padding_of(left_padding)
        rotation_given = rotation
        rotation, sink_length, clip = resolve_defaults(bits, rotation, sink_length, clip)
        check_settings(bits, key_group_size, value_group_size, residual_length, rotation, outliers, decode_block,
                       sink_length, left_padding, clip)
        self.settings = dict(bits=bits, key_group_size=key_group_size, value_group_size=value_group_size,
                             residual_length=residual_length, rotation=rotation, outliers=outliers, seed=seed,
                             decode_block=decode_block, sink_length=sink_length, left_padding=left_padding,
                             clip=clip)
        make = functools.partial(HfQuantLayer, **{**self.settings, "rotation": rotation_given if rotation_given == AUTO
                                                  else rotation})
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
