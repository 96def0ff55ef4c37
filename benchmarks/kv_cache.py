"""Quantized KV caches on SmolLM2-135M (float32, CPU) and Botchan text: hf_quant's `HfQuantCache` beside
transformers' `QuantizedCache` with the quanto and HQQ backends at the same bits.

For every cache:
- perplexity over windows of `--window` tokens (SmolLM2 allows 2048), the tokens fed `--chunk` at a time through
  the cache (chunked prefill: every chunk after the first attends to the cached, quantized history);
- bytes per token of the cache at the end of a window (every tensor it holds, all 30 layers; the float32 model's
  float window included), and bits per cached key/value entry;
- greedy agreement with the float cache: a `--prompt`-token prompt, then `--new-tokens` greedy steps; the length of
  the common prefix and the fraction of positions equal to the float cache's tokens;
- decode tokens/s over those steps (context `--prompt` tokens and up).

The peers are optional (`QuantizedCache` needs optimum-quanto / hqq); installed beside the venv so that their import
side effects (hqq loads torch._inductor when transformers imports it) stay out of the shared environment:

    pip install --no-deps --target /tmp/kv_bench_deps optimum-quanto hqq termcolor einops
    PYTHONPATH=/tmp/kv_bench_deps OMP_NUM_THREADS=1 python benchmarks/kv_cache.py [--windows 1] [--only NAME ...]

A peer that does not import or fails is listed with its error, not measured.

`--decode` measures decode speed only, eager against compiled, the way `generate` compiles a static cache's decode
step (generation_config.compile_config; `--backend`, default inductor): for each `--decode-rows` name, greedy
`--new-tokens` after a `--prompt`-token prompt through `generate`, step times taken between successive logits
processor calls (one forward and the sampling step each; the compiled rows after one warm-up generate that
compiles). A name ending in " static" is the preallocated cache (`HfQuantCache(max_cache_len=...)`, "float static"
transformers' `StaticCache`), run eagerly and compiled; the others run eagerly only (they are not compileable).

    OMP_NUM_THREADS=1 python benchmarks/kv_cache.py --decode [--backend inductor] [--decode-rows NAME ...]

`--layer-step` times one attention layer's decode step alone (no model): the growing layer eagerly, the static layer
eagerly and compiled, for each "ours ..." name in `--decode-rows`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, DynamicCache, LogitsProcessor, QuantizedCache,
                          StaticCache)
from transformers.generation import CompileConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hf_quant.assets import botchan_text, qwen25_coder_path, smollm2_path  # noqa: E402

MODELS = {"smollm2": ("SmolLM2-135M", smollm2_path), "qwen25-coder": ("Qwen2.5-Coder-0.5B-Instruct", qwen25_coder_path)}
from hf_quant.cache import HfQuantCache  # noqa: E402

FLOAT = "float"
# "ours int2 ..." rows name every option that is on (ours_settings); "default" is HfQuantCache(bits=2) as shipped
# (hadamard + 4 sinks + clip, cache.TWO_BIT_DEFAULTS). int3/4/8 are the plain defaults.
OURS_ROWS = ["ours int8", "ours int4", "ours int3", "ours int2", "ours int2 hadamard", "ours int2 sinks=4",
             "ours int2 hadamard sinks=4", "ours int2 clip", "ours int2 sinks=4 clip", "ours int2 default",
             "ours int2 default kg=16", "ours int2 default window=64", "ours int2 default outliers=2"]
# transformers' QuantizedCache defaults (q_group_size 64, residual_length 128); HQQ on axis 1 as transformers'
# documentation recommends for it, quanto on its default axis 0 (it accepts only 0 or -1).
PEERS = {
    "quanto int4": dict(backend="quanto", nbits=4),
    "quanto int2": dict(backend="quanto", nbits=2),
    "hqq int4": dict(backend="hqq", nbits=4, axis_key=1, axis_value=1),
    "hqq int2": dict(backend="hqq", nbits=2, axis_key=1, axis_value=1),
}


# words of an "ours ..." row name -> HfQuantCache arguments ("vrot": rotation="values", the values only); any such name is a row (--only "ours int2 sinks=4 kg=16")
WORDS = {"hadamard": ("rotation", str), "vrot": ("rotation", str), "clip": ("clip", bool), "outliers": ("outliers", int),
         "sinks": ("sink_length", int), "kg": ("key_group_size", int), "vg": ("value_group_size", int),
         "window": ("residual_length", int)}
PLAIN = dict(rotation=None, sink_length=0, clip=False)


def ours_settings(name: str) -> dict:
    """HfQuantCache arguments of a row name "ours int<bits> [default] [hadamard] [clip] [sinks=s] [outliers=k]
    [kg=g] [vg=g] [window=r]": without "default" every option not named is off (no rotation, sinks or clip), with
    it the bits' defaults apply and the words add to them."""
    words = name.split()
    if words[0] != "ours" or not words[1].startswith("int"):
        raise KeyError(name)
    out = dict(bits=int(words[1][3:]))
    if "default" in words:
        words.remove("default")
    else:
        out.update(PLAIN)
    for word in words[2:]:
        key, _, value = word.partition("=")
        arg, kind = WORDS[key]
        out[arg] = {"hadamard": "hadamard", "vrot": "values", "clip": True}.get(key) or kind(value)
    return out


