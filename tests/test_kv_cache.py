"""hf_quant.cache: the key/value codec against a plain-PyTorch reference, the cache's contents after many appends
against one-shot quantization, and generation with HfQuantCache on the tiny models of test_architectures.py.

Logit bounds are relative Frobenius errors against the float cache, measured once and given about 1.6x margin."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from test_architectures import ARCHS, CAUSAL, VOCAB
from transformers import DynamicCache

import hf_quant
from hf_quant.cache import HfQuantCache, HfQuantLayer, KVSpec, codec
from hf_quant.formats import unpack_bits

pytestmark = pytest.mark.usefixtures("one_thread")


def states(shape, seed=0, outlier_channel=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x = x + torch.randn(shape[-1], generator=g) * 3  # channel means, as keys have
    if outlier_channel is not None:
        x[..., outlier_channel] *= 20
    return x


def signs_of(spec, dim):
    return None if spec.rotation_seed is None else codec.rotation_signs(dim, spec.rotation_seed)


def reference_groups(x: torch.Tensor, spec: KVSpec):
    """Plain loops: (group slices, lo, hi) of every quantization group of x [B, H, T, D]."""
    B, H, T, D = x.shape
    out = []
    if spec.axis == "channel":
        for t0 in range(0, T, spec.group_size):
            out.append((slice(t0, min(t0 + spec.group_size, T)), slice(None)))
    else:
        g = min(spec.group_size, D)
        for d0 in range(0, D, g):
            out.append((slice(None), slice(d0, min(d0 + g, D))))
    return out


# --- the codec ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("spec_args", [(8, "channel"), (5, "channel"), (32, "token"), (16, "token"), (64, "token")])
@pytest.mark.parametrize("shape", [(2, 3, 37, 48), (1, 2, 9, 20)])  # head_dim 48, 20: no power of two; odd tokens
def test_codec_matches_reference(bits, spec_args, shape):
    """Codes are the nearest code under the stored scale/offset, every group's range lies within its codes, and
    each entry is within half a step of its value (groups taken along the axis the spec names)."""
    spec = KVSpec(bits, spec_args[0], spec_args[1])
    x = states(shape)
    t = codec.quantize(x, spec)
    y = codec.dequantize(t, spec, shape[-1])
    codes = unpack_bits(t["codes"], bits, shape[-1])
    scale, offset = t["scale"].float(), t["offset"].float()
    for gi, (ts, ds) in enumerate(reference_groups(x, spec)):
        xs = x[:, :, ts, ds]
        if spec.axis == "channel":
            s, o = scale[:, :, gi : gi + 1, :], offset[:, :, gi : gi + 1, :]
            lo, hi = xs.amin(2, keepdim=True), xs.amax(2, keepdim=True)
        else:
            s, o = scale[..., gi : gi + 1], offset[..., gi : gi + 1]
            lo, hi = xs.amin(3, keepdim=True), xs.amax(3, keepdim=True)
        assert (o <= lo).all() and (o + spec.maxq * s >= hi - 1e-6 * hi.abs() - 1e-6).all()
        # float16 scale/offset: offset at most one ulp below lo, scale rounded up (at least float16's tiny)
        assert (s <= (hi - lo) / spec.maxq * (1 + 2e-3) + lo.abs() * 2e-3 / spec.maxq + 7e-5).all()
        q_ref = ((xs - o) / s).round().clamp(0, spec.maxq)
        assert torch.equal(codes[:, :, ts, ds].float(), q_ref)
        assert ((y[:, :, ts, ds] - xs).abs() <= s / 2 * (1 + 1e-5) + 1e-6).all()
    # and the error shrinks with bits as uniform quantization's does
    rel = ((y - x).norm() / x.norm()).item()
    assert rel < {2: 0.45, 3: 0.2, 4: 0.1, 8: 0.006}[bits]


def test_keys_per_channel_beat_per_token_on_channel_outliers():
    """The point of per-channel keys (KIVI): a channel with a large range spoils per-token groups only."""
    x = states((1, 2, 64, 32), outlier_channel=3)
    err = {}
    for axis, g in (("channel", 32), ("token", 32)):
        spec = KVSpec(2, g, axis)
        err[axis] = ((codec.dequantize(codec.quantize(x, spec), spec, 32) - x).norm() / x.norm()).item()
    assert err["channel"] < err["token"] / 1.6  # measured 0.27 vs 0.57


def test_hadamard_rotation():
    """The butterflies equal the Sylvester matrix, undo themselves, and spread a token outlier so 2-bit values
    reconstruct better; without head_dim a power of two the blocks are the largest power of two dividing it."""
    D = 48
    assert codec.hadamard_block(D) == 16 and codec.hadamard_block(64) == 64 and codec.hadamard_block(7) == 1
    h = torch.ones(1, 1)
    while h.shape[0] < 16:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    R = torch.block_diag(*[h / 4] * 3)
    signs = codec.rotation_signs(D, 3)
    x = torch.randn(2, 2, 5, D)
    torch.testing.assert_close(codec.rotate(x, signs), (x * signs) @ R, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(codec.unrotate(codec.rotate(x, signs), signs), x, atol=1e-5, rtol=1e-5)
    v = torch.randn(1, 2, 64, 64)
    v[..., torch.arange(64), torch.randint(0, 64, (64,))] = 40.0  # one large entry per token
    errs = []
    for seed in (None, 0):
        spec = KVSpec(2, 64, "token", rotation_seed=seed)
        y = codec.dequantize(codec.quantize(v, spec, signs_of(spec, 64)), spec, 64, signs=signs_of(spec, 64))
        errs.append(((y - v).norm() / v.norm()).item())
    assert errs[1] < errs[0] / 1.5


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_outliers_kept_exactly(axis):
    v = torch.randn(1, 2, 32, 64)
    v[0, 1, 5, 7] = 100.0
    plain = KVSpec(2, 16, axis)
    sparse = KVSpec(2, 16, axis, outliers=1)
    y0 = codec.dequantize(codec.quantize(v, plain), plain, 64)
    t = codec.quantize(v, sparse)
    assert t["out_index"][0, 1, 5, 0] == 7 and t["out_values"][0, 1, 5, 0] == 100.0
    y1 = codec.dequantize(t, sparse, 64)
    assert y1[0, 1, 5, 7] == 100.0
    # the outlier's group no longer spans [.., 100]: its other entries get back their resolution
    group = (0, 1, slice(5, 6), slice(0, 16)) if axis == "token" else (0, 1, slice(0, 16), slice(7, 8))
    assert (y1 - v)[group].norm() < (y0 - v)[group].norm() / 1.6  # measured ratios 1.8 (channel), 2.6 (token)
    assert (y1 - v).norm() < (y0 - v).norm()


# --- the cache layer -----------------------------------------------------------------------------------------


def feed(layer: HfQuantLayer, k: torch.Tensor, v: torch.Tensor, chunks: list[int]):
    outs, t0 = [], 0
    for n in chunks:
        outs.append(layer.update(k[..., t0 : t0 + n, :], v[..., t0 : t0 + n, :]))
        t0 += n
    assert t0 == k.shape[-2]
    return outs


@pytest.mark.parametrize("settings", [
    # bits=2 takes its defaults: Hadamard rotation, 4 float sinks, least-squares ranges (clip)
    dict(bits=2, key_group_size=4, value_group_size=16, residual_length=5),
    dict(bits=2, key_group_size=4, value_group_size=16, residual_length=5, rotation=None, sink_length=0, clip=False),
    dict(bits=2, key_group_size=8, value_group_size=16, residual_length=3, sink_length=4, left_padding=3,
         outliers=1),
    dict(bits=3, key_group_size=8, value_group_size=32, residual_length=0, outliers=2),
    dict(bits=3, key_group_size=8, value_group_size=32, residual_length=0, sink_length=9, clip=True),
    dict(bits=4, key_group_size=4, value_group_size=20, residual_length=3, rotation="hadamard", outliers=1),
])
def test_appends_equal_one_shot(settings):
    """After a prefill, many single-token steps and a few chunks, the stored tensors are bit for bit the one-shot
    quantization of the same tokens, the float prefix (sinks) holds exactly the first tokens and the float window
    exactly the rest."""
    k, v = states((2, 3, 61, 24), seed=1), states((2, 3, 61, 40), seed=2)
    layer = HfQuantLayer(**settings)
    chunks = [7] + [1] * 30 + [3, 5, 1, 1, 9, 1, 1, 1, 1, 1]
    feed(layer, k, v, chunks)
    g, R = settings["key_group_size"], settings["residual_length"]
    P = layer.prefix_length
    assert P == (4 if settings["bits"] == 2 and "sink_length" not in settings else settings.get("sink_length", 0)) \
        + settings.get("left_padding", 0)
    Q = (61 - P - R) // g * g
    assert layer.quantized_length == Q and layer.get_seq_length() == 61
    one_k = codec.quantize(k[..., P:P + Q, :], layer.key_spec, layer._key_signs)
    one_v = codec.quantize(v[..., P:P + Q, :], layer.value_spec, layer._value_signs)
    for stored, one in ((layer._qkeys, one_k), (layer._qvalues, one_v)):
        assert sorted(stored) == sorted(one)
        for name in one:
            assert torch.equal(stored[name], one[name]), name
    assert torch.equal(layer.sink_keys, k[..., :P, :]) and torch.equal(layer.sink_values, v[..., :P, :])
    assert torch.equal(layer.keys, k[..., P + Q:, :]) and torch.equal(layer.values, v[..., P + Q:, :])


def test_two_bit_defaults():
    """bits=2 defaults to the values' Hadamard rotation, 4 float sinks and least-squares ranges (measured on two
    models: BENCHMARKS.md);
    other widths keep the plain defaults; an automatic rotation is dropped for an odd head_dim."""
    assert {k: HfQuantCache(bits=2).settings[k] for k in ("rotation", "sink_length", "clip", "key_group_size")} \
        == dict(rotation="values", sink_length=4, clip=True, key_group_size=32)
    for bits in (3, 4, 8):
        assert {k: HfQuantCache(bits=bits).settings[k] for k in ("rotation", "sink_length", "clip")} \
            == dict(rotation=None, sink_length=0, clip=False)
    layer = HfQuantLayer(bits=2)
    layer.update(torch.randn(1, 1, 4, 15), torch.randn(1, 1, 4, 16))
    assert layer.value_spec.rotation_seed is None and layer.sink_keys.shape[-2] == 4
    default = HfQuantLayer(bits=2)  # rotation="values": values rotated (seed + 1), keys not
    assert default.key_spec.rotation_seed is None and default.value_spec.rotation_seed == 1


@pytest.mark.parametrize("chunks", [[3, 1, 1, 39], [1] * 44, [44]])
def test_sinks_stay_bit_exact_float(chunks):
    """The first sink_length tokens are never quantized: stored as given and returned bit for bit at every step,
    however the tokens arrive; they are not part of any key group."""
    k, v = states((2, 2, 44, 16), seed=7), states((2, 2, 44, 16), seed=8)
    k[..., 0, :] *= 30  # a sink-like first token with a huge key
    layer = HfQuantLayer(bits=2, key_group_size=8, value_group_size=8, residual_length=4, sink_length=5)
    t0 = 0
    for n, (keys, values) in zip(chunks, feed(layer, k, v, chunks)):
        t0 += n
        s = min(5, t0)
        assert torch.equal(keys[..., :s, :], k[..., :s, :]) and torch.equal(values[..., :s, :], v[..., :s, :])
    assert torch.equal(layer.sink_keys, k[..., :5, :]) and layer.quantized_length == 32
    # the huge first key does not stretch the first key group's range: it was never in it
    plain = HfQuantLayer(bits=2, key_group_size=8, value_group_size=8, residual_length=4, sink_length=0)
    feed(plain, k, v, [44])
    err = lambda lay, P: (lay.dequantized()[0][..., :8, :] - k[..., P:P + 8, :]).norm()  # noqa: E731
    assert err(layer, 5) < err(plain, 0) / 3


def test_update_returns_decoded_history_block_by_block():
    """update returns [decoded quantized part, float window, new tokens]; the block size changes nothing."""
    k, v = states((1, 2, 50, 16), seed=3), states((1, 2, 50, 16), seed=4)
    outs = {}
    for block in (4, 1024):
        layer = HfQuantLayer(bits=4, key_group_size=4, value_group_size=8, residual_length=6, decode_block=block)
        feed(layer, k[..., :49, :], v[..., :49, :], [20] + [1] * 29)
        before = layer.dequantized()
        keys, values = layer.update(k[..., 49:, :], v[..., 49:, :])
        Q = before[0].shape[-2]
        assert keys.shape == (1, 2, 50, 16)
        assert torch.equal(keys[..., :Q, :], before[0]) and torch.equal(values[..., :Q, :], before[1])
        assert torch.equal(keys[..., Q:, :], k[..., Q:, :]) and torch.equal(values[..., Q:, :], v[..., Q:, :])
        outs[block] = (keys, values)
    assert torch.equal(outs[4][0], outs[1024][0]) and torch.equal(outs[4][1], outs[1024][1])


def test_storage_is_packed():
    """No float copy of the quantized part: the layer holds codes, float16 scales/offsets and the window only."""
    B, H, T, D = 1, 2, 200, 64
    layer = HfQuantLayer(bits=2, key_group_size=32, value_group_size=32, residual_length=40)
    feed(layer, states((B, H, T, D)), states((B, H, T, D), seed=5), [100] + [1] * 100)
    Q = layer.quantized_length
    assert Q == 128  # bits=2 defaults to 4 float sinks: 32 * floor((200 - 4 - 40) / 32)
    tensors = layer.stored_tensors()
    float_entries = sum(t.numel() for n, t in tensors.items() if t.dtype == torch.float32)
    assert tensors["keys.sink"].shape[-2] == 4
    assert float_entries == 2 * B * H * (T - Q) * D  # the sinks and the window only
    expected_bits = codec.stored_bits_per_entry(layer.key_spec, D) + codec.stored_bits_per_entry(layer.value_spec, D)
    assert expected_bits == 2 * (2 + 1)
    assert layer.nbytes() == B * H * Q * D * expected_bits / 8 + float_entries * 4


def test_batch_reorder_is_exact():
    k, v = states((3, 2, 40, 16)), states((3, 2, 40, 16), seed=6)
    layer = HfQuantLayer(bits=3, key_group_size=8, residual_length=8)
    feed(layer, k, v, [30] + [1] * 10)
    before = layer.dequantized()
    idx = torch.tensor([2, 0, 0])
    layer.reorder_cache(idx)
    after = layer.dequantized()
    assert torch.equal(after[0], before[0][idx]) and torch.equal(after[1], before[1][idx])


# --- generation on the tiny models ---------------------------------------------------------------------------

GEN_ARCHS = [name for name in CAUSAL if not ARCHS[name].moe] + ["mixtral"]


@pytest.fixture(scope="module", params=GEN_ARCHS)
def tiny(request):
    arch = ARCHS[request.param]
    torch.manual_seed(0)
    return arch.model_cls(arch.config_cls(**arch.kwargs)).eval()


def greedy(model, ids, mask, cache, n=16):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=model.config.pad_token_id, cache=cache)


def test_generate_8bit_matches_float_with_left_padding(tiny):
    """Greedy tokens with the 8-bit cache equal the float cache's, batch of 2 with left padding; small groups and
    window so that most of the 44 tokens are quantized."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 28), generator=g)
    mask = torch.ones_like(ids)
    pad = tiny.config.pad_token_id
    ids[1, :5], mask[1, :5] = pad, 0
    ref = greedy(tiny, ids, mask, DynamicCache(config=tiny.config))
    cache = HfQuantCache(config=tiny.config, bits=8, key_group_size=4, value_group_size=8, residual_length=4)
    out = greedy(tiny, ids, mask, cache)
    assert torch.equal(out, ref)
    layer = next(layer for layer in cache.layers if isinstance(layer, HfQuantLayer))
    assert layer.quantized_length >= 36


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # transformers v5 renamed it
def test_past_key_values_alias_and_lazy_export():
    model = ARCHS["llama"].model_cls(ARCHS["llama"].config_cls(**ARCHS["llama"].kwargs)).eval()
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    cache = hf_quant.HfQuantCache(config=model.config, bits=4, key_group_size=4, residual_length=2)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache, pad_token_id=0)
    assert out.shape == (1, 16) and cache.get_seq_length() == 15 and cache.layers[0].quantized_length == 12


