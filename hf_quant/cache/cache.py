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

Defaults depend on bits (`TWO_BIT_DEFAULTS`): at 2 bits rotation="values" (the values' Hadamard rotation),
sink_length=4 and clip=True (ranges chosen by least squared error): +1.1% perplexity on SmolLM2-135M and -0.7% on
Qwen2.5-Coder-0.5B, against +14% / +8.8% for plain 2-bit (rotating the keys too: +0.6% / +9.9%); at 3, 4 and 8 bits
no rotation, no sinks, min/max ranges (the behaviour before these options existed). Pass the arguments
explicitly to override (rotation=None, sink_length=0, clip=False is the plain 2-bit cache).

`update` returns what transformers' attention needs, the whole history in float: the quantized part is decoded
block by block (`decode_block` tokens at a time) straight into the returned tensor, so besides that tensor only one
block's scratch exists, and nothing decoded is kept between steps. Tokens that arrive in this `update` (the prompt,
a prefill chunk, the new token) are returned as given, like transformers' `QuantizedCache`.

Layers of other kinds (linear attention, KV-shared "dummy" layers, ...) get transformers' own dynamic layer and are
not quantized. Sliding-window and chunked layers are quantized and keep all their tokens (the attention mask, built
from absolute positions, still limits what each query sees), so they do not shrink to their window.

Static layout (`max_cache_len=N`, `HfQuantStaticLayer`): the growing cache above cannot be compiled (it concatenates
and repacks, so `is_compileable` is False and `generate` runs it eagerly, as with `DynamicCache`). With
`max_cache_len` every buffer is allocated once, zeroed, at its final size and updated in place: the float prefix
[P], the packed store for the Q(N) tokens that can ever be quantized, and a ring of R + 2g float tokens (R =
residual_length, g = key_group_size) where the token at position P + r lives in slot r mod (R + 2g). A single-token
step is tensor ops only, the token count being a tensor: it writes the token into its ring slot (or into the prefix
while the position is below P), then quantizes the last complete key group again from the ring (rows j*g ... j*g +
g - 1, j = Q(T) / g - 1) and writes it in place. The ring still holds that group unchanged until the next group
completes (its last R + 2g tokens always include it), so rewriting it stores the same bits, and no step branches
on whether a group just completed; the cost is one group's quantization per step. Each step returns all N
positions, like transformers' StaticLayer (the attention mask hides those at or past the token count): the prefix,
the whole store dequantized (decode_block rows at a time), and the ring's float tokens from row Q(T_before) on, so
the values returned for positions below the token count equal the growing layer's bit for bit, as do the stored
codes. Prefills (several tokens) run eagerly with host-side counts, as `generate` runs them. Being static, every
step decodes the store for all N tokens (as StaticCache attends to all N): choose N near the length needed.

Not supported: `cache_implementation=` (transformers validates that name against its fixed list and builds
`QuantizedCache` only for its own backends: there is no registration hook), cropping quantized tokens (assisted
generation; the static layer cannot be cropped at all), and compiling a multi-token call of the static layer (a
compiled prefill: refused, generate never does it).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    STATIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    get_layer_types_and_kwargs,
)

from . import codec
from .codec import KV_BITS, KVSpec

# Layer types whose keys/values this cache quantizes; any other type keeps transformers' own layer class.
QUANTIZED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
ROTATIONS = (None, "hadamard", "values")  # "values": only the values are rotated, keys stay per channel as they are


