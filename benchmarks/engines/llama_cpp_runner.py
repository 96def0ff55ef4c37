"""Runs inside the llama.cpp venv (benchmarks/engines/setup_llama_cpp.sh): perplexity, greedy tokens and speed of one
GGUF file in llama.cpp (llama-cpp-python), on token ids given by the caller so that no tokenizer differs.

    python llama_cpp_runner.py SPEC.json OUT.json

SPEC: {"gguf": path, "windows": [[ids...], ...], "prompt": [ids...], "new_tokens": n, "threads": t}
Each window is evaluated from an empty cache and scores every token after its first (hf_quant.eval.perplexity with
stride == window does the same), so the two perplexities cover the same predictions.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def main() -> None:
    from llama_cpp import Llama

    spec = json.loads(open(sys.argv[1]).read())
    longest = max(len(w) for w in spec["windows"])
    n_ctx = max(longest, len(spec["prompt"]) + spec["new_tokens"]) + 8
    llm = Llama(model_path=spec["gguf"], n_ctx=n_ctx, n_batch=n_ctx, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], logits_all=True, verbose=False, seed=0)
    nll, count = 0.0, 0
    prefill_tokens, prefill_seconds = 0, 0.0
    for ids in spec["windows"]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prefill_seconds += time.perf_counter() - start
        prefill_tokens += len(ids)
        logp = log_softmax(np.asarray(llm.scores[: len(ids) - 1]))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    # greedy decode: one token at a time after the prompt
    llm.reset()
    llm.eval(spec["prompt"])
    tokens = []
    start = time.perf_counter()
    for _ in range(spec["new_tokens"]):
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        nxt = int(logits.argmax())
        tokens.append(nxt)
        llm.eval([nxt])
    decode_seconds = time.perf_counter() - start
    out = {"perplexity": math.exp(nll / count), "scored_tokens": count, "greedy": tokens,
           "prefill_tokens_per_s": prefill_tokens / prefill_seconds,
           "decode_tokens_per_s": spec["new_tokens"] / decode_seconds}
    open(sys.argv[2], "w").write(json.dumps(out))


if __name__ == "__main__":
    main()