# measured relative logit errors (llama tiny, 2 x 40 tokens, 2 layers): 8 bits 0.0012, 4 bits 0.017, 2 bits 0.068
# (bits=2 defaults: Hadamard, 4 sinks, least-squares ranges; 0.099 with none of them)
LOGIT_BOUNDS = {8: 0.002, 4: 0.027, 2: 0.11}


def chunked_logits(model, ids, cache):
    out = [model(input_ids=ids[:, :8], cache=cache, use_cache=True).logits]
    for t in range(8, ids.shape[1]):
        out.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(out, 1)


def _tiny_llama_with_float_logits():
    """The tiny llama, 2 x 40 token ids, and its teacher-forced logits through the float cache."""
    arch = ARCHS["llama"]
    torch.manual_seed(0)
    model = arch.model_cls(arch.config_cls(**arch.kwargs)).eval()
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    return model, ids, chunked_logits(model, ids, DynamicCache(config=model.config))


@torch.no_grad()
def test_logits_within_bounds_of_float_cache():
    """Teacher-forced logits through the quantized cache stay within a stated bound of the float cache's, and the
    error orders with bits."""
    model, ids, ref = _tiny_llama_with_float_logits()
    errs = {}
    for bits in (8, 4, 2):
        cache = HfQuantCache(config=model.config, bits=bits, key_group_size=4, value_group_size=16,
                             residual_length=2)
        out = chunked_logits(model, ids, cache)
        errs[bits] = ((out - ref).norm() / ref.norm()).item()
    for bits, bound in LOGIT_BOUNDS.items():
        assert errs[bits] < bound, (bits, errs)
    assert errs[8] < errs[4] / 4 < errs[2] / 4


