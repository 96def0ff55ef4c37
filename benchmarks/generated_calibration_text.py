"""What `calibration="generated"` writes, and why its first token is drawn uniformly from the vocabulary.

For one real model, 16 sequences of 128 tokens from `hf_quant.pipeline.generated_token_ids` (the library's sampler:
a uniformly drawn first token, then the model's own distribution at temperature 1), against the alternative of
starting every sequence from the tokenizer's document boundary (its bos_token) and sampling from there, at
temperature 1 and with nucleus sampling (top-p 0.95). Printed per variant: the share of ASCII characters in the
decoded text (English and code against other scripts), the share of distinct token 4-grams (repetition loops lower
it), the model's own negative log-likelihood per token of what it wrote, and the first characters of three samples.
No evaluation text is read, so nothing here is tuned on the perplexity windows.

    OMP_NUM_THREADS=2 python benchmarks/generated_calibration_text.py --model qwen2.5-coder --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch


def _boundary_samples(model, tokenizer, n: int, length: int, seed: int, top_p: float) -> torch.Tensor:
    """The alternative: every sequence starts after the bos_token; tokens sampled at temperature 1 (top-p cut)."""
    vocab = len(tokenizer)
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, 1), tokenizer.bos_token_id)
    cache, step = {}, ids
    with torch.no_grad():
        for _ in range(length):
            out = model(input_ids=step, use_cache=True, **cache)
            cache = {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}
            p = torch.softmax(out.logits[:, -1, :vocab].float(), -1)
            if top_p < 1:
                sorted_p, order = p.sort(-1, descending=True)
                sorted_p[(sorted_p.cumsum(-1) - sorted_p) > top_p] = 0
                p = torch.zeros_like(p).scatter(-1, order, sorted_p)
            step = torch.multinomial(p, 1, generator=g)
            ids = torch.cat([ids, step], 1)
    return ids[:, 1:]


def _stats(model, tokenizer, ids: torch.Tensor) -> dict:
    texts = [tokenizer.decode(r) for r in ids]
    ascii_share = sum(sum(c.isascii() for c in t) / max(1, len(t)) for t in texts) / len(texts)

    def distinct4(row):
        grams = [tuple(row[i : i + 4]) for i in range(len(row) - 3)]
        return len(set(grams)) / len(grams)

    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-1, : len(tokenizer)].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).mean().item()
    return {"ascii": ascii_share, "distinct4": sum(distinct4(r.tolist()) for r in ids) / len(ids), "nll": nll,
            "samples": [t[:150] for t in texts[:3]]}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_quant.assets import real_causal_lms
    from hf_quant.pipeline import generated_token_ids

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder", choices=list(real_causal_lms()))
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = real_causal_lms()[args.model]()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    variants = {
        "uniform first token, T=1 (the library's)": lambda: generated_token_ids(
            model, tokenizer, args.sequences, args.tokens, args.seed),
        f"after bos_token {tokenizer.bos_token!r}, T=1": lambda: _boundary_samples(
            model, tokenizer, args.sequences, args.tokens, args.seed, 1.0),
        f"after bos_token {tokenizer.bos_token!r}, top-p 0.95": lambda: _boundary_samples(
            model, tokenizer, args.sequences, args.tokens, args.seed, 0.95),
    }
    print(f"{args.model}: {args.sequences} sequences x {args.tokens} tokens, seed {args.seed}\n")
    print("| start | ASCII share | distinct 4-grams | model NLL/token | seconds |\n|---|---|---|---|---|")
    samples = {}
    for name, make in variants.items():
        start = time.perf_counter()
        ids = make()
        seconds = time.perf_counter() - start
        s = _stats(model, tokenizer, ids)
        samples[name] = s["samples"]
        print(f"| {name} | {s['ascii']:.2f} | {s['distinct4']:.2f} | {s['nll']:.2f} | {seconds:.0f} |", flush=True)
    for name, texts in samples.items():
        print(f"\n{name}:")
        for t in texts:
            print("   ", repr(t))


if __name__ == "__main__":
    main()
