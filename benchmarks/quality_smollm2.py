"""Quality, true size and quantization cost of hf_quant's methods beside other libraries, on CPU, on every real
causal LM the project has (`hf_quant.assets.real_causal_lms()`: SmolLM2-135M, Qwen2.5-Coder-0.5B and -1.5B).

For every model and configuration (ours: each format x each method in METHODS; peers: benchmarks/peers.py) a fresh
subprocess loads the model, quantizes it (wall time and peak resident memory from `resource.getrusage`),
measures Botchan perplexity with `hf_quant.eval.perplexity` (same text, token budget and windows for all) and
true bits per weight with `hf_quant.eval.model_storage` (every stored tensor), then (first model only) does the
same for MiniLM's sentence-embedding cosine to float. Results: a markdown table per model, a JSON file and a Pareto
plot (PNG) per model.

    python benchmarks/quality_smollm2.py [--quick] [--tokens 8192] [--models smollm2 qwen2.5-coder]
                                         [--only NAME ...] [--out benchmarks/results]
    python benchmarks/quality_smollm2.py --out DIR --compare NAME   # paired table vs NAME from DIR/quality.json

The default budget is 8192 tokens (16 windows of 512): at 2048 tokens the gaps between good 4-bit methods were
within the evaluation's noise and some rankings flipped at 8192 (BENCHMARKS.md, "Data-free 4-bit at 8192 tokens").
Adding a method of ours: add it to METHODS (name -> extra HfQuantConfig settings); every format gets a row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `benchmarks.peers` when run as a script

# Our methods: name -> extra HfQuantConfig settings. Calibrated methods add their calibration settings here.
METHODS: dict[str, dict] = {"rtn": dict(method="rtn"), "mse": dict(method="mse")}
# Our formats by nominal bits (4-bit at group 64/128: the test model came from Q4_1 with blocks of 32).
FORMATS: list[tuple[str, dict]] = [
    ("int8-sym ch", dict(bits=8, group_size=-1, symmetric=True)),
    ("int4 g128", dict(bits=4, group_size=128)),
    ("int4 g64", dict(bits=4, group_size=64)),
    ("nf4 g64", dict(format="nf4", group_size=64)),
    # 4 weights per output row kept as float16 residuals (SpQR-style sparse outliers): +32 * 4 / in bits per weight.
    ("int4 g128 o4", dict(bits=4, group_size=128, outliers_per_row=4)),
    ("int3 g64", dict(bits=3, group_size=64)),
    ("int2 g32", dict(bits=2, group_size=32)),
]
QUICK_OURS = ["int4 g128 rtn", "int4 g128 mse", "int3 g64 mse", "int2 g32 mse"]
# Calibrated configurations (GPTQ on 16 x 512 Botchan tokens after token 8192; minutes each on 2 cores): not part of
# the full run, which they would make hours long. Run them with --only and merge with --render for the plot.
CALIBRATED: dict[str, dict] = {
    "int4 g128 gptq+hadamard": dict(bits=4, group_size=128, method="gptq", rotation="hadamard"),
    "int4 g128 dq gptq+hadamard": dict(bits=4, group_size=128, double_quant=True, method="gptq", rotation="hadamard"),
    "int3 g128 gptq+hadamard": dict(bits=3, group_size=128, method="gptq", rotation="hadamard"),
    "nf4 g64 gptq": dict(format="nf4", group_size=64, method="gptq"),
    "vq2 g128 gptq": dict(format="vq", planes=2, group_size=128, method="gptq"),
    "vq1 g128 gptq": dict(format="vq", planes=1, group_size=128, method="gptq"),
    "int2 g64 gptq": dict(bits=2, group_size=64, method="gptq"),
    "vq2 g128 gptq+hadamard": dict(format="vq", planes=2, group_size=128, method="gptq", rotation="hadamard"),
    "int2 g64 gptq+hadamard": dict(bits=2, group_size=64, method="gptq", rotation="hadamard"),
    "int8-sym ch gptq": dict(bits=8, group_size=-1, symmetric=True, method="gptq"),
    "int8 g128 gptq": dict(bits=8, group_size=128, method="gptq"),
}
# int4 g128 mse with a float head (the default until the 8-bit head became it, issue 20: the head is read for every
# token), with the 8-bit head (HfQuantConfig(): today's default), and with the head and token embedding sharing one
# 8-bit table.
HEAD_INT8 = {"bits": 8, "group_size": -1, "symmetric": True}
HEADS: dict[str, dict] = {
    "default (int4 g128 mse)": dict(lm_head="float"),
    "default + lm_head int8": dict(lm_head="int8"),
    "default + lm_head & embed int8": dict(modules_to_not_convert=[], quantize_embeddings=True,
                                           overrides={"lm_head": HEAD_INT8, "embed_tokens": HEAD_INT8}),
}
QUICK_PEERS = ["bnb nf4 b64", "hqq int4 g64", "quanto qint4 g128", "torchao intx4 g64"]
FLOAT = "float32"


def our_configs() -> dict[str, dict]:
    # lm_head="float": the linears only, as the peers quantize them (the default 8-bit head is HEADS' subject)
    return {f"{fmt} {method}": {**settings, **extra, "lm_head": "float"} for fmt, settings in FORMATS
            for method, extra in METHODS.items()}


def nominal_bits(cfg: dict) -> int:
    return cfg.get("bits", 8 if cfg.get("format") == "fp8" else 4)


def all_names(quick: bool) -> list[str]:
    from benchmarks.peers import PEERS

    if quick:
        return [FLOAT, *QUICK_OURS, *QUICK_PEERS]
    return [FLOAT, *our_configs(), *PEERS]


# --------------------------------------------------------------------------- worker (one configuration)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _load_quantized(name: str, path, auto_cls):
    """(model, quantized-module map or None for ours/float, library, nominal bits)."""
    import torch

    import hf_quant
    from benchmarks.peers import PEERS, library_version

    ours = {**our_configs(), **{k: {**v, "lm_head": "float"} for k, v in CALIBRATED.items()}, **HEADS}
    if name == FLOAT:
        return auto_cls.from_pretrained(path, dtype=torch.float32), None, "-", 32
    if name in ours:
        qc = hf_quant.HfQuantConfig(**ours[name])
        model = auto_cls.from_pretrained(path, dtype=torch.float32, quantization_config=qc)
        return model, None, f"hf_quant {hf_quant.__version__}", nominal_bits(ours[name])
    peer = PEERS[name]
    model = auto_cls.from_pretrained(path, dtype=torch.float32)
    quantized = peer.apply(model)
    return model, quantized, f"{peer.library} {library_version(peer.library)}", peer.bits


def worker(name: str, model_name: str, tokens: int, sentences: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from hf_quant.assets import botchan_text, minilm_path, real_causal_lms
    from hf_quant.eval import botchan_sentences, model_storage, sentence_embeddings, window_losses

    out: dict = {"name": name, "model": model_name, "rss_before_mib": _rss_mib()}
    path = real_causal_lms()[model_name]()
    start = time.perf_counter()
    model, quantized, out["library"], out["bits"] = _load_quantized(name, path, AutoModelForCausalLM)
    out["quantize_s"] = time.perf_counter() - start
    out["peak_rss_mib"] = _rss_mib()  # ru_maxrss is the peak so far: loading and quantizing only
    storage = model_storage(model, quantized).to_dict()
    out["bpw_model"] = storage["bits_per_weight"]
    # The float model has no quantized layers: their bits per weight is the float width.
    out["bpw"] = storage["quantized_bits_per_weight"] if storage["modules"] else storage["bits_per_weight"]
    out["bytes_after"], out["bytes_before"] = storage["bytes_after"], storage["bytes_before"]
    out["formats"] = sorted({m["format"] for m in storage["modules"].values()})
    # Per-window losses too, so two configurations can be compared window by window (`paired_table`).
    out["window_nll"] = window_losses(model, AutoTokenizer.from_pretrained(path), botchan_text(), max_tokens=tokens)
    out["ppl"] = math.exp(sum(nll for nll, _ in out["window_nll"]) / sum(n for _, n in out["window_nll"]))
    del model
    if sentences:
        path = minilm_path()
        tok = AutoTokenizer.from_pretrained(path)
        texts = botchan_sentences(sentences)
        reference = sentence_embeddings(AutoModel.from_pretrained(path, dtype=torch.float32), tok, texts)
        encoder, quantized, _, _ = _load_quantized(name, path, AutoModel)
        out["cosine"] = (sentence_embeddings(encoder, tok, texts).double() * reference.double()).sum(-1).mean().item()
        storage = model_storage(encoder, quantized)
        out["bpw_minilm"] = storage.bits_per_weight if storage.modules else storage.model_bits_per_weight
    return out


# --------------------------------------------------------------------------- driver


def run_one(name: str, model: str, args, sentences: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--model", model, "--tokens", str(args.tokens),
           "--sentences", str(sentences)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "model": model, "error": f"timed out after {args.timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return {"name": name, "model": model, "error": tail[-1][:300] if tail else f"exit status {proc.returncode}"}


def markdown(results: list[dict], base: dict | None) -> str:
    rows = ["| configuration | library | bits/weight (quantized layers) | bits/weight (whole model) | perplexity | "
            "Δ vs float32 | MiniLM cosine | quantize s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['name']} | - | - | - | failed: {r['error']} | - | - | - | - |")
            continue
        delta = f"{100 * (r['ppl'] / base['ppl'] - 1):+.1f}%" if base and r is not base else "-"
        cosine = f"{r['cosine']:.4f}" if "cosine" in r else "-"
        rows.append(f"| {r['name']} | {r['library']} | {r['bpw']:.3f} | {r['bpw_model']:.2f} | {r['ppl']:.3f} | "
                    f"{delta} | {cosine} | {r['quantize_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(rows)


def pareto_front(points: list[dict]) -> list[dict]:
    """The configurations no other beats on both bits per weight and perplexity, by increasing bits."""
    front, best = [], float("inf")
    for r in sorted(points, key=lambda r: (r["bpw"], r["ppl"])):
        if r["ppl"] < best:
            front.append(r)
            best = r["ppl"]
    return front


def _place_labels(ax, items: list[tuple[float, float, str]], fontsize: float) -> list[tuple[float, float]]:
    """Greedy label placement in display space: for each (x, y, text), the nearest offset (in points, on rings
    around the marker) where its box overlaps no marker and no label placed before. Returns the offsets."""
    import math

    to_display = ax.transData.transform
    scale = ax.figure.dpi / 72  # points -> pixels
    markers = [to_display((x, y)) for x, y, _ in items]
    boxes: list[tuple[float, float, float, float]] = []
    offsets = []

    def overlaps(box) -> bool:
        x0, y0, x1, y1 = box
        if any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in boxes):
            return True
        pad = 4 * scale
        return any(x0 - pad < mx < x1 + pad and y0 - pad < my < y1 + pad for mx, my in markers)

    for (x, y, text), (mx, my) in zip(items, markers):
        w, h = (0.62 * fontsize * len(text) + 2) * scale, (fontsize + 2) * scale
        chosen = None
        for radius in (6, 10, 15, 21, 28, 36, 45, 55, 66):
            for k in range(16):
                angle = 2 * math.pi * k / 16 + math.pi / 4
                dx, dy = radius * math.cos(angle), radius * math.sin(angle)
                left = mx + dx * scale - (w if dx < 0 else 0)
                bottom = my + dy * scale - (h if dy < 0 else 0)
                box = (left, bottom, left + w, bottom + h)
                if not overlaps(box):
                    chosen = (dx, dy, box)
                    break
            if chosen:
                break
        if chosen is None:  # crowded beyond every ring: put it on the outermost ring anyway
            dx, dy = 66.0, 0.0
            chosen = (dx, dy, (mx + dx * scale, my, mx + dx * scale + w, my + h))
        boxes.append(chosen[2])
        offsets.append(chosen[:2])
    return offsets


def pareto_plot(results: list[dict], base: dict | None, path: Path, title: str) -> None:
    """Perplexity against bits per weight: every configuration a numbered marker (its library's shape), the Pareto
    front labelled by name, and a table beside the plot naming every number (values of clipped points too).
    Results with a "model" key: one plot per model, pareto_<model>.png in path's folder."""
    models = sorted({r.get("model", "") for r in results})
    if models != [""]:
        for model in models:
            mine = [r for r in results if r.get("model", "") == model]
            own_base = next((r for r in mine if r["name"] == FLOAT and "error" not in r), None)
            slug = "".join(c if c.isalnum() else "_" for c in model).strip("_").lower()
            pareto_plot([{k: v for k, v in r.items() if k != "model"} for r in mine], own_base,
                        path.with_name(f"pareto_{slug}{path.suffix}"), f"{model}: {title}")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    points = [r for r in results if "error" not in r and r["name"] != FLOAT]
    # Collapsed configurations (perplexity in the thousands) would flatten the rest: clip them to the top edge.
    top = 10 * base["ppl"] if base else max(r["ppl"] for r in points)
    libraries = sorted({r["library"].split()[0] for r in points}, key=lambda lib: (lib != "hf_quant", lib))
    markers = dict(zip(libraries, "os^Dvp*h"))
    colors = dict(zip(libraries, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    lib_of = {id(r): r["library"].split()[0] for r in points}
    # numbers follow the table: by library, then bits per weight, then perplexity
    ordered = sorted(points, key=lambda r: (libraries.index(lib_of[id(r)]), r["bpw"], r["ppl"]))
    number = {id(r): i + 1 for i, r in enumerate(ordered)}
    front = pareto_front(points)
    on_front = {id(r) for r in front}

    fig = plt.figure(figsize=(15, 8))
    ax = fig.add_axes((0.06, 0.08, 0.58, 0.82))
    table = fig.add_axes((0.66, 0.02, 0.33, 0.94))
    table.axis("off")
    for lib in libraries:
        mine = [r for r in points if lib_of[id(r)] == lib]
        ax.scatter([r["bpw"] for r in mine], [min(r["ppl"], top) for r in mine], label=lib, marker=markers[lib],
                   s=36, color=colors[lib], zorder=3)
    ax.step([r["bpw"] for r in front], [min(r["ppl"], top) for r in front], where="post", color="grey", lw=1,
            label="Pareto front", zorder=2)
    if base:
        ax.axhline(base["ppl"], color="black", ls="--", lw=1, label=f"float32 ({base['ppl']:.2f})")
    ax.set_yscale("log")
    xs = [r["bpw"] for r in points]
    ax.set_xlim(min(xs) - 0.4, max(xs) + 0.6)
    # The axis ends just above the highest plotted point, so a plot of close 4-bit rows is not flattened.
    shown_max = min(top, max(r["ppl"] for r in points))
    ax.set_ylim(min(min(r["ppl"] for r in points), base["ppl"] if base else float("inf")) * 0.9, shown_max * 1.35)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("bits per weight of the quantized layers (every stored tensor)")
    ax.set_ylabel("perplexity (Botchan, log scale)")
    ax.set_title(f"{title}\nnumbers: the table on the right; the Pareto front is labelled by name; perplexity above "
                 f"{top:.0f} is clipped to the top edge (value in the table)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3, which="both")
    fig.canvas.draw()  # fixes the data -> display transform the label placement measures in
    fontsize = 6.5
    # front labels first (they are longer), then the numbers, each kept off markers and earlier labels
    labelled = sorted(points, key=lambda r: id(r) not in on_front)
    items = [(r["bpw"], min(r["ppl"], top),
              f"{number[id(r)]} {r['name']}" if id(r) in on_front else str(number[id(r)])) for r in labelled]
    for r, (x, y, text), (dx, dy) in zip(labelled, items, _place_labels(ax, items, fontsize)):
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    ha="right" if dx < 0 else "left", va="top" if dy < 0 else "bottom",
                    fontweight="bold" if id(r) in on_front else "normal", color=colors[lib_of[id(r)]],
                    arrowprops=dict(arrowstyle="-", lw=0.4, color="grey", shrinkA=0, shrinkB=3), zorder=4)
    lines, y = [], 1.0
    step = min(0.024, 0.97 / (len(ordered) + 2 * len(libraries) + 2))
    table.text(0, y, f"{'#':>3}  {'configuration':<28} {'bits/w':>7} {'perplexity':>11}", family="monospace",
               fontsize=fontsize + 0.5, fontweight="bold", va="top")
    y -= step * 1.3
    for lib in libraries:
        table.scatter([0.005], [y - step * 0.45], marker=markers[lib], color=colors[lib], s=20, clip_on=False)
        table.text(0.03, y, lib, fontsize=fontsize + 0.5, fontweight="bold", va="top")
        y -= step
        for r in (r for r in ordered if lib_of[id(r)] == lib):
            mark = " *" if id(r) in on_front else ""
            ppl = f"{r['ppl']:.4g}" if r["ppl"] < 1e5 else f"{r['ppl']:.2e}"
            table.text(0, y, f"{number[id(r)]:>3}  {r['name'][:28]:<28} {r['bpw']:>7.3f} {ppl:>11}{mark}",
                       family="monospace", fontsize=fontsize, va="top", color=colors[lib])
            y -= step
        y -= step * 0.4
    table.text(0, y, "* on the Pareto front" + (f"; float32: {base['ppl']:.2f}" if base else ""),
               fontsize=fontsize, va="top")
    table.set_xlim(0, 1)
    table.set_ylim(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_all(args) -> list[dict]:
    names = [FLOAT, *args.only] if args.only else all_names(args.quick)
    known = set(all_names(False)) | set(CALIBRATED) | set(HEADS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {sorted(known)}")
    print(f"{', '.join(args.models)}: Botchan perplexity, {args.tokens} tokens, window 512; MiniLM cosine on "
          f"{args.sentences} sentences (with the first model); cpu_count={os.cpu_count()} load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for i, model in enumerate(args.models):
        for name in names:
            results.append(run_one(name, model, args, args.sentences if i == 0 else 0))
            print(json.dumps(results[-1]), flush=True)
    return results


def _results_from_logs(paths: list[str]) -> list[dict]:
    """Result lines of earlier runs, the last one per configuration winning (a rerun replaces a failure)."""
    by_name: dict[tuple[str, str], dict] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.startswith('{"name"'):
                result = json.loads(line)
                result.setdefault("model", "smollm2")  # lines of runs before the benchmark had several models
                key = (result["model"], result["name"])
                if "error" not in result or "error" in by_name.get(key, {"error": ""}):
                    by_name[key] = result
    order = {name: i for i, name in enumerate(all_names(False) + list(CALIBRATED) + list(HEADS))}
    return sorted(by_name.values(), key=lambda r: (r["model"], order.get(r["name"], len(order))))


PAIRED_REFERENCE = "int4 g128 mse"  # the default data-free recipe


def paired_table(results: list[dict], reference: str = PAIRED_REFERENCE) -> str:
    """Each configuration against `reference` on the same windows: the perplexity ratio and two standard errors of
    the paired per-window difference (`hf_quant.eval.paired_log_ppl_difference`). A gap inside two standard errors
    is marked as not resolved by this text. Empty when the runs carry no per-window losses."""
    from hf_quant.eval import paired_log_ppl_difference

    ref = next((r for r in results if r["name"] == reference and "window_nll" in r), None)
    others = [r for r in results if r is not ref and "window_nll" in r and r["name"] != FLOAT]
    if ref is None or not others:
        return ""
    rows = [f"Paired against {reference} ({len(ref['window_nll'])} windows; ppl ratio, +- two standard errors):", "",
            "| configuration | bits/weight | perplexity vs reference | +- 2 SE | verdict |", "|---|---|---|---|---|"]
    for r in others:
        d, se = paired_log_ppl_difference(ref["window_nll"], r["window_nll"])
        verdict = "within noise" if abs(d) <= 2 * se else ("worse" if d > 0 else "better")
        rows.append(f"| {r['name']} | {r['bpw']:.3f} | {100 * math.expm1(d):+.2f}% | {200 * se:.2f}% | {verdict} |")
    return "\n".join(rows)


def markdown_by_model(results: list[dict]) -> str:
    """One table per model, each with its own float32 row as the reference, and the paired comparison."""
    parts = []
    for model in dict.fromkeys(r.get("model", "smollm2") for r in results):
        mine = [r for r in results if r.get("model", "smollm2") == model]
        base = next((r for r in mine if r["name"] == FLOAT and "error" not in r), None)
        paired = paired_table(mine)
        parts.append(f"#### {model}\n\n{markdown(mine, base)}" + (f"\n\n{paired}" if paired else ""))
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few 4/3/2-bit configurations, 512 tokens, 32 sentences")
    ap.add_argument("--tokens", type=int, default=None, help="Botchan token budget (default 8192; quick 512)")
    ap.add_argument("--sentences", type=int, default=None, help="MiniLM sentences (default 128; quick 32; 0 skips)")
    ap.add_argument("--only", nargs="*", help="configuration names (float32 is always run)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each worker (default: torch's)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the Pareto plot from OUT/quality.json (no benchmark run, no table rewritten)")
    ap.add_argument("--render", nargs="*", metavar="LOG",
                    help="only rebuild the table, JSON and plot from the result lines of earlier runs' output")
    ap.add_argument("--compare", metavar="REFERENCE",
                    help="only print, from OUT/quality.json, every configuration paired against REFERENCE, per model "
                         "(no benchmark run, nothing rewritten)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for quality.json and quality.md")
    ap.add_argument("--plot", default=None,
                    help="Pareto plot path (default: benchmarks/plot/pareto_smollm2.png, or OUT/pareto_smollm2.png "
                         "when --out names another folder, so side runs leave the committed plot alone)")
    ap.add_argument("--models", nargs="+", default=None,
                    help="real causal LMs to run on (hf_quant.assets.real_causal_lms(); default: all of them)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tokens is None:
        args.tokens = 512 if args.quick else 8192
    if args.sentences is None:
        args.sentences = 32 if args.quick else 128
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.tokens, args.sentences, args.threads)), flush=True)
        return
    from hf_quant.assets import real_causal_lms

    known_models = list(real_causal_lms())
    args.models = args.models or known_models
    if unknown := [m for m in args.models if m not in known_models]:
        raise SystemExit(f"unknown model(s) {unknown}; known: {known_models}")
    out = Path(args.out)
    plot = args.plot or (HERE / "plot" / "pareto_smollm2.png" if out.resolve() == (HERE / "results").resolve()
                         else out / "pareto_smollm2.png")
    if args.compare:
        results = json.loads((out / "quality.json").read_text())["results"]
        for model in dict.fromkeys(r["model"] for r in results):
            table = paired_table([r for r in results if r["model"] == model], args.compare)
            print(f"#### {model}\n\n{table or f'(no {args.compare!r} row with per-window losses)'}\n")
        return
    if args.replot:
        saved = json.loads((out / "quality.json").read_text())
        results = saved["results"]
        base = next((r for r in results if r["name"] == FLOAT and "error" not in r), None)
        pareto_plot(results, base, Path(plot),
                    f"Botchan {saved['tokens']} tokens: perplexity vs true bits per weight")
        print(f"wrote {plot}")
        return
    if args.render:
        results = _results_from_logs(args.render)
    else:
        results = run_all(args)
    base = next((r for r in results if r["name"] == FLOAT and "error" not in r), None)
    table = markdown_by_model(results)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"tokens": args.tokens, "results": results}, indent=1) + "\n")
    (out / "quality.md").write_text(table + "\n")
    pareto_plot(results, base, Path(plot),
                f"Botchan {args.tokens} tokens: perplexity vs true bits per weight")


if __name__ == "__main__":
    main()