PLAIN_2BIT = dict(rotation=None, sink_length=0, clip=False)


@torch.no_grad()
def test_two_bit_defaults_beat_plain_two_bit_logits():
    """On the tiny llama the 2-bit defaults (sinks + Hadamard + least-squares ranges) have a lower teacher-forced
    logit error against the float cache than plain 2-bit, and sinks + Hadamard alone already do."""
    model, ids, ref = _tiny_llama_with_float_logits()
    errs = {}
    for name, kw in (("plain", PLAIN_2BIT), ("defaults", {}), ("sinks+hadamard", dict(rotation="hadamard", clip=False))):
        cache = HfQuantCache(config=model.config, bits=2, key_group_size=4, value_group_size=16, residual_length=2,
                             **kw)
        errs[name] = ((chunked_logits(model, ids, cache) - ref).norm() / ref.norm()).item()
    # measured: plain 0.099, defaults 0.068, sinks + Hadamard 0.088
    assert errs["defaults"] < errs["plain"] / 1.25, errs
    assert errs["sinks+hadamard"] < errs["plain"], errs


def attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / k.shape[-1] ** 0.5, -1) @ v


def test_sinks_and_hadamard_cut_attention_output_error():
    """Attention output through the 2-bit cache against the float cache, on states with an attention sink (a first
    token whose key has a large norm along the queries' common direction, taking most of the attention mass, as in
    trained LMs) and an outlier key channel: sinks + Hadamard beat plain 2-bit, and the defaults beat both."""
    B, H, T, D = 1, 4, 192, 64
    g = torch.Generator().manual_seed(11)
    k, v = states((B, H, T, D), seed=12, outlier_channel=5), states((B, H, T, D), seed=13)
    direction = torch.randn(D, generator=g)
    direction /= direction.norm()
    k[..., 0, :] = k[..., 0, :] * 4 + 60 * direction
    v[..., 0, :] *= 0.1
    q = torch.randn(B, H, 16, D, generator=g) + 3 * direction
    ref = attention(q, k, v)
    errs = {}
    for name, kw in (("plain", PLAIN_2BIT), ("sinks+hadamard", dict(rotation="hadamard", clip=False)), ("defaults", {})):
        layer = HfQuantLayer(bits=2, residual_length=16, **kw)
        layer.update(k[..., :-1, :], v[..., :-1, :])
        keys, values = layer.update(k[..., -1:, :], v[..., -1:, :])
        errs[name] = ((attention(q, keys, values) - ref).norm() / ref.norm()).item()
    # measured: plain 0.264, sinks + Hadamard 0.204, defaults 0.188
    assert errs["sinks+hadamard"] < errs["plain"] / 1.15, errs
    assert errs["defaults"] < errs["sinks+hadamard"], errs


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_clip_never_worse_than_min_max(bits, axis):
    """clip picks, per group, the least squared error among the min/max range and shrunken ones: never worse
    than min/max group by group, and better overall on Gaussian-like data; codes stay nearest under the stored
    scale/offset."""
    x = states((2, 2, 64, 48), seed=14)
    plain, clipped = KVSpec(bits, 16, axis), KVSpec(bits, 16, axis, clip=True)
    y0 = codec.dequantize(codec.quantize(x, plain), plain, 48)
    t = codec.quantize(x, clipped)
    y1 = codec.dequantize(t, clipped, 48)
    gdim = -2 if axis == "channel" else -1
    grouped = lambda e: e.square().unflatten(gdim, (-1, 16)).sum(gdim)  # noqa: E731
    assert (grouped(y1 - x) <= grouped(y0 - x) * (1 + 1e-5) + 1e-6).all()
    assert (y1 - x).norm() < (y0 - x).norm() * 0.95
    s, o = t["scale"].float(), t["offset"].float()
    if axis == "channel":
        s, o = s.repeat_interleave(16, -2), o.repeat_interleave(16, -2)
    else:
        s, o = s.repeat_interleave(16, -1), o.repeat_interleave(16, -1)
    assert torch.equal(unpack_bits(t["codes"], bits, 48).float(), ((x - o) / s).round().clamp(0, (1 << bits) - 1))