STATIC = " static"
DECODE_ROWS = ["float", "float static", "ours int8", "ours int8 static", "ours int4", "ours int4 static",
               "ours int2 default", "ours int2 default static"]


def make_cache(name: str, config, max_cache_len: int | None = None):
    """The cache of a row name; a name ending in " static" is preallocated for max_cache_len tokens."""
    if name.endswith(STATIC):
        if max_cache_len is None:
            raise ValueError(f"row {name!r} is a static cache. Fix: pass max_cache_len")
        base = name[: -len(STATIC)]
        if base == FLOAT:
            return StaticCache(config=config, max_cache_len=max_cache_len)
        return HfQuantCache(config=config, max_cache_len=max_cache_len, **ours_settings(base))
    if name == FLOAT:
        return DynamicCache(config=config)
    if name.startswith("ours "):
        return HfQuantCache(config=config, **ours_settings(name))
    return QuantizedCache(config=config, **PEERS[name])


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from `obj` (tensor subclasses such as quanto's through
    `__tensor_flatten__`, containers, object attributes), each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        key = (obj.untyped_storage().data_ptr(), obj.numel(), obj.dtype)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(tensor_bytes(v, seen) for k, v in vars(obj).items() if k not in ("optimizer", "quantizer"))
    return 0


def cache_bytes(cache) -> int:
    return sum(tensor_bytes(layer) for layer in cache.layers)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, name: str, windows: int, window: int, chunk: int):
    nll, count, bytes_per_token = 0.0, 0, []
    for w in range(windows):
        x = ids[w * window: (w + 1) * window].unsqueeze(0)
        cache = make_cache(name, model.config)
        for c0 in range(0, window, chunk):
            logits = model(input_ids=x[:, c0: c0 + chunk], cache=cache, use_cache=True).logits[0].float()
            target = x[0, c0 + 1: c0 + chunk + 1]
            logp = torch.log_softmax(logits[: target.numel()], -1)
            nll -= float(logp.gather(-1, target[:, None]).sum())
            count += target.numel()
        bytes_per_token.append(cache_bytes(cache) / cache.get_seq_length())
    return math.exp(nll / count), sum(bytes_per_token) / len(bytes_per_token)


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, name: str, new_tokens: int):
    """(generated tokens, decode seconds): greedy steps after one prefill, as `generate(do_sample=False)` does."""
    cache = make_cache(name, model.config)
    logits = model(input_ids=prompt[None], cache=cache, use_cache=True).logits[0, -1]
    tokens = [int(logits.argmax())]
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens, time.perf_counter() - t0


