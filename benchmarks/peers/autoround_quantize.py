"""AutoRound (Intel's SignRound) on a float checkpoint, run inside its own venv (benchmarks/peers/
setup_calibration_peers.sh) by benchmarks/calibration_peers.py. Calibrates on the exact token windows it is given (a
JSON list of lists of ids: nsamples and seqlen follow from it), keeps lm_head float, saves the checkpoint in
`--format` (auto_gptq by default: GPTQ v1 layout, which hf_quant.load_foreign reads) and prints one JSON line: the
quantize seconds and versions.

`--iters` / `--lr`: AutoRound's default recipe is 200 iterations (lr 1/iters); its "light" recipe 50 iterations at
lr 5e-3. Batch size 8 (its default), symmetric (its default); everything else the library's default.

    python autoround_quantize.py --model DIR --ids ids.json --out DIR --bits 4 --group-size 128 [--iters 200]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from peer_args import peer_parser  # (this folder: the script's own)


def main() -> None:
    ap = peer_parser()
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--format", default="auto_gptq")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    import auto_round
    import transformers
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = json.load(open(args.ids))
    samples = [torch.tensor([row], dtype=torch.long) for row in ids]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    start = time.perf_counter()
    ar = AutoRound(model, tok, bits=args.bits, group_size=args.group_size, sym=not args.asym, dataset=samples,
                   nsamples=len(ids), seqlen=len(ids[0]), batch_size=args.batch_size, iters=args.iters, lr=args.lr,
                   device_map="cpu", enable_torch_compile=False)
    ar.quantize_and_save(args.out, format=args.format)
    seconds = time.perf_counter() - start
    # AutoRound saves into a subfolder named after the model and scheme (<out>/<model>-w4g128/): move it up
    out = Path(args.out)
    if not (out / "config.json").exists():
        (sub,) = [p for p in out.iterdir() if (p / "config.json").exists()]
        for f in sub.iterdir():
            f.rename(out / f.name)
        sub.rmdir()
    print(json.dumps({"seconds": seconds, "versions": {
        "auto-round": auto_round.__version__, "transformers": transformers.__version__, "torch": torch.__version__}}))


if __name__ == "__main__":
    main()