@torch.no_grad()
def test_left_padding_keeps_each_rows_first_tokens_float():
    """Batch of 3 with left padding 0/5/2: left_padding=attention_mask extends the float prefix by the longest
    padding (5), so every row's first sink_length real tokens (and the pads) stay float, bit for bit the float
    cache's; the rest is quantized and 2-bit generation runs with every row."""
    arch = ARCHS["llama"]
    torch.manual_seed(0)
    model = arch.model_cls(arch.config_cls(**arch.kwargs)).eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (3, 30), generator=g)
    mask = torch.ones_like(ids)
    pads = [0, 5, 2]
    for b, p in enumerate(pads):
        ids[b, :p], mask[b, :p] = 0, 0
    ref = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, cache=ref, use_cache=True)
    cache = HfQuantCache(config=model.config, bits=2, key_group_size=4, residual_length=4, left_padding=mask)
    assert cache.settings["left_padding"] == 5 and cache.settings["sink_length"] == 4
    model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    for layer, fl in zip(cache.layers, ref.layers):
        assert layer.prefix_length == 9 and layer.quantized_length == 16
        for b, p in enumerate(pads):
            assert torch.equal(layer.sink_keys[b, :, p:p + 4], fl.keys[b, :, p:p + 4])
            assert torch.equal(layer.sink_values[b, :, p:p + 4], fl.values[b, :, p:p + 4])
    out = greedy(model, ids, mask, HfQuantCache(config=model.config, bits=2, key_group_size=4, residual_length=4,
                                                 left_padding=mask), n=8)
    assert out.shape == (3, 38)