# What bits=2 defaults to, measured on two models (BENCHMARKS.md "Quantized KV cache (issue 19)" and its second-model
# section): the keys' rotation is the best choice on SmolLM2 (+0.6%) and the worst on Qwen2.5-Coder (+9.9%); the
# values' alone is +1.1% / -0.7%, under the peers' 4-bit caches on both. Other widths keep the plain defaults.
TWO_BIT_DEFAULTS = dict(rotation="values", sink_length=4, clip=True)
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
        self._rotation = rotation
        rotation_seed = seed if rotation is not None else None
        # Keys are grouped per channel over tokens: a rotation spreads their few large channels (Qwen2's key biases)
        # over every channel, which cost +37% perplexity at 2 bits on Qwen2.5-Coder (BENCHMARKS), hence "values".
        self.key_spec = KVSpec(bits, key_group_size, "channel", outliers,
                               rotation_seed if rotation == "hadamard" else None, clip)
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
        self._setup(key_states, value_states)
        self.keys = key_states[..., :0, :].clone()
        self.values = value_states[..., :0, :].clone()
        self.sink_keys, self.sink_values = self.keys.clone(), self.values.clone()
        self.is_initialized = True

    def _setup(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Device, dtype, head dims and rotation signs from the first states; the checks that need head_dim."""
        self.device, self.dtype = key_states.device, key_states.dtype
        self.key_dim, self.value_dim = key_states.shape[-1], value_states.shape[-1]
        if self.key_spec.outliers >= min(self.key_dim, self.value_dim):
            raise ValueError(f"outliers ({self.key_spec.outliers}) must be smaller than head_dim "
                             f"({min(self.key_dim, self.value_dim)}). Fix: pass a small count such as 2")
        if self._rotation_auto and 1 in (codec.hadamard_block(self.key_dim), codec.hadamard_block(self.value_dim)):
            self.key_spec = dataclasses.replace(self.key_spec, rotation_seed=None)
            self.value_spec = dataclasses.replace(self.value_spec, rotation_seed=None)
        for name, dim, spec in (("key", self.key_dim, self.key_spec), ("value", self.value_dim, self.value_spec)):
            if spec.rotation_seed is None:
                continue
            if codec.hadamard_block(dim) == 1:
                raise ValueError(f"rotation={self._rotation!r} needs an even {name} head_dim, got {dim}. "
                                 "Fix: pass rotation=None")
            signs = codec.rotation_signs(dim, spec.rotation_seed, self.device)
            if name == "key":
                self._key_signs = signs
            else:
                self._value_signs = signs

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


class HfQuantStaticLayer(HfQuantLayer):
    """An `HfQuantLayer` preallocated for `max_cache_len` tokens and updated in place, so that a single-token decode
    step has static shapes and no host-side control flow: `torch.compile` traces it into one graph (module doc,
    "Static layout"). It stores exactly what `HfQuantLayer` stores (same prefix, same Q(T), same codes) and returns
    the same values for every position below the token count."""

    is_compileable = True
    is_croppable = False

    def __init__(self, max_cache_len: int, **settings):
        super().__init__(**settings)
        _check_int("max_cache_len", max_cache_len, 1,
                   "the longest sequence (prompt + new tokens) the cache will hold, e.g. 2048")
        self.max_cache_len = max_cache_len
        g = self.key_spec.group_size
        # the ring keeps the last R + 2g float tokens: the window (at most R + g - 1 after a step, R + g during it)
        # and, until the next group completes, every token of the last quantized group, which each decode step
        # quantizes again (module doc)
        self.ring_length = self.residual_length + 2 * g
        self.capacity = self._target_quantized(max_cache_len)  # Q(max_cache_len): the quantized rows allocated
        # a tensor, updated in place: an int attribute read in the step would be guarded on and recompile each step
        self.cumulative_length = torch.zeros((), dtype=torch.long)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._setup(key_states, value_states)
        B, H = key_states.shape[:2]
        P, W, C, dev = self.prefix_length, self.ring_length, self.capacity, self.device
        zeros = functools.partial(torch.zeros, dtype=self.dtype, device=dev)
        # zeros, not empty: positions past the token count are masked, but a masked NaN would still poison the
        # attention output (0 * NaN)
        self.sink_keys, self.sink_values = zeros(B, H, P, self.key_dim), zeros(B, H, P, self.value_dim)
        self.keys, self.values = zeros(B, H, W, self.key_dim), zeros(B, H, W, self.value_dim)
        self._qkeys = _zero_store(self.key_spec, B, H, C, self.key_dim, dev)
        self._qvalues = _zero_store(self.value_spec, B, H, C, self.value_dim, dev)
        self.cumulative_length = self.cumulative_length.to(dev)
        self._ring_rows = torch.arange(W, device=dev)
        self._group_rows = torch.arange(self.key_spec.group_size, device=dev)
        if not torch.compiler.is_compiling():  # fixed addresses, as transformers' StaticLayer (cudagraphs need them)
            for t in (*self.stored_tensors().values(), self.cumulative_length, self._ring_rows, self._group_rows,
                      *(s for s in (self._key_signs, self._value_signs) if s is not None)):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    @property
    def quantized_length(self) -> int:
        return self._target_quantized(int(self.cumulative_length)) if self.is_initialized else 0

    def _check_room(self, new_tokens: int) -> None:
        total = int(self.cumulative_length) + new_tokens
        if total > self.max_cache_len:
            raise ValueError(f"max_cache_len ({self.max_cache_len}) is too small: the cache would hold {total} tokens. "
                             "Fix: HfQuantCache(max_cache_len=...) at least the prompt length + max_new_tokens")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new states in place and return (keys, values) of all max_cache_len positions in float
        (positions at or past the token count hold stale finite values, which the attention mask hides)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        compiling = torch.compiler.is_compiling()
        if key_states.shape[-2] == 1:
            if not compiling:  # compiled, the same check runs in get_mask_sizes (eager, before each step)
                self._check_room(1)
            return self._step(key_states, value_states)
        if compiling:
            raise NotImplementedError(
                f"HfQuantCache(max_cache_len=...) compiles single-token decode steps only, got {key_states.shape[-2]} "
                "tokens in a compiled call. Fix: run the prefill eagerly (generate does; compile the decode step only)")
        return self._update_eager(key_states, value_states)

    def _update_eager(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Any number of tokens, with host-side counts (prefill, chunked prefill)."""
        self._check_room(key_states.shape[-2])
        t0 = int(self.cumulative_length)
        total = t0 + key_states.shape[-2]
        P, W = self.prefix_length, self.ring_length
        q0, q1 = self._target_quantized(t0), self._target_quantized(total)
        if t0 < P:
            n = min(total, P) - t0
            self.sink_keys[..., t0:t0 + n, :] = key_states[..., :n, :]
            self.sink_values[..., t0:t0 + n, :] = value_states[..., :n, :]
        # the float tokens of rows q0.. (positions P + q0 ..): the old window from the ring, then the new tokens
        first = max(P - t0, 0)
        old = torch.arange(q0, max(t0 - P, q0), device=self.device) % W
        span_k = torch.cat((self.keys.index_select(2, old), key_states[..., first:, :]), -2)
        span_v = torch.cat((self.values.index_select(2, old), value_states[..., first:, :]), -2)
        if q1 > q0:
            self._write_rows(q0, codec.quantize(span_k[..., :q1 - q0, :], self.key_spec, self._key_signs),
                             codec.quantize(span_v[..., :q1 - q0, :], self.value_spec, self._value_signs))
        n = span_k.shape[-2]
        keep = min(n, W)
        slots = torch.arange(q0 + n - keep, q0 + n, device=self.device) % W
        self.keys.index_copy_(2, slots, span_k[..., n - keep:, :])
        self.values.index_copy_(2, slots, span_v[..., n - keep:, :])
        self.cumulative_length.fill_(total)
        keys, values = self._composed(torch.tensor(q0, device=self.device))
        # tokens of this update are returned as given, even those just quantized (as HfQuantLayer does)
        keys[..., P + q0:total, :] = span_k
        values[..., P + q0:total, :] = span_v
        return keys, values

    def _write_rows(self, row0: int, qk: dict, qv: dict) -> None:
        g = self.key_spec.group_size
        rows = qk["codes"].shape[-2]
        for stored, new in ((self._qkeys, qk), (self._qvalues, qv)):
            for name, t in new.items():
                per_group = stored is self._qkeys and name in ("scale", "offset")
                r0, r1 = (row0 // g, (row0 + rows) // g) if per_group else (row0, row0 + rows)
                stored[name][..., r0:r1, :] = t

    def _step(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """One token, tensor ops only (the compiled decode step)."""
        t = self.cumulative_length.clone()  # this token's position (the counter itself is incremented in place)
        P, W = self.prefix_length, self.ring_length
        if P:  # a decode step inside the float prefix (a prompt shorter than it)
            i = t.clamp(max=P - 1).view(1)
            for buf, new in ((self.sink_keys, key_states), (self.sink_values, value_states)):
                buf.index_copy_(2, i, torch.where(t < P, new, buf.index_select(2, i)))
        slot = torch.remainder(t - P, W).view(1)
        for buf, new in ((self.keys, key_states), (self.values, value_states)):
            buf.index_copy_(2, slot, torch.where(t >= P, new, buf.index_select(2, slot)))
        q0 = self._quantized_rows(t)
        self.cumulative_length.add_(1)
        # eagerly the host knows whether this token completes a group and skips the (idempotent) rewrite otherwise
        if self.capacity and (torch.compiler.is_compiling()
                              or (int(t) + 1 - P - self.residual_length) % self.key_spec.group_size == 0):
            self._requantize_last_group(t + 1)
        return self._composed(q0)

    def _quantized_rows(self, total: torch.Tensor) -> torch.Tensor:
        """Q(total) (module doc) as a tensor."""
        g = self.key_spec.group_size
        return torch.div((total - self.prefix_length - self.residual_length).clamp(min=0), g,
                         rounding_mode="floor") * g

    def _requantize_last_group(self, total: torch.Tensor) -> None:
        """Quantize the last complete key group's tokens (rows j*g ... j*g + g - 1, j = Q(total) / g - 1) from the
        ring and write them in place. Every step does it, whether or not this token completed the group: the ring
        still holds that group unchanged until the next one completes, so rewriting it stores the same bits, and
        the step needs no branch on the token count (its cost: one group's quantization per step)."""
        g = self.key_spec.group_size
        j = self._quantized_rows(total) // g - 1
        groups = self.capacity // g
        valid = (j >= 0) & (j < groups)  # j < 0: no group complete yet (j >= groups cannot happen in capacity)
        j = j.clamp(0, groups - 1)
        rows = j * g + self._group_rows
        slots = torch.remainder(rows, self.ring_length)
        new_k = codec.quantize(self.keys.index_select(2, slots), self.key_spec, self._key_signs, traceable=True)
        new_v = codec.quantize(self.values.index_select(2, slots), self.value_spec, self._value_signs,
                               traceable=True)
        for stored, new in ((self._qkeys, new_k), (self._qvalues, new_v)):
            for name, t in new.items():
                idx = j.view(1) if stored is self._qkeys and name in ("scale", "offset") else rows
                stored[name].index_copy_(2, idx, torch.where(valid, t, stored[name].index_select(2, idx)))

    def _composed(self, float_from: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [B, H, max_cache_len, D]: the float prefix, the dequantized rows before row `float_from`
        and the ring's float tokens from it on (row r = position P + r lives in ring slot r mod W)."""
        return (self._composed_one(self._qkeys, self.key_spec, self.key_dim, self._key_signs, self.sink_keys,
                                   self.keys, float_from),
                self._composed_one(self._qvalues, self.value_spec, self.value_dim, self._value_signs,
                                   self.sink_values, self.values, float_from))

    def _composed_one(self, stored, spec, dim, signs, sinks, ring, float_from):
        P, C, W, L = self.prefix_length, self.capacity, self.ring_length, self.max_cache_len
        B, H = ring.shape[:2]
        # out of place (cat, index_copy): inductor fuses it into the decoding; writing slices of one preallocated
        # tensor instead compiled 6x slower (measured on 4-bit SmolLM2-sized layers, CPU)
        parts = [sinks] + [codec.dequantize(_tokens(stored, spec, t0, min(t0 + self.decode_block, C)), spec, dim,
                                            ring.dtype, signs) for t0 in range(0, C, self.decode_block)]
        # then zeros for rows no group reaches (the ring writes those below the token count; the rest is masked but
        # must be finite: 0 * NaN = NaN in the attention output), with W rows of slack past max_cache_len, so the
        # ring's W rows from float_from on are written whole (no clamping at the end onto one index), sliced off
        parts.append(ring.new_zeros(B, H, L + W - P - C, dim))
        rows = float_from + self._ring_rows
        out = torch.cat(parts, -2).index_copy(2, P + rows, ring.index_select(2, torch.remainder(rows, W)))
        return out[..., :L, :]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        q = self.quantized_length
        if not q:
            return None
        return (codec.dequantize(_tokens(self._qkeys, self.key_spec, 0, q), self.key_spec, self.key_dim,
                                 torch.float32, self._key_signs),
                codec.dequantize(_tokens(self._qvalues, self.value_spec, 0, q), self.value_spec, self.value_dim,
                                 torch.float32, self._value_signs))

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Every buffer this layer allocated (for all max_cache_len tokens): packed store, prefix, ring."""
        if not self.is_initialized:
            return {}
        return {**{f"keys.{k}": v for k, v in self._qkeys.items()},
                **{f"values.{k}": v for k, v in self._qvalues.items()},
                "keys.window": self.keys, "values.window": self.values,
                "keys.sink": self.sink_keys, "values.sink": self.sink_values}

    # --- the CacheLayerMixin interface --------------------------------------------------------------------------

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.is_initialized and not torch.compiler.is_compiling():
            self._check_room(query_length)
        return self.max_cache_len, 0

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Back to the state of a fresh allocation, in place (the addresses stay fixed for the compiled step)."""
        for name, t in self.stored_tensors().items():
            t.fill_(1 if name.endswith(".scale") else 0)  # as `_zero_store`
        self.cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for t in self.stored_tensors().values():  # in place, keeping the addresses
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("HfQuantCache(max_cache_len=...) cannot be cropped (its ring of float tokens is also the "
                         "source of each step's re-quantized group). Fix: use DynamicCache for assisted generation")


def _zero_store(spec: KVSpec, B: int, H: int, tokens: int, dim: int, device) -> dict[str, torch.Tensor]:
    """Stored tensors (codec module doc) for `tokens` tokens (a multiple of the key group size), decoding to zeros;
    their dtypes and last dims from quantizing one group of zeros."""
    g = spec.group_size if spec.axis == "channel" else 1
    signs = None if spec.rotation_seed is None else codec.rotation_signs(dim, spec.rotation_seed, device)
    sample = codec.quantize(torch.zeros(1, 1, g, dim, device=device), spec, signs)
    out = {}
    for name, t in sample.items():
        rows = tokens // g if spec.axis == "channel" and name in ("scale", "offset") else tokens
        # scale 1, not 0: rows not yet written decode to 0 (values decode through offset / scale)
        fill = torch.ones if name == "scale" else torch.zeros
        out[name] = fill(B, H, rows, t.shape[-1], dtype=t.dtype, device=device)
    return out


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
            un-rotates them when decoding; "values" rotates the values only; None does not rotate.
            Default "auto": "values" at bits=2 (when head_dim is even), None otherwise.
        outliers: entries per token vector kept exactly in float16 (dense-and-sparse), 0 for none.
        seed: seed of the rotation's random signs.
        decode_block: tokens decoded at once when attention reads the cache (a multiple of key_group_size).
        sink_length: first tokens of the sequence kept in float, never quantized (attention sinks). Default: 4 at
            bits=2, 0 otherwise.
        left_padding: the batch's longest left padding (int), or the prompt's [batch, tokens] attention mask; the
            float prefix is sink_length + left_padding tokens, so each row's first sink_length real tokens are float.
        clip: choose each group's range by least squared error among the min/max range and ranges shrunk to
            0.95 ... 0.5 of it (entries outside clip to the end codes) instead of min/max. Default: True at bits=2.
        max_cache_len: None (default) grows the cache as tokens arrive. An int preallocates every buffer for that
            many tokens (prompt + new tokens) and updates them in place (`HfQuantStaticLayer`, module doc "Static
            layout"): `is_compileable` is then True and `generate` compiles the decode step where it compiles
            transformers' `StaticCache`. Needs `config`.
    """

    def __init__(self, config=None, bits: int = 4, key_group_size: int = 32, value_group_size: int = 32,
                 residual_length: int = 128, rotation: str | None = AUTO, outliers: int = 0, seed: int = 0,
                 decode_block: int = 1024, sink_length: int | None = None, left_padding: int | torch.Tensor = 0,
                 clip: bool | None = None, max_cache_len: int | None = None):
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
        layer_settings = {**self.settings, "rotation": rotation_given if rotation_given == AUTO else rotation}
        if max_cache_len is None:
            make, others = functools.partial(HfQuantLayer, **layer_settings), DYNAMIC_LAYER_TYPE_MAPPING
        else:
            _check_int("max_cache_len", max_cache_len, 1,
                       "the longest sequence (prompt + new tokens) the cache will hold, e.g. 2048")
            if config is None:
                raise ValueError("max_cache_len needs config (the static buffers are allocated per layer type, and "
                                 "a cache without layers is not compileable). Fix: HfQuantCache(config=model.config, "
                                 "max_cache_len=...)")
            self.settings["max_cache_len"] = max_cache_len
            make = functools.partial(HfQuantStaticLayer, max_cache_len, **layer_settings)
            others = {kind: functools.partial(cls, max_cache_len=max_cache_len)
                      for kind, cls in STATIC_LAYER_TYPE_MAPPING.items()}
        if config is None:
            super().__init__(layer_class_to_replicate=make)
            return
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        layers = [make() if kind in QUANTIZED_LAYER_TYPES else others[kind](**kwargs)
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
