"""llm-compressor GPTQ on a float checkpoint, run inside its own venv (benchmarks/peers/setup_calibration_peers.sh) by
benchmarks/calibration_peers.py. Calibrates on the exact token windows it is given (a JSON list of lists of ids),
saves the compressed-tensors checkpoint (pack-quantized) and prints one JSON line: the quantize seconds and versions.

Recipe: GPTQModifier with one config group targeting Linear, lm_head ignored (kept float), int weights of
`--bits`, `--group-size`, symmetric or not, llm-compressor's defaults otherwise (actorder static, dampening 0.01,
block 128, min-max observer). `scale_dtype=float16` (scales rounded to float16 while quantizing, as a float16
model's would be): hf_quant stores float16 scales and imports only scales exact in float16.

    python llmcompressor_gptq.py --model DIR --ids ids.json --out DIR --bits 4 --group-size 64 [--asym] [--threads 1]
"""

from __future__ import annotations

import json
import time

from peer_args import peer_parser  # (this folder: the script's own)


def main() -> None:
    ap = peer_parser()
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = json.load(open(args.ids))
    n, length = len(ids), len(ids[0])
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length for _ in ids]})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    weights = {"num_bits": args.bits, "type": "int", "symmetric": not args.asym, "strategy": "group",
               "group_size": args.group_size, "scale_dtype": "float16"}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=length, num_calibration_samples=n,
            tokenizer=tok)
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, save_compressed=True)
    tok.save_pretrained(args.out)
    print(json.dumps({"seconds": seconds, "versions": {
        "llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__, "torch": torch.__version__}}))


if __name__ == "__main__":
    main()
