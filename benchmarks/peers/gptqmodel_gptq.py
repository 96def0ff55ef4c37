"""GPTQModel's GPTQ on a float checkpoint, run inside its own venv (benchmarks/peers/setup_calibration_peers.sh) by
benchmarks/calibration_peers.py. Calibrates on the exact token windows it is given (a JSON list of lists of ids,
passed as input_ids/attention_mask dicts), saves the checkpoint in GPTQ v1 (`format="gptq"`: qweight/qzeros/scales/
g_idx, which hf_quant.load_foreign reads) and prints one JSON line: the quantize seconds and versions.

Config: `QuantizeConfig(bits, group_size, device="cpu")`, GPTQModel's defaults otherwise: symmetric, desc_act off
with its group-aware activation reordering (act_group_aware; groups stay contiguous columns, g_idx = i // g),
damp_percent 0.05 (auto-increment 0.01), true_sequential, lm_head not quantized, pack_dtype int32. Quantize
batch_size 1 (its default).

    python gptqmodel_gptq.py --model DIR --ids ids.json --out DIR --bits 4 --group-size 128 [--threads 1]
"""

from __future__ import annotations

import json
import time

from peer_args import peer_parser  # (this folder: the script's own)


def _one_cpu_worker(gptqmodel, threads: int) -> None:
    """GPTQModel's device thread pool gives the CPU (cpu_count + 1) // 2 workers (GPTQMODEL_CPU_WORKERS overrides) and
    a virtual "model_loader:cpu" pool 2 of them, which it refuses to build when the CPU has fewer (this 2-core machine:
    "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"). Build it with `threads` CPU
    workers (the loader pool capped to them), so the run uses as many cores as the other methods."""
    real = gptqmodel.DeviceThreadPool

    def pool(*a, workers=None, **kw):
        workers = dict(workers or {})
        workers["cpu"] = threads
        if "model_loader:cpu" in workers:
            workers["model_loader:cpu"] = min(workers["model_loader:cpu"], threads)
        return real(*a, workers=workers, **kw)

    gptqmodel.DeviceThreadPool = pool  # looked up by gptqmodel._build_device_thread_pool when the pool is first made


def main() -> None:
    ap = peer_parser()
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    import gptqmodel
    import transformers
    from gptqmodel import GPTQModel, QuantizeConfig

    _one_cpu_worker(gptqmodel, args.threads)

    ids = json.load(open(args.ids))
    calibration = [{"input_ids": row, "attention_mask": [1] * len(row)} for row in ids]
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, lm_head=False,
                            format="gptq", device="cpu")
    model = GPTQModel.load(args.model, config, dtype=torch.float32)  # loaded on the CPU; config.device quantizes
    start = time.perf_counter()
    model.quantize(calibration)
    seconds = time.perf_counter() - start
    model.save(args.out)
    print(json.dumps({"seconds": seconds, "config": {k: getattr(config, k, None) for k in (
        "damp_percent", "desc_act", "act_group_aware", "sym", "true_sequential", "static_groups", "mse")},
        "versions": {"gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__}}, default=str))


if __name__ == "__main__":
    main()
