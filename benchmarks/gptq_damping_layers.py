"""GPTQ's damping and how its codes generalise, layer by layer, on a real causal LM (issue 18; damp="cv").

GPTQ fits its codes to the calibration Hessian H = X^T X. With few calibration tokens per input dimension it fits
that Hessian's noise too, and its damping (a ridge: damp * mean(diag H) added to H) is the only regulariser. This
script takes real linears of a model (blocks 1, middle, last-but-one; q_proj, o_proj, gate_proj, down_proj), their
input Hessians on hf_quant's default calibration windows (16 x 512 Botchan tokens after the evaluation tokens) and on
16 held-out windows of 512 placed in the gaps between the calibration windows, and reports for GPTQ at each fixed
damping and at damp="cv" (hf_quant.algorithms.gptq.cross_validated_damp, the library's choice) the relative output
error tr(dW H dW^T) / tr(W H W^T) on both. The float model's own inputs are used (not the quantized model's), so
the layers are independent.

    OMP_NUM_THREADS=2 python benchmarks/gptq_damping_layers.py --model smollm2 [--bits 4 --group 128 --sym]
    models: smollm2, qwen2.5-coder (0.5B), qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_quant import HfQuantConfig
from hf_quant.algorithms.gptq import cross_validated_damp
from hf_quant.assets import botchan_text, qwen25_coder_15b_path, qwen25_coder_path, smollm2_path
from hf_quant.formats import GPTQSettings, QuantScheme, dequantize, quantize_stacked
from hf_quant.pipeline import calibration_token_ids

MODELS = {"smollm2": smollm2_path, "qwen2.5-coder": qwen25_coder_path, "qwen2.5-coder-1.5b": qwen25_coder_15b_path}
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
FIXED = (0.01, 0.03, 0.1, 0.3)


def held_out_windows(ids: torch.Tensor, calibration: torch.Tensor, n: int, length: int) -> list[torch.Tensor]:
    """n windows of `length` tokens of `ids`, two per gap between calibration windows (found by content), each
    centred in its half of the gap, sharing no token with them."""
    starts = []
    for window in calibration:
        hits = (ids.unfold(0, window.numel(), 1) == window).all(1).nonzero()
        starts.append(int(hits[0]))
    starts.sort()
    ends = [s + calibration.shape[1] for s in starts]
    halves = []
    for e, s in zip(ends[:-1], starts[1:]):
        if s - e >= 2 * length:
            m = (e + s) // 2
            halves += [(e, m), (m, s)]
    if len(halves) < n:
        raise ValueError(f"only {len(halves)} places for {length}-token windows between the calibration windows")
    return [ids[(e + s - length) // 2:(e + s + length) // 2] for e, s in halves[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="smollm2")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = MODELS[a.model]()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    calibration = calibration_token_ids(tok, HfQuantConfig(method="gptq"))
    ids = tok(botchan_text(), add_special_tokens=False, verbose=False, return_tensors="pt").input_ids[0]
    held = held_out_windows(ids, calibration, calibration.shape[0], calibration.shape[1])
    layers = model.model.layers
    blocks = (1, len(layers) // 2, len(layers) - 2)
    targets = {f"{b}.{n}": layers[b].get_submodule(n) for b in blocks for n in LINEARS}
    sums: dict[tuple, torch.Tensor] = {}
    state = {}

    def hook(name):
        def f(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            for key in state["keys"]:
                sums[key + (name,)] = sums.get(key + (name,), 0) + x.t() @ x
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    with torch.no_grad():
        for i, window in enumerate(calibration):
            state["keys"] = [("cal",), (f"fold{i % 2}",)]
            model(window[None])
        for window in held:
            state["keys"] = [("held",)]
            model(window[None])
    for h in handles:
        h.remove()
    scheme = QuantScheme(format="int", bits=a.bits, group_size=a.group, symmetric=a.sym, method="gptq")
    print(f"{a.model}: int{a.bits} g{a.group} {'sym' if a.sym else 'asym'}; relative output error on the "
          f"calibration / held-out windows (16 x 512 each)")
    columns = [f"damp {d:g}" for d in FIXED] + ["damp cv"]
    print("| linear | " + " | ".join(columns) + " | cv chose |")
    print("|---" * (len(columns) + 2) + "|")
    ratios = {c: [] for c in columns}
    for name, module in targets.items():
        weight = module.weight.detach().float()
        mean = {k: (sums[(k, name)] / (len(calibration) if k == "cal" else len(held)) / calibration.shape[1]).float()
                for k in ("cal", "held")}
        folds = tuple((sums[(f"fold{i}", name)] / (len(calibration) / 2) / calibration.shape[1]).float()
                      for i in (0, 1))
        chosen, _ = cross_validated_damp([weight], folds, scheme, GPTQSettings())
        cells, errors = [], {}
        for column, damp in zip(columns, FIXED + (chosen,)):
            tensors = quantize_stacked([weight], mean["cal"], scheme, GPTQSettings(damp=damp))[0]
            d = (dequantize(scheme, tensors, weight.shape[1]) - weight).double()
            rel = [float(((d @ h.double()) * d).sum() / ((weight.double() @ h.double()) * weight.double()).sum())
                   for h in (mean["cal"], mean["held"])]
            errors[column] = rel
            cells.append(f"{rel[0]:.5f} / {rel[1]:.5f}")
        for column in columns:
            ratios[column].append(errors[column][1] / errors["damp 0.01"][1])
        print(f"| {name} | " + " | ".join(cells) + f" | {chosen:g} |", flush=True)
    print("\nheld-out error against damp 0.01, geometric mean over the linears: " + ", ".join(
        f"{c} {math.exp(sum(map(math.log, r)) / len(r)):.4f}" for c, r in ratios.items()))


if __name__ == "__main__":
    main()
