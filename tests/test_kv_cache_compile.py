"""HfQuantCache(max_cache_len=...): the static layer stores and returns what the growing layer does (bit for bit),
and `generate` compiles its decode step the way it compiles transformers' StaticCache: one graph for every step
(fullgraph, so a graph break fails too), the same greedy tokens as the same cache run eagerly, and at 8 bits the
float cache's tokens, with a left-padded batch of 2.

torch.compile runs with the "aot_eager" backend (dynamo + AOT autograd tracing, what inductor would consume, without
inductor's C++ compile: about 75 s cold for a tiny model on this machine's one thread; benchmarks/kv_cache.py
--compile measures inductor)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils
from test_architectures import ARCHS, VOCAB
from test_kv_cache import GEN_ARCHS, states
from transformers import DynamicCache
from transformers.generation import CompileConfig

from hf_quant.cache import HfQuantCache, HfQuantLayer, HfQuantStaticLayer, codec
from hf_quant.formats import pack_bits
from hf_quant.formats.packing import pack_bits_unchecked

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = [
    dict(bits=2, key_group_size=4, value_group_size=16, residual_length=5),  # Hadamard, 4 sinks, clip
    dict(bits=2, key_group_size=8, value_group_size=16, residual_length=3, sink_length=4, left_padding=3, outliers=1),
    dict(bits=3, key_group_size=8, value_group_size=32, residual_length=0, outliers=2),
    dict(bits=4, key_group_size=4, value_group_size=20, residual_length=3, rotation="hadamard", outliers=1),
    dict(bits=8, key_group_size=4, residual_length=2, sink_length=9),
    dict(bits=2, key_group_size=4, value_group_size=16, residual_length=5, rotation="values"),
]
CHUNKS = {"prefill+steps": [7] + [1] * 30 + [3, 5, 1, 1, 9, 1, 1, 1, 1, 1], "steps": [1] * 61,
          "short prefill": [2] + [1] * 59}


@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("settings", SETTINGS)
def test_static_layer_equals_growing_layer(settings, chunks):
    """After every update the static layer returns, for each position below the token count, exactly the growing
    layer's keys and values, and its quantized rows hold the same codes, scales and offsets bit for bit."""
    k, v = states((2, 3, 61, 24), seed=1), states((2, 3, 61, 40), seed=2)
    grow, static = HfQuantLayer(**settings), HfQuantStaticLayer(64, **settings)
    t = 0
    for n in chunks:
        a = grow.update(k[..., t:t + n, :], v[..., t:t + n, :])
        b = static.update(k[..., t:t + n, :], v[..., t:t + n, :])
        t += n
        assert b[0].shape == (2, 3, 64, 24) and b[1].shape == (2, 3, 64, 40)
        assert torch.equal(a[0], b[0][..., :t, :]) and torch.equal(a[1], b[1][..., :t, :]), t
        assert static.quantized_length == grow.quantized_length and int(static.get_seq_length()) == t
        assert torch.isfinite(b[0]).all() and torch.isfinite(b[1]).all()  # masked positions too (0 * NaN = NaN)
        assert_same_store(static, grow)
    assert grow.quantized_length >= 40 and torch.equal(static.dequantized()[0], grow.dequantized()[0])
    # reset leaves it as freshly allocated: the same run gives the same returns
    static.reset()
    assert int(static.get_seq_length()) == 0
    again = feed_all(static, k, v, chunks)
    assert torch.equal(again[0], b[0]) and torch.equal(again[1], b[1])


def feed_all(layer, k, v, chunks):
    t = 0
    for n in chunks:
        out = layer.update(k[..., t:t + n, :], v[..., t:t + n, :])
        t += n
    return out


def assert_same_store(static, grow):
    """The static layer's first Q rows are the growing layer's stored tensors, bit for bit."""
    if grow._qkeys is None:
        return
    Q, g = grow.quantized_length, grow.key_spec.group_size
    for stored, grown in ((static._qkeys, grow._qkeys), (static._qvalues, grow._qvalues)):
        assert sorted(stored) == sorted(grown)
        for name, tensor in grown.items():
            rows = Q // g if stored is static._qkeys and name in ("scale", "offset") else Q
            assert torch.equal(stored[name][..., :rows, :], tensor), name