# --- bad arguments ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    (dict(bits=5), "bits"), (dict(bits=True), "bits"), (dict(bits="4"), "bits"),
    (dict(residual_length=-1), "residual_length"), (dict(key_group_size=0), "key_group_size"),
    (dict(value_group_size=2.5), "value_group_size"), (dict(outliers=-1), "outliers"),
    (dict(rotation="random"), "rotation"), (dict(decode_block=100), "decode_block"),
    (dict(sink_length=-1), "sink_length"), (dict(left_padding=1.5), "left_padding"), (dict(clip="yes"), "clip"),
    (dict(left_padding=torch.ones(3)), "left_padding"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} .*Fix: "):
        HfQuantCache(**kwargs)


def test_bad_arguments_found_at_first_update():
    with pytest.raises(ValueError, match="outliers .* smaller than head_dim"):
        HfQuantLayer(outliers=16).update(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16))
    with pytest.raises(ValueError, match="rotation='hadamard' needs an even key head_dim"):
        HfQuantLayer(rotation="hadamard").update(torch.randn(1, 1, 4, 15), torch.randn(1, 1, 4, 16))
    layer = HfQuantLayer(key_group_size=4, residual_length=2)
    layer.update(torch.randn(1, 1, 9, 8), torch.randn(1, 1, 9, 8))
    layer.crop(-1)
    assert layer.get_seq_length() == 8
    with pytest.raises(ValueError, match="quantized tokens cannot be removed"):
        layer.crop(-5)