class StepClock(LogitsProcessor):
    """Records the time of every decode step (generate calls its logits processors once per step, after the
    forward); leaves the scores as they are."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


@torch.no_grad()
def timed_generate(model, prompt: torch.Tensor, name: str, new_tokens: int, backend: str | None):
    """(tokens, seconds per decode step: the median of the steps after the first); backend None runs eagerly."""
    config = None
    if backend is not None:
        config = CompileConfig(backend=backend, mode=None, fullgraph=True)
        config._compile_all_devices = True  # generate compiles on CUDA only unless told (CPU here)
    model.generation_config.compile_config = config
    clock = StepClock()
    cache = make_cache(name, model.config, max_cache_len=prompt.numel() + new_tokens)
    out = model.generate(prompt[None], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         cache=cache, logits_processor=[clock], pad_token_id=0)
    steps = sorted(b - a for a, b in zip(clock.times[1:], clock.times[2:]))
    return out[0, prompt.numel():].tolist(), steps[len(steps) // 2]


def decode_main(args, model, prompt) -> None:
    rows = []
    for name in args.decode_rows:
        compile_it = name.endswith(STATIC) and (args.compile_rows is None or name in args.compile_rows)
        runs = [None] + ([args.backend] if compile_it else [])
        for backend in runs:
            t0 = time.perf_counter()
            if backend is not None:
                torch._dynamo.reset()
                timed_generate(model, prompt, name, args.new_tokens, backend)  # compiles
            warm = time.perf_counter() - t0
            tokens, step = timed_generate(model, prompt, name, args.new_tokens, backend)
            rows.append(dict(name=name, compiled=backend, tok_s=1 / step, compile_s=warm if backend else None,
                             tokens=tokens))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
    eager = {r["name"]: r["tokens"] for r in rows if r["compiled"] is None}
    print(f"\nSmolLM2-135M float32, greedy {args.new_tokens} tokens after a {args.prompt}-token Botchan prompt "
          f"(static caches hold {args.prompt + args.new_tokens}); torch threads {torch.get_num_threads()}")
    print("| cache | run | decode tok/s | warm-up generate s | tokens = eager run's | tokens = float's |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        run = f"compiled ({r['compiled']})" if r["compiled"] else "eager"
        warm = f"{r['compile_s']:.0f}" if r["compile_s"] else ""
        same_eager = "" if r["compiled"] is None else f"{r['tokens'] == eager[r['name']]}"
        same_float = sum(a == b for a, b in zip(r["tokens"], eager[FLOAT])) if FLOAT in eager else float("nan")
        print(f"| {r['name']} | {run} | {r['tok_s']:.1f} | {warm} | {same_eager} | {same_float}/{args.new_tokens} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows), indent=1))


def median(xs):
    return sorted(xs)[len(xs) // 2]


def layer_step_main(args) -> None:
    """One attention layer's decode step alone (SmolLM2's 3 KV heads, head_dim 64, random states), after a
    `--prompt`-token prefill: the growing HfQuantLayer eagerly, the static layer eagerly and compiled (`--backend`);
    the median over `--new-tokens` steps, in ms."""
    from hf_quant.cache.cache import HfQuantLayer, HfQuantStaticLayer

    B, H, D, T0, N = 1, 3, 64, args.prompt, args.new_tokens
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(B, H, T0 + N, D, generator=g), torch.randn(B, H, T0 + N, D, generator=g)

    def steps(layer, update):
        layer.update(k[..., :T0, :], v[..., :T0, :])
        times = []
        for i in range(N):
            t = time.perf_counter()
            update(k[..., T0 + i:T0 + i + 1, :], v[..., T0 + i:T0 + i + 1, :])
            times.append(time.perf_counter() - t)
        return times

    print(f"one layer's decode step after {T0} tokens, ms (median over {N - 1} steps; compiled: after the first); "
          f"torch threads {torch.get_num_threads()}\n| cache | growing, eager | static, eager | static, compiled "
          f"({args.backend}) | compile s |\n|---|---|---|---|---|")
    for name in args.decode_rows:
        settings = ours_settings(name)
        grown = HfQuantLayer(**settings)
        grow = median(steps(grown, grown.update)[1:])
        static = HfQuantStaticLayer(T0 + N, **settings)
        eager = median(steps(static, static.update)[1:])
        static = HfQuantStaticLayer(T0 + N, **settings)
        torch._dynamo.reset()
        times = steps(static, torch.compile(static.update, backend=args.backend, fullgraph=True))
        print(f"| {name} | {1e3 * grow:.2f} | {1e3 * eager:.2f} | {1e3 * median(times[1:]):.2f} | {times[0]:.0f} |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2", help="the real model (hf_quant.assets)")
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=1536)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--only", nargs="*", help='rows to run (float always runs); any "ours int2 hadamard sinks=4 '
                    'kg=16 ..." name is a row (ours_settings)')
    ap.add_argument("--no-greedy", action="store_true", help="perplexity and bytes only (no greedy decode)")
    ap.add_argument("--out", type=Path, default=None, help="default results/kv_cache.json "
                    "(results/kv_cache_decode.json with --decode)")
    ap.add_argument("--decode", action="store_true", help="decode tokens/s only, eager against compiled (module doc)")
    ap.add_argument("--decode-rows", nargs="*", default=DECODE_ROWS)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend of the --decode compiled runs")
    ap.add_argument("--compile-rows", nargs="*", help="static rows also run compiled (default: every static row)")
    ap.add_argument("--layer-step", action="store_true", help="one layer's decode step alone, growing vs static "
                    "eager vs static compiled, for each of --decode-rows (ours ... names; no model)")
    args = ap.parse_args()
    args.out = args.out or HERE / "results" / ("kv_cache_decode.json" if args.decode else "kv_cache.json")
    if args.layer_step:
        layer_step_main(args)
        return
    torch.manual_seed(0)
    label, model_path = MODELS[args.model]
    path = model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(tok(botchan_text(), add_special_tokens=False, verbose=False)["input_ids"])
    start = args.windows * args.window + 1024  # the generation prompt: text after the perplexity windows
    prompt = ids[start: start + args.prompt]
    if args.decode:
        decode_main(args, model, prompt)
        return
    cfg = model.config.get_text_config(decoder=True)
    entries_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)

    names = [FLOAT, *OURS_ROWS, *PEERS] if not args.only else [FLOAT, *[n for n in args.only if n != FLOAT]]
    rows, float_tokens = [], None
    for name in names:
        t0 = time.perf_counter()
        try:
            ppl, bpt = perplexity(model, ids, name, args.windows, args.window, args.chunk)
            tokens, decode_s = ([], math.nan) if args.no_greedy else greedy(model, prompt, name, args.new_tokens)
        except Exception as e:  # a peer that does not import or fails: listed, not measured
            rows.append(dict(name=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            print(f"{name}: {rows[-1]['error']}", flush=True)
            continue
        if float_tokens is None:
            float_tokens = tokens
        prefix = next((i for i, (a, b) in enumerate(zip(tokens, float_tokens)) if a != b), len(tokens))
        same = sum(a == b for a, b in zip(tokens, float_tokens)) / len(tokens) if tokens else math.nan
        rows.append(dict(name=name, ppl=ppl, bytes_per_token=bpt, bits_per_entry=bpt * 8 / entries_per_token,
                         same_prefix=prefix, same_frac=same, decode_tok_s=(args.new_tokens - 1) / decode_s,
                         seconds=time.perf_counter() - t0))
        print(json.dumps(rows[-1]), flush=True)

    base = next(r["ppl"] for r in rows if r["name"] == FLOAT)
    print(f"\n{label} float32, Botchan, {args.windows} x {args.window} tokens fed {args.chunk} at a time; "
          f"greedy {args.new_tokens} tokens after a {args.prompt}-token prompt; torch threads {torch.get_num_threads()}")
    print("| cache | bytes/token | bits/entry | perplexity | vs float | greedy prefix = float | greedy same | "
          "decode tok/s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | not measured: {r['error']} |||||||")
            continue
        print(f"| {r['name']} | {r['bytes_per_token']:.0f} | {r['bits_per_entry']:.2f} | {r['ppl']:.3f} | "
              f"{100 * (r['ppl'] / base - 1):+.2f}% | {r['same_prefix']}/{args.new_tokens} | "
              f"{100 * r['same_frac']:.0f}% | {r['decode_tok_s']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows), indent=1))


if __name__ == "__main__":
    main()