@torch.no_grad()
def test_compiled_steps_store_what_the_growing_layer_stores():
    """The compiled single-token step (which rewrites the last complete group at every step instead of only when a
    group completes, as the eager step does) returns and stores bit for bit what the growing layer does: 2 prompt
    tokens, then 40 compiled steps through the float prefix (sinks + left padding), group flushes, outliers and
    the 2-bit defaults (Hadamard, least-squares ranges)."""
    settings = SETTINGS[1]
    k, v = states((2, 3, 42, 24), seed=1), states((2, 3, 42, 40), seed=2)
    grow, static = HfQuantLayer(**settings), HfQuantStaticLayer(48, **settings)
    grow.update(k[..., :2, :], v[..., :2, :])
    static.update(k[..., :2, :], v[..., :2, :])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(static.update, backend="aot_eager", fullgraph=True)
    for t in range(2, 42):
        a = grow.update(k[..., t:t + 1, :], v[..., t:t + 1, :])
        b = step(k[..., t:t + 1, :], v[..., t:t + 1, :])
        assert torch.equal(a[0], b[0][..., :t + 1, :]) and torch.equal(a[1], b[1][..., :t + 1, :]), t
        assert_same_store(static, grow)
    assert grow.quantized_length == 32 and static.quantized_length == 32
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_static_reorder_in_place():
    """Beam reordering permutes every buffer in place (the compiled step's addresses stay) and the layer then
    returns what the reordered growing layer returns."""
    k, v = states((3, 2, 30, 16), seed=5), states((3, 2, 30, 16), seed=6)
    settings = dict(bits=3, key_group_size=4, residual_length=3)
    grow, static = HfQuantLayer(**settings), HfQuantStaticLayer(32, **settings)
    for layer in (grow, static):
        feed_all(layer, k[..., :29, :], v[..., :29, :], [20] + [1] * 9)
    addresses = {name: t.data_ptr() for name, t in static.stored_tensors().items()}
    idx = torch.tensor([2, 0, 0])
    grow.reorder_cache(idx)
    static.reorder_cache(idx)
    assert {name: t.data_ptr() for name, t in static.stored_tensors().items()} == addresses
    a, b = grow.update(k[idx, :, 29:], v[idx, :, 29:]), static.update(k[idx, :, 29:], v[idx, :, 29:])
    assert torch.equal(a[0], b[0][..., :30, :]) and torch.equal(a[1], b[1][..., :30, :])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_codes_is_pack_bits(bits):
    codes = torch.randint(0, 1 << bits, (2, 3, 5, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    assert torch.equal(pack_bits_unchecked(codes, bits), pack_bits(codes, bits))


def test_static_cache_settings_and_errors():
    model = tiny("llama")
    assert HfQuantCache(config=model.config, max_cache_len=8).is_compileable
    assert not HfQuantCache(config=model.config).is_compileable
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"^max_cache_len .*Fix: "):
            HfQuantCache(config=model.config, max_cache_len=bad)
    with pytest.raises(ValueError, match=r"max_cache_len needs config.*Fix: "):
        HfQuantCache(max_cache_len=8)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    cache = HfQuantCache(config=model.config, max_cache_len=8, bits=8, key_group_size=2, residual_length=1)
    with pytest.raises(ValueError, match=r"max_cache_len \(8\) is too small: the cache would hold 9 tokens.*Fix: "):
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, cache=cache)
    with pytest.raises(ValueError, match=r"cannot be cropped.*Fix: "):
        cache.layers[0].crop(-1)
    with pytest.raises(ValueError, match=r"max_cache_len \(8\) is too small.*Fix: "):
        model(input_ids=torch.randint(3, VOCAB, (1, 9)), cache=HfQuantCache(config=model.config, max_cache_len=8))


# --- generate, compiled -------------------------------------------------------------------------------------


