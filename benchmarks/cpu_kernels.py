"""Per-layer CPU matmul time of every hf_quant format on every kernel that supports it, beside dense float32 and
bfloat16 torch matmuls of the same shape measured in the same run, and beside the memory-bandwidth floor.

Floor = bytes that must be read (the weight as stored, every tensor, plus the activations) and written (the
output) / copy bandwidth measured here (`torch.Tensor.copy_` of 256 MiB). Measurements of one shape and token
count are interleaved over repetitions (the machine is shared and noisy) and the median is reported.

    python benchmarks/cpu_kernels.py [--quick] [--threads N] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from hf_quant import QuantLinear, QuantScheme
from hf_quant.eval.storage import scheme_label
from hf_quant.kernels import available_kernels

HERE = Path(__file__).resolve().parent
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (out, in): attention/MLP shapes of 7-8B LLMs
TOKENS = [1, 16, 512]
SCHEMES = [
    QuantScheme(bits=8, group_size=-1, symmetric=True),
    QuantScheme(bits=8, group_size=128),
    QuantScheme(bits=4, group_size=128),
    QuantScheme(bits=4, group_size=64),
    QuantScheme(bits=4, group_size=128, double_quant=True),
    QuantScheme(bits=3, group_size=128),
    QuantScheme(bits=2, group_size=64),
    QuantScheme(format="nf4", group_size=64),
    QuantScheme(format="fp4", group_size=64),
    QuantScheme(format="fp8", bits=8, group_size=128),
    QuantScheme(format="ternary", bits=2, group_size=128, planes=1),
    QuantScheme(format="vq", bits=8, group_size=128, planes=1),
    QuantScheme(format="vq", bits=8, group_size=128, planes=2),
]
QUICK_SHAPES, QUICK_TOKENS = [(4096, 4096)], [1, 16]
QUICK_SCHEMES = [SCHEMES[0], SCHEMES[2], SCHEMES[7]]


def copy_bandwidth(mib: int = 256, reps: int = 5) -> float:
    """Bytes per second moved by a large copy (read + write)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / min(times)


def _time_once(fn, min_seconds: float) -> float:
    """Seconds per call, averaged over as many calls as fill `min_seconds`."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / n


def interleaved_ms(fns: dict[str, object], reps: int, min_seconds: float) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, min_seconds))
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def random_vq_tensors(scheme: QuantScheme, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Stored VQ tensors of the right shapes and dtypes with random codes (speed does not depend on the values)."""
    from hf_quant.formats import tensor_specs

    specs = tensor_specs(scheme, shape)
    gen = torch.Generator().manual_seed(0)
    return {"qweight": torch.randint(0, 256, specs["qweight"][0], generator=gen, dtype=torch.uint8),
            "codebook": (torch.randn(specs["codebook"][0], generator=gen) * 0.02).half(),
            "scales": torch.ones(specs["scales"][0], dtype=torch.float16)}


def bench_shape(out_f: int, in_f: int, tokens: list[int], schemes, reps: int, min_seconds: float, bandwidth: float):
    torch.manual_seed(0)
    weight = torch.randn(out_f, in_f) * 0.02
    dense = torch.nn.Linear(in_f, out_f, bias=False)
    dense.weight.data = weight
    weight_bf16 = weight.to(torch.bfloat16)
    layers = []  # (label, kernel name, stored bytes, kernel, state)
    for scheme in schemes:
        rtn = QuantScheme(**{**scheme.to_dict(), "method": "rtn"})  # timing only: the codes do not matter
        if scheme.format == "vq":  # k-means on a 60M-weight matrix takes minutes: random codes time the same
            tensors = random_vq_tensors(rtn, (out_f, in_f))
        else:
            q = QuantLinear.from_float(dense, rtn)
            tensors = q.packed_tensors()
            del q
        stored = sum(t.numel() * t.element_size() for t in tensors.values())
        for name, kernel in sorted(available_kernels().items()):
            if kernel.unsupported_reason(rtn, (out_f, in_f), torch.device("cpu"), torch.float32) is None:
                state = kernel.prepare(rtn, tensors, (out_f, in_f), torch.float32)
                layers.append((scheme_label(scheme), name, stored, kernel, state))
    rows = []
    with torch.inference_mode():
        for m in tokens:
            x = torch.randn(m, in_f)
            x_bf16 = x.to(torch.bfloat16)
            fns = {"float32": lambda: torch.nn.functional.linear(x, weight),
                   "bfloat16": lambda: torch.nn.functional.linear(x_bf16, weight_bf16)}
            for label, kname, _, kernel, state in layers:
                fns[f"{label}|{kname}"] = lambda kernel=kernel, state=state: kernel.linear(x, state)
            ms = interleaved_ms(fns, reps, min_seconds)
            io_bytes = m * in_f * 4 + m * out_f * 4

            def row(fmt, kname, stored_bytes, t):
                floor_ms = 1e3 * (stored_bytes + io_bytes) / bandwidth
                return {"shape": f"{out_f}x{in_f}", "tokens": m, "format": fmt, "kernel": kname, "ms": t,
                        "vs_float32": t / ms["float32"], "vs_bfloat16": t / ms["bfloat16"],
                        "vs_floor": t / floor_ms, "weight_bytes": stored_bytes}

            rows.append(row("float32", "torch dense", weight.numel() * 4, ms["float32"]))
            rows.append(row("bfloat16", "torch dense", weight.numel() * 2, ms["bfloat16"]))
            rows += [row(label, kname, stored, ms[f"{label}|{kname}"]) for label, kname, stored, _, _ in layers]
            for r in rows[-len(fns):]:
                print(json.dumps(r), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| out x in | tokens | format | kernel | ms | vs float32 | vs bfloat16 | vs bandwidth floor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['format']} | {r['kernel']} | {r['ms']:.3f} | "
                     f"{r['vs_float32']:.2f}x | {r['vs_bfloat16']:.2f}x | {r['vs_floor']:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, 1 and 16 tokens, three formats")
    ap.add_argument("--tokens", type=int, nargs="*", help=f"token counts (default {TOKENS})")
    ap.add_argument("--shapes", nargs="*", help="OUTxIN shapes (default: " + " ".join(f"{o}x{i}" for o, i in SHAPES) + ")")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    ap.add_argument("--min-seconds", type=float, default=0.2, help="time each repetition runs at least")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for kernels.json and kernels.md")
    ap.add_argument("--formats", nargs="*", help="only schemes whose label contains one of these (e.g. vq int4)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, tokens, schemes = (QUICK_SHAPES, QUICK_TOKENS, QUICK_SCHEMES) if args.quick else (SHAPES, TOKENS, SCHEMES)
    tokens = args.tokens or tokens
    if args.formats:
        schemes = [s for s in SCHEMES if any(f in scheme_label(s) for f in args.formats)]
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes] if args.shapes else shapes
    bandwidth = copy_bandwidth()
    header = (f"threads={torch.get_num_threads()} cpu_count={os.cpu_count()} torch={torch.__version__} "
              f"copy bandwidth {bandwidth / 1e9:.1f} GB/s load average {os.getloadavg()[0]:.1f}")
    print(header, flush=True)
    rows = []
    for out_f, in_f in shapes:
        rows += bench_shape(out_f, in_f, tokens, schemes, args.reps, args.min_seconds, bandwidth)
    table = markdown(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    (out / "kernels.md").write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
