"""Data-free 4-bit with a learned codebook per layer (issue 18's NUPES / Q-Palette question), on the real causal LMs.

NF4 rounds every layer onto one fixed table (quantiles of a normal). A table learned per layer can follow each
weight matrix's own distribution (skew, tails) for 16 float16 values per layer, a negligible cost. This study
fake-quantizes every block linear as

    w[o, i] ~= scale[o, group(i)] * table[q[o, i]]        (table: 2**bits values per layer; scale: float16 per group)

and fits table and scales by alternating exact least-squares steps, each of which cannot raise the weight error:
    1. codes: each weight to the nearest table value times its group's scale;
    2. scales: per group, the 1-D least-squares scale for the chosen codes (rounded to float16);
    3. table: each entry, the scale-weighted mean of the normalised weights coded to it (weighted k-means).
It starts from NF4's table and absmax scales (so step 0 is NF4 with float16 scales) and keeps the best iterate.

    --interior         keep NF4's absmax scales and the table's +-1 ends (each group's largest weight stays exact,
                       as in NF4); learn the 14 inner entries only
    --weighting gain   weight each input column's error by the square of the preceding RMSNorm's gain (a
                       data-free activation proxy; the linears after the attention/MLP norms only)

The row (per-window losses included) is added to OUT/quality.json in quality_smollm2.py's row format, so
`quality_smollm2.py --out OUT --compare NAME` pairs it with the rows already there. The committed
benchmarks/results/data_free_codebook/quality.json is benchmarks/results/data_free_8192/quality.json (the library and
peer rows, same 8192 tokens) plus this script's rows:

    OMP_NUM_THREADS=2 python benchmarks/data_free_codebook.py --model smollm2 --group 64 [--interior] \\
        --out benchmarks/results/data_free_codebook
    python benchmarks/quality_smollm2.py --out benchmarks/results/data_free_codebook --compare "nf4 g64 rtn"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from hf_quant.formats import codebook_values

NF4 = codebook_values("nf4")  # the table hf_quant's nf4 format rounds to


def nearest(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted table for every element of u."""
    return torch.bucketize(u, (table[1:] + table[:-1]) / 2)


def store_scale(s: torch.Tensor) -> torch.Tensor:
    """The scale as stored: float16."""
    return s.to(torch.float16).float()


def fit(w: torch.Tensor, group: int, col_weight: torch.Tensor | None, steps: int, learn: bool = True,
        interior: bool = False) -> tuple[torch.Tensor, float, float]:
    """(fake-quantized w, relative weighted error at NF4 start, at the end)."""
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, in_f // group, group)
    cw = (torch.ones(in_f) if col_weight is None else col_weight.float()).reshape(1, in_f // group, group)
    table = NF4.clone()
    s = store_scale(wg.abs().amax(-1, keepdim=True).clamp_min(1e-8)).clamp_min(1e-8)
    total = (wg.pow(2) * cw).sum().item()

    def err(s, table):
        q = nearest(wg / s, table)
        return ((wg - s * table[q]).pow(2) * cw).sum().item(), q

    best, q = err(s, table)
    start, best_state = best, (s, table)
    for _ in range(steps if learn else 0):
        # scales: min over s of sum_i cw_i (w_i - s c_i)^2 per group
        if not interior:
            c = table[q]
            num, den = (cw * wg * c).sum(-1, keepdim=True), (cw * c * c).sum(-1, keepdim=True)
            s = torch.where(den > 0, num / den.clamp_min(1e-30), s).abs()
            s = store_scale(s).clamp_min(1e-8)
            e, q = err(s, table)
        # table: entry k = argmin sum over its members of cw s^2 (w/s - c_k)^2
        ws2 = (cw * s * s).expand_as(wg)
        num = torch.zeros(len(table)).index_add_(0, q.flatten(), (ws2 * wg / s).flatten())
        den = torch.zeros(len(table)).index_add_(0, q.flatten(), ws2.flatten())
        table = torch.where(den > 0, num / den.clamp_min(1e-30), table).to(torch.float16).float()
        if interior:  # absmax scales kept: each group's largest weight stays exact on the +-1 ends
            table[0], table[-1] = -1.0, 1.0
        table, _ = table.sort()
        e, q = err(s, table)
        if e < best:
            best, best_state = e, (s, table)
    s, table = best_state
    q = nearest(wg / s, table)
    return (s * table[q]).reshape(out_f, in_f).to(w.dtype), start / total, best / total


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_quant.assets import botchan_text, real_causal_lms
    from hf_quant.eval import window_losses

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(real_causal_lms()))
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--weighting", default="none", choices=["none", "gain"])
    ap.add_argument("--nf4-only", action="store_true", help="no learning: NF4 table with float16 absmax scales")
    ap.add_argument("--interior", action="store_true",
                    help="keep NF4's absmax scales and the table's +-1 ends; learn the 14 inner entries only")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", required=True, help="folder whose quality.json gets the row")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = real_causal_lms()[a.model]()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    start, errors, bits, weights = time.perf_counter(), [], 0.0, 0
    with torch.no_grad():
        for block in model.model.layers:
            gains = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
            col = {}
            if a.weighting == "gain":
                for norm, names in gains.items():
                    g2 = getattr(block, norm).weight.float().pow(2)
                    col.update({n: g2 / g2.mean() for n in names})
            for name, m in block.named_modules():
                if isinstance(m, torch.nn.Linear):
                    wq, e0, e1 = fit(m.weight, a.group, col.get(name), a.steps, not a.nf4_only, a.interior)
                    m.weight.copy_(wq)
                    errors.append((e0, e1))
                    bits += (4 + 16 / a.group) * m.weight.numel() + 16 * 16
                    weights += m.weight.numel()
    seconds = time.perf_counter() - start
    losses = window_losses(model, tok, botchan_text(), max_tokens=a.tokens)
    ppl = math.exp(sum(n for n, _ in losses) / sum(c for _, c in losses))
    kind = "nf4 table" if a.nf4_only else "learned table"
    name = (f"{kind} g{a.group}" + (" interior" if a.interior else "")
            + (" gain" if a.weighting == "gain" else ""))
    row = {"name": name, "model": a.model, "library": "study (data_free_codebook.py)", "bits": 4,
           "quantize_s": seconds, "bpw": bits / weights, "formats": [name], "ppl": ppl, "window_nll": losses,
           "relative_weight_error": [sum(e[0] for e in errors) / len(errors), sum(e[1] for e in errors) / len(errors)]}
    print(json.dumps({k: v for k, v in row.items() if k != "window_nll"}), flush=True)
    out = Path(a.out) / "quality.json"
    saved = json.loads(out.read_text()) if out.exists() else {"tokens": a.tokens, "results": []}
    if saved["tokens"] != a.tokens:
        raise SystemExit(f"{out} holds {saved['tokens']}-token rows; pass --tokens {saved['tokens']} or another --out")
    saved["results"] = [r for r in saved["results"] if (r["name"], r["model"]) != (name, a.model)] + [row]
    out.write_text(json.dumps(saved, indent=1) + "\n")


if __name__ == "__main__":
    main()