def tiny(name):
    arch = ARCHS[name]
    torch.manual_seed(0)
    return arch.model_cls(arch.config_cls(**arch.kwargs)).eval()


def padded_batch(seed=1):
    """2 rows of 12 tokens, the second left-padded by 3."""
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def generate(model, ids, mask, cache, compiled: bool, n=20):
    """Greedy tokens; compiled: as transformers compiles a StaticCache's decode step (generation_config.compile_config;
    `_compile_all_devices` opts CPU in, which `generate` otherwise leaves eager)."""
    config = None
    if compiled:
        config = CompileConfig(backend="aot_eager", mode=None, fullgraph=True)
        config._compile_all_devices = True
    model.generation_config.compile_config = config
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, cache=cache)


@torch.no_grad()
@pytest.mark.parametrize("name", GEN_ARCHS)
def test_static_generate_equals_growing_on_every_architecture(name):
    """Eagerly, on every generating architecture of the test suite (GEN_ARCHS: Llama, Mistral, Qwen2, Gemma, Phi-3,
    GPT-2, OPT, Mixtral), the static cache's greedy tokens equal the growing cache's (2-bit defaults, left-padded
    batch)."""
    model = tiny(name)
    ids, mask = padded_batch(seed=3)
    kw = dict(config=model.config, bits=2, key_group_size=4, value_group_size=8, residual_length=3,
              left_padding=mask)
    grown = generate(model, ids, mask, HfQuantCache(**kw), compiled=False, n=12)
    static = HfQuantCache(max_cache_len=24, **kw)
    assert torch.equal(generate(model, ids, mask, static, compiled=False, n=12), grown)
    assert any(isinstance(layer, HfQuantStaticLayer) and layer.quantized_length >= 8 for layer in static.layers)


@torch.no_grad()
@pytest.mark.parametrize("name, settings", [
    ("llama", dict(bits=2, key_group_size=4, value_group_size=8, residual_length=3)),  # bits=2 defaults
    ("qwen2", dict(bits=4, key_group_size=4, value_group_size=8, residual_length=2, sink_length=1, outliers=1)),
])
def test_compiled_decode_equals_eager_and_compiles_once(name, settings):
    """Left-padded batch of 2, prompt 12 + 20 greedy tokens (most of them quantized, several group flushes):
    compiled tokens == the static cache run eagerly == the growing cache; every decode step runs one compiled
    graph (dynamo captures one graph, none recompiled, fullgraph so no graph break), and a second generate with a
    new cache reuses it."""
    model = tiny(name)
    ids, mask = padded_batch()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    make = lambda **kw: HfQuantCache(config=model.config, left_padding=mask, **settings, **kw)  # noqa: E731
    grown = generate(model, ids, mask, make(), compiled=False)
    eager = generate(model, ids, mask, make(max_cache_len=32), compiled=False)
    assert torch.equal(eager, grown)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    cache = make(max_cache_len=32)
    compiled = generate(model, ids, mask, cache, compiled=True)
    assert torch.equal(compiled, eager)
    assert cache.layers[0].quantized_length >= 16 and int(cache.get_seq_length()) == 31
    # 19 compiled decode steps; a recompile on any step's token count would add a graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(generate(model, ids, mask, make(max_cache_len=32), compiled=True), compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@torch.no_grad()
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_compiled_8bit_matches_float_cache(name):
    """8-bit compiled static cache, left-padded batch of 2: the float cache's greedy tokens (small groups and
    window, so most of the 32 tokens are quantized)."""
    model = tiny(name)
    ids, mask = padded_batch(seed=2)
    torch._dynamo.reset()
    ref = generate(model, ids, mask, DynamicCache(config=model.config), compiled=False)
    cache = HfQuantCache(config=model.config, bits=8, key_group_size=4, value_group_size=8, residual_length=2,
                         left_padding=mask, max_cache_len=40)
    assert torch.equal(generate(model, ids, mask, cache, compiled=True), ref)
    assert cache.layers[0].quantized_length >= 24
