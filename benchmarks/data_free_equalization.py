"""Data-free column equalisation before 4-bit rounding (issue 18's SINQ question), measured on the real causal LMs.

SINQ (Sinkhorn-normalised dual scales) divides a weight's columns by per-input-channel scales t found by alternately
normalising row and column standard deviations; the quantized matrix keeps t as a second scale. Mathematically that
is the same as folding t into the operation before the linear (x' = x t, W' = W / t), which AWQ's machinery
(`hf_quant.algorithms.awq.scaling_groups` / `fold_scale`) already does for Llama/Qwen-style blocks without a format
change. This script folds data-free scales, fake-quantizes every block linear with hf_quant's own coding
(`quantize_params` + `dequantize_codes`, the values the packed modules compute with) and measures perplexity on
Botchan's first --tokens tokens, as benchmarks/quality_smollm2.py does.

    --eq none        no scaling (the baseline: equals the packed model's perplexity to 3 digits)
    --eq sinq        t from 16 Sinkhorn steps on the concatenated weights of each scaling group (lowest imbalance)
    --eq alpha       t = (column absmax)^alpha, alpha on a grid chosen per group by the weight error in the
                     original coordinates, ||W - Q(W / t) t||^2 (alpha = 0, no scaling, on the grid)
    --eq sinqsearch  t = sinq^alpha, alpha chosen the same way

    --hq-fit scale-and-zero   (no equalisation needed) the half-quadratic fit of `mse` for int >= 4 bits updates the
                     scale with the zero-point at each proximal step (a 1-D regression of the shrunk target on the
                     codes) instead of keeping RTN's scale: the issue's "HQQ with both scale and zero optimised".
                     Study only: it replaces `IntFormat._half_quadratic_zero` in this process.
    --hq-fit bounded  the same zero-point fit, then each group's zero-point clamped so that its smallest and largest
                     weights round inside the code range (no weight further than half a step from its value, the
                     bound the two-stage search keeps). Study only, as above.
    --outliers K     keep the K largest-magnitude weights of each output row as float16 residuals (the library's
                     `outliers_per_row`, SpQR-style), fitted around the codes as `hf_quant.formats.quantize` does.

    OMP_NUM_THREADS=1 python benchmarks/data_free_equalization.py --model smollm2 --scheme int:4:128:mse --eq sinq
    OMP_NUM_THREADS=1 python benchmarks/data_free_equalization.py --model smollm2 --hq-fit scale-and-zero
    OMP_NUM_THREADS=2 python benchmarks/data_free_equalization.py --model qwen2.5-coder --tokens 8192 --outliers 4
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_quant.algorithms.awq import fold_scale, scaling_groups
    from hf_quant.assets import botchan_text, real_causal_lms
    from hf_quant.eval import perplexity
    from hf_quant.formats import QuantScheme, bits_per_weight, dequantize, quantize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(real_causal_lms()))
    ap.add_argument("--scheme", default="int:4:128:mse", help="format[-sym]:bits:group:method")
    ap.add_argument("--eq", default="none", choices=["none", "sinq", "alpha", "sinqsearch"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hq-fit", default="zero", choices=["zero", "scale-and-zero", "bounded"])
    ap.add_argument("--outliers", type=int, default=0, help="outliers_per_row (default 0: none)")
    a = ap.parse_args()
    if a.hq_fit == "scale-and-zero":
        _fit_scale_and_zero()
    elif a.hq_fit == "bounded":
        _bounded_zero()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    fmt, bits, group, method = a.scheme.split(":")
    scheme = QuantScheme(format=fmt.removesuffix("-sym"), bits=int(bits), group_size=int(group), method=method,
                         symmetric=fmt.endswith("-sym"), outliers_per_row=a.outliers)
    path = real_causal_lms()[a.model]()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)

    def fake_quantize(w):
        return dequantize(scheme, quantize(w, scheme), w.shape[1])

    def weight_error(ws, t):
        return sum((fake_quantize(w / t) * t - w).pow(2).sum().item() for w in ws)

    def sinkhorn(ws, steps=16):
        wn = torch.cat(ws, 0).float()
        c, best, best_c = torch.ones(wn.shape[1]), float("inf"), torch.ones(wn.shape[1])
        for _ in range(steps):
            wn = wn / wn.std(1, keepdim=True).clamp_min(1e-8)
            cs = wn.std(0, keepdim=True).clamp_min(1e-8)
            wn, c = wn / cs, c * cs.squeeze(0)
            col, row = wn.std(0), wn.std(1)
            imbalance = (col.max() / col.min() + row.max() / row.min()).item()
            if imbalance < best:
                best, best_c = imbalance, c.clone()
        return best_c

    def searched(ws, base, alphas):
        best, best_t = weight_error(ws, torch.ones_like(base)), torch.ones_like(base)
        for alpha in alphas:
            t = base.pow(alpha)
            t = t / (t.max() * t.min()).sqrt()
            e = weight_error(ws, t)
            if e < best:
                best, best_t = e, t
        return best_t

    start, spread = time.perf_counter(), 1.0
    with torch.no_grad():
        for block in model.model.layers:
            modules = dict(block.named_modules())
            targets = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
            for prev, linears in scaling_groups(block, targets):
                ws = [modules[n].weight.float() for n in linears]
                if a.eq == "none":
                    continue
                if a.eq == "sinq":
                    t = sinkhorn(ws)
                    t = t / (t.max() * t.min()).sqrt()
                elif a.eq == "alpha":
                    t = searched(ws, torch.cat(ws, 0).abs().amax(0).clamp_min(1e-8), [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
                else:
                    t = searched(ws, sinkhorn(ws), [0.25, 0.5, 0.75, 1.0])
                spread = max(spread, float(t.max() / t.min()))
                fold_scale(modules[prev], [modules[n] for n in linears], 1.0 / t)  # W' = W / t, x' = x t
        bits = weights = 0
        for m in model.model.layers.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(fake_quantize(m.weight.float()))
                bits += bits_per_weight(scheme, tuple(m.weight.shape)) * m.weight.numel()
                weights += m.weight.numel()
    seconds = time.perf_counter() - start
    ppl = perplexity(model, tok, botchan_text(), max_tokens=a.tokens)
    print(json.dumps({"model": a.model, "scheme": a.scheme, "eq": a.eq, "hq_fit": a.hq_fit, "outliers": a.outliers,
                      "bits_per_weight": round(bits / weights, 4), "tokens": a.tokens, "ppl": round(ppl, 3),
                      "seconds": round(seconds, 1), "largest_scale_ratio": round(spread, 2)}))


def _fit_scale_and_zero() -> None:
    """Replace the library's half-quadratic zero-point fit (RTN scale kept) by one that refits the scale too."""
    import hf_quant.formats.scalar as scalar

    def fit(self, wg, scheme, mask=None):
        maxq, tiny = (1 << scheme.bits) - 1, torch.finfo(torch.float16).tiny
        s, z = self.range_params(wg, 1.0, scheme, integer_zero=True)
        s = s.to(torch.float16).float().clamp_min(tiny)
        m, n = scalar._column_weights(wg, mask)
        beta = scalar._HQ_BETA
        for _ in range(scalar._HQ_STEPS):
            q = (wg / s).add_(z).round_().clamp_(0, maxq)
            e = wg - (q - z) * s
            target = wg - torch.sign(e) * torch.relu(e.abs() - e.abs().clamp_min(1e-30).pow(scalar._HQ_P - 1) / beta)
            qm, tm = (q * m).sum(-1, keepdim=True) / n, (target * m).sum(-1, keepdim=True) / n
            var = ((q - qm).pow(2) * m).sum(-1, keepdim=True)
            cov = ((q - qm) * (target - tm) * m).sum(-1, keepdim=True)
            s = torch.where((var > 0) & (cov > 0), cov / var.clamp_min(1e-12), s).to(torch.float16).float()
            s = s.clamp_min(tiny)
            z = qm - tm / s
            beta *= scalar._HQ_KAPPA
        return s, z

    scalar.IntFormat._half_quadratic_zero = fit


def _bounded_zero() -> None:
    """Clamp the library's half-quadratic zero-point so no weight rounds more than half a step from its value."""
    import hf_quant.formats.scalar as scalar

    fitted = scalar.IntFormat._half_quadratic_zero

    def fit(self, wg, scheme, mask=None):
        s, z = fitted(self, wg, scheme, mask)
        hi = wg.amax(-1, keepdim=True)
        lo = wg.amin(-1, keepdim=True) if mask is None else torch.where(mask > 0, wg, hi).amin(-1, keepdim=True)
        return s, torch.maximum(torch.minimum(z, (1 << scheme.bits) - 0.5 - hi / s), -0.5 - lo / s)

    scalar.IntFormat._half_quadratic_zero = fit


if __name__ == "__main__":
    main()
