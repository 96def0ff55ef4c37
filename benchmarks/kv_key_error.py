"""Relative error of 2-bit KV-cache keys and values, rotated (Hadamard) or not, on the real models' own states
(BENCHMARKS.md, "The same caches on a second model"): the first 516 Botchan tokens' keys/values of every layer
(the 4 sink tokens left out), quantized per channel (keys) / per token (values) in groups of 32 with least-squares
ranges, and decoded. It shows that the keys' error does not predict the rotation's effect on perplexity.

    OMP_NUM_THREADS=2 python benchmarks/kv_key_error.py
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hf_quant.assets import botchan_text, qwen25_coder_path, smollm2_path  # noqa: E402
from hf_quant.cache import codec  # noqa: E402


def main() -> None:
    for name, path_of in [("smollm2", smollm2_path), ("qwen2.5-coder", qwen25_coder_path)]:
        path = path_of()
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.tensor(tok(botchan_text(), add_special_tokens=False)["input_ids"][:516])[None]
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
        wins, total = {"k": 0, "v": 0}, {"k": [0.0, 0.0], "v": [0.0, 0.0]}
        for layer in cache.layers:
            for kind, x, axis in (("k", layer.keys, "channel"), ("v", layer.values, "token")):
                x = x[..., 4:, :]
                errors = []
                for seed in (None, 0):
                    spec = codec.KVSpec(2, 32, axis, 0, seed, True)
                    signs = None if seed is None else codec.rotation_signs(x.shape[-1], seed)
                    y = codec.dequantize(codec.quantize(x, spec, signs), spec, x.shape[-1], signs=signs)
                    errors.append(float((y - x).pow(2).sum() / x.pow(2).sum()))
                total[kind][0] += errors[0]
                total[kind][1] += errors[1]
                wins[kind] += errors[1] < errors[0]
        n = len(cache.layers)
        print(f"{name}: {n} layers; rotation lowers the error of keys in {wins['k']}, of values in {wins['v']}; mean "
              f"relative squared error keys {total['k'][0] / n:.4f} plain / {total['k'][1] / n:.4f} rotated, values "
              f"{total['v'][0] / n:.4f} / {total['v'][1] / n:.4f}")


if __name__ == "__main__":
    main()