def test_values_only_rotation_stores_plain_keys_and_rotated_values():
    """rotation="values": the stored keys are those of rotation=None and the stored values those of "hadamard", bit
    for bit; decoding un-rotates the values only (decoded history equal to the matching halves)."""
    torch.manual_seed(3)
    k, v = torch.randn(2, 3, 70, 32), torch.randn(2, 3, 70, 32)
    layers = {r: HfQuantLayer(bits=2, rotation=r, sink_length=0, clip=True, residual_length=8)
              for r in (None, "hadamard", "values")}
    for layer in layers.values():
        layer.update(k, v)
    stored = {r: layer.stored_tensors() for r, layer in layers.items()}
    keys_of = {n: t for n, t in stored["values"].items() if "key" in n}
    assert keys_of, list(stored["values"])
    for n, t in stored["values"].items():  # (the float window and sinks are the inputs themselves)
        ref = stored[None] if "key" in n else stored["hadamard"]
        assert torch.equal(t, ref[n]), n
    decoded = {r: layer.dequantized() for r, layer in layers.items()}
    assert torch.equal(decoded["values"][0], decoded[None][0]) and torch.equal(decoded["values"][1],
                                                                                decoded["hadamard"][1])
    assert not torch.equal(decoded["values"][0], decoded["hadamard"][0])
