"""Runs inside the vLLM CPU venv (benchmarks/engines/setup_vllm.sh): perplexity from prompt_logprobs, greedy tokens
and throughput of one checkpoint folder in vLLM's offline `LLM` API, on token ids given by the caller.

    python vllm_runner.py SPEC.json OUT.json

SPEC: {"model": folder, "dtype": "float32"|"bfloat16"|..., "windows": [[ids...]], "prompt": [ids...],
       "new_tokens": n, "threads": t}
Every window is its own prompt; the logprob of each token after the first is scored (as hf_quant.eval.perplexity
with stride == window does).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(w) for w in spec["windows"])
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=max(longest, 1024), seed=0,
              enforce_eager=True, skip_tokenizer_init=False)
    scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in spec["windows"]], scoring, use_tqdm=False)
    prefill_seconds = time.perf_counter() - start
    nll, count = 0.0, 0
    for w, out in zip(spec["windows"], outs):
        for pos in range(1, len(w)):
            entry = out.prompt_logprobs[pos]
            nll -= entry[w[pos]].logprob
            count += 1
    greedy = SamplingParams(max_tokens=spec["new_tokens"], min_tokens=spec["new_tokens"], temperature=0.0,
                            ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=spec["prompt"])], SamplingParams(max_tokens=4), use_tqdm=False)
    start = time.perf_counter()
    [gen] = llm.generate([TokensPrompt(prompt_token_ids=spec["prompt"])], greedy, use_tqdm=False)
    decode_seconds = time.perf_counter() - start
    out = {"perplexity": math.exp(nll / count), "scored_tokens": count,
           "greedy": list(gen.outputs[0].token_ids),
           "prefill_tokens_per_s": sum(len(w) for w in spec["windows"]) / prefill_seconds,
           "decode_tokens_per_s": spec["new_tokens"] / decode_seconds}
    open(sys.argv[2], "w").write(json.dumps(out))


if __name__ == "__main__":
    main()
