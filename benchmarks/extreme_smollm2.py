"""SmolLM2-135M at ~2-3 bits: mixed-precision allocation under a bit budget vs uniform schemes at equal true bits
per weight (and, with --lowrank, low-rank error correction). Botchan perplexity on the first --tokens tokens;
data-aware sensitivities are calibrated on Botchan windows after its first 8192 tokens (disjoint from the
evaluated text).

    python benchmarks/extreme_smollm2.py [--tokens 1024] [--targets 2.5 3.25] [--sensitivities weight fisher]
    python benchmarks/extreme_smollm2.py --targets --skip-uniform --lowrank 8 32 --ternary
    python benchmarks/extreme_smollm2.py --layer-errors   # weight error of every format on a few real layers only
    python benchmarks/extreme_smollm2.py --targets 2.25 --sensitivities fisher --skip-uniform --ladder vq --method gptq
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_quant
from hf_quant.algorithms.allocation import calibration_batches, config_with_allocation, measure_model
from hf_quant.algorithms.evolution import evolve_allocation
from hf_quant.assets import botchan_text, smollm2_path
from hf_quant.eval import perplexity
from hf_quant.eval.storage import model_storage

UNIFORM = [
    dict(bits=2, group_size=64),
    dict(bits=3, group_size=128),
]
# A shorter ladder than the library default keeps the measurement cheap on a shared 2-core machine.
CANDIDATES = [
    dict(bits=2, group_size=128, double_quant=True),
    dict(bits=2, group_size=64, double_quant=True),
    dict(bits=3, group_size=128, double_quant=True),
    dict(bits=4, group_size=128, double_quant=True),
    dict(bits=6, group_size=128, double_quant=True),
]
# Below 2.5 bits: residual VQ stages beside the scalar rungs (--ladder vq).
VQ_CANDIDATES = [
    dict(format="vq", planes=1, group_size=128),
    dict(format="vq", planes=2, group_size=128),
    dict(bits=3, group_size=128, double_quant=True),
    dict(bits=4, group_size=128, double_quant=True),
]


def evaluate(path, tok, text, tokens: int, config: hf_quant.HfQuantConfig) -> tuple[float, float, float]:
    start = time.perf_counter()
    q = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config)
    seconds = time.perf_counter() - start
    ppl = perplexity(q, tok, text, max_tokens=tokens)
    return model_storage(q).bits_per_weight, ppl, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--targets", type=float, nargs="*", default=[2.5, 3.25])
    ap.add_argument("--sensitivities", nargs="+", default=["weight", "fisher"])
    ap.add_argument("--calib-sequences", type=int, default=8)
    ap.add_argument("--skip-uniform", action="store_true")
    ap.add_argument("--lowrank", type=int, nargs="*", default=[], help="also run uniform schemes with these ranks")
    ap.add_argument("--ternary", action="store_true", help="also run ternary (1 and 2 planes)")
    ap.add_argument("--layer-errors", action="store_true", help="only: relative weight error per format on 3 layers")
    ap.add_argument("--on-load-targets", type=float, nargs="*", default=[],
                    help="also quantize with HfQuantConfig(target_bits=T) (data-free allocation inside from_pretrained)")
    ap.add_argument("--ladder", choices=["scalar", "vq"], default="scalar", help="allocation candidates")
    ap.add_argument("--evolve", type=int, default=0, metavar="GENERATIONS",
                    help="also refine each allocation by this many generations of evolutionary search on calibration "
                         "loss (data-free codes; hf_quant.algorithms.evolution)")
    ap.add_argument("--evolve-sequences", type=int, default=2, help="calibration sequences (x 512 tokens) it scores on")
    ap.add_argument("--method", choices=["mse", "gptq"], default="mse",
                    help="how the chosen schemes are quantized (gptq: 16 x 512 Botchan tokens after token 8192)")
    args = ap.parse_args()
    candidates = VQ_CANDIDATES if args.ladder == "vq" else CANDIDATES
    path = smollm2_path()
    if args.layer_errors:
        layer_errors(path)
        return
    tok = AutoTokenizer.from_pretrained(path)
    text = botchan_text()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base = perplexity(model, tok, text, max_tokens=args.tokens)
    print(f"Botchan perplexity, {args.tokens} tokens, window 512; float32 = {base:.3f}", flush=True)

    if args.targets:
        start = time.perf_counter()
        batches = calibration_batches(tok, text, args.calib_sequences, 512, skip_tokens=8192)
        table = measure_model(model, hf_quant.HfQuantConfig(), args.sensitivities, batches, candidates)
        print(f"measured {len(table.names)} layers x {len(table.candidates)} candidates in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    if not args.evolve:
        del model

    print("| configuration | bits/weight (all stored) | perplexity | vs float32 | quantize time (s) |")
    print("|---|---|---|---|---|")
    if not args.skip_uniform:
        for cfg in UNIFORM:
            bpw, ppl, sec = evaluate(path, tok, text, args.tokens, hf_quant.HfQuantConfig(lm_head="float", **cfg))
            print(f"| {label(cfg)} | {bpw:.3f} | {ppl:.2f} | {100 * (ppl / base - 1):+.1f}% | {sec:.0f} |",
                  flush=True)
    extra = [{**cfg, "lowrank_rank": rank} for rank in args.lowrank for cfg in UNIFORM]
    if args.ternary:
        extra += [dict(format="ternary", group_size=g, planes=p) for p in (1, 2) for g in (64, 128)]
    for cfg in extra:
        bpw, ppl, sec = evaluate(path, tok, text, args.tokens, hf_quant.HfQuantConfig(lm_head="float", **cfg, method=args.method))
        print(f"| {label(cfg)} | {bpw:.3f} | {ppl:.2f} | {100 * (ppl / base - 1):+.1f}% | {sec:.0f} |", flush=True)
    for target in args.on_load_targets:
        config = hf_quant.HfQuantConfig(lm_head="float", target_bits=target, allocation_candidates=CANDIDATES[:4])
        bpw, ppl, sec = evaluate(path, tok, text, args.tokens, config)
        print(f"| allocated on load, target {target}, weight sensitivity | {bpw:.3f} | {ppl:.2f} | "
              f"{100 * (ppl / base - 1):+.1f}% | {sec:.0f} |", flush=True)
    for target in args.targets:
        for sens in args.sensitivities:
            result = table.choose(target, sens)
            config = config_with_allocation(hf_quant.HfQuantConfig(lm_head="float", method=args.method), result)
            bpw, ppl, sec = evaluate(path, tok, text, args.tokens, config)
            print(f"| allocated ({args.ladder} ladder, {args.method}), target {target}, {sens} sensitivity | {bpw:.3f} | {ppl:.2f} | "
                  f"{100 * (ppl / base - 1):+.1f}% | {sec:.0f} |", flush=True)
            print("\n".join("    " + line for line in result.summary().splitlines()), flush=True)
            if args.evolve:
                start = time.perf_counter()
                evolved = evolve_allocation(model, table, result, batches[: args.evolve_sequences],
                                            generations=args.evolve)
                took = time.perf_counter() - start
                config = config_with_allocation(hf_quant.HfQuantConfig(lm_head="float", method=args.method), evolved)
                bpw, ppl, sec = evaluate(path, tok, text, args.tokens, config)
                print(f"| ... + {args.evolve} generations of evolution ({took:.0f} s) | {bpw:.3f} | {ppl:.2f} | "
                      f"{100 * (ppl / base - 1):+.1f}% | {sec:.0f} |", flush=True)
                print("\n".join("    " + line for line in evolved.summary().splitlines()), flush=True)


LAYER_SCHEMES = [
    dict(bits=2, group_size=64),
    dict(bits=2, group_size=128, double_quant=True),
    dict(bits=3, group_size=128),
    dict(bits=2, group_size=128, double_quant=True, lowrank_rank=8),
    dict(bits=2, group_size=128, double_quant=True, outliers_per_row=4),
    dict(format="ternary", group_size=128, planes=1),
    dict(format="ternary", group_size=128, planes=2),
    dict(format="vq", group_size=128, planes=2),
]
LAYERS = ["model.layers.3.self_attn.q_proj", "model.layers.10.mlp.gate_proj", "model.layers.20.mlp.down_proj"]


def layer_errors(path) -> None:
    """||W - Q(W)|| / ||W|| and true bits per weight of each scheme on a few SmolLM2 layers (no model run)."""
    from safetensors import safe_open

    from hf_quant.algorithms import quantize_weight
    from hf_quant.formats import bits_per_weight, dequantize

    weights = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            weights.update({n: f.get_tensor(f"{n}.weight").float() for n in LAYERS if f"{n}.weight" in f.keys()})
    print("| scheme | " + " | ".join(f"{n.split('layers.')[1]} (bits, rel. error)" for n in LAYERS) + " |")
    print("|---|" + "---|" * len(LAYERS))
    for cfg in LAYER_SCHEMES:
        scheme = hf_quant.HfQuantConfig(**cfg).default_scheme
        cells = []
        for name in LAYERS:
            w = weights[name]
            deq = dequantize(scheme, quantize_weight(w, scheme), w.shape[1])
            cells.append(f"{bits_per_weight(scheme, w.shape):.2f}, {float((deq - w).norm() / w.norm()):.3f}")
        print(f"| {label(cfg)} | " + " | ".join(cells) + " |", flush=True)


def label(cfg: dict) -> str:
    if cfg.get("format") in ("ternary", "vq"):
        stages = "plane" if cfg["format"] == "ternary" else "codebook"
        return f"{cfg['format']} {cfg['planes']} {stages}{'s' if cfg['planes'] > 1 else ''} g{cfg['group_size']}"
    name = f"int{cfg['bits']} g{cfg['group_size']}" + (" dq" if cfg.get("double_quant") else "")
    name += f" + rank {cfg['lowrank_rank']}" if cfg.get("lowrank_rank") else ""
    return name + (f" + {cfg['outliers_per_row']} outliers/row" if cfg.get("outliers_per_row") else "")


if __name__ == "__main__":
    main()
