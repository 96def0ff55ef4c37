"""Triton kernel time at LLM layer shapes vs the fp16 cuBLAS matmul and vs the memory-bandwidth floor (GPU only).

    python benchmarks/gpu_kernels.py [--formats int4-g128 nf4-g64 vq2-g128 ...] [--tokens 1 16 512] [--moe]

For each (in x out) shape, token count and format it prints the kernel time, `fp16 / kernel` (how many times faster
than `F.linear` on float16 weights, cuBLAS) and `floor / kernel` (the fraction of the memory-bandwidth floor reached:
the bytes the kernel must read and write, divided by the device-to-device copy bandwidth measured in the same run).
Times are CUDA-graph replays (`triton.testing.do_bench_cudagraph`), so Python launch overhead is excluded; the first
call of each configuration autotunes (cached on disk by triton). Each result is checked against the float16 matmul
of the dequantized weight before it is timed. From DEQUANT_MIN_TOKENS tokens the kernel decodes the weight once and
calls cuBLAS (VQ from 2 tokens); those rows also time the fused tensor-core kernel (`fused (us)`) it replaces.
"""

from __future__ import annotations

import argparse
import sys

import torch

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out): attention/MLP projections of a 7-8B model
FORMATS = {
    "int4-g128": dict(bits=4, group_size=128),
    "int4-sym-g128": dict(bits=4, group_size=128, symmetric=True),
    "int3-g128": dict(bits=3, group_size=128),
    "int2-g64": dict(bits=2, group_size=64),
    "int8-channel": dict(bits=8, group_size=-1),
    "nf4-g64": dict(format="nf4", bits=4, group_size=64),
    "fp4-g32": dict(format="fp4", bits=4, group_size=32),
    "fp8-g128": dict(format="fp8", bits=8, group_size=128),
    "vq2-g128": dict(format="vq", bits=8, planes=2, group_size=128),
    "ternary1-g128": dict(format="ternary", bits=2, planes=1, group_size=128),
    "ternary2-g128": dict(format="ternary", bits=2, planes=2, group_size=128),
}


def require_gpu() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False here "
                 f"(torch {torch.__version__}). Run it on a machine with a GPU and a CUDA build of torch.")
    from hf_quant.kernels.triton import triton_available

    if not triton_available():
        sys.exit("benchmarks/gpu_kernels.py needs triton: pip install 'hf-quant[triton]'")


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    from triton.testing import do_bench_cudagraph

    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB, far beyond L2
    dst = torch.empty_like(src)
    ms = do_bench_cudagraph(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def state_bytes(state: dict) -> int:
    if "trit_planes" in state:  # ternary: one state per trit-plane
        return sum(state_bytes(plane) for plane in state["trit_planes"])
    tensors = [*state["planes"], state["scale"], state["zero"], state["table"]]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def random_vq_tensors(scheme, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Stored VQ tensors of the right shapes with random codes: k-means on a 60M-weight matrix takes minutes, and
    the kernel's speed does not depend on the values."""
    from hf_quant.formats import tensor_specs

    specs = tensor_specs(scheme, shape)
    return {"qweight": torch.randint(0, 256, specs["qweight"][0], dtype=torch.uint8, device="cuda"),
            "codebook": (torch.randn(specs["codebook"][0], device="cuda") * 0.02).half(),
            "scales": torch.ones(specs["scales"][0], dtype=torch.float16, device="cuda")}


def quantized(w: torch.Tensor, name: str):
    """(kernel, its state of `w` ([*experts, out, in]) in format `name`, float16 reference dequantization)."""
    from hf_quant.algorithms import quantize_weight
    from hf_quant.formats import QuantScheme, dequantize
    from hf_quant.kernels.triton import TritonKernel, TritonTernaryKernel, TritonVqKernel

    scheme = QuantScheme(method="rtn", **FORMATS[name])
    kernel = {"vq": TritonVqKernel, "ternary": TritonTernaryKernel}.get(scheme.format, TritonKernel)
    tensors = random_vq_tensors(scheme, tuple(w.shape)) if scheme.format == "vq" else quantize_weight(w, scheme)
    state = kernel.prepare(scheme, tensors, tuple(w.shape[-2:]), torch.float16)
    return kernel, state, dequantize(scheme, tensors, w.shape[-1], torch.float16)


def bench_linear(args, bandwidth: float) -> None:
    from triton.testing import do_bench_cudagraph

    import hf_quant.kernels.triton as triton_kernels

    print("| in x out | tokens | format | kernel (us) | fp16 cuBLAS (us) | fp16 / kernel | floor / kernel | fused (us) |")
    print("|---|---|---|---|---|---|---|---|")
    thresholds = {"": triton_kernels.DEQUANT_MIN_TOKENS, "_VQ": triton_kernels.DEQUANT_MIN_TOKENS_VQ}
    for in_f, out_f in SHAPES:
        w = torch.randn(out_f, in_f, device="cuda") * 0.02
        dense = w.half()
        for name in args.formats:
            kernel, state, w_ref = quantized(w, name)
            for m in args.tokens:
                x = torch.randn(m, in_f, device="cuda", dtype=torch.float16)
                err = rel_err(kernel.linear(x, state), x @ w_ref.T)
                if err > 5e-3:
                    sys.exit(f"{name} {in_f}x{out_f} m={m}: relative error {err:.2e} against the reference; not timing")
                t_kernel = do_bench_cudagraph(lambda: kernel.linear(x, state)) * 1e3
                t_dense = do_bench_cudagraph(lambda: torch.nn.functional.linear(x, dense)) * 1e3
                fused = ""
                suffix = "_VQ" if FORMATS[name].get("format") == "vq" else ""
                if m >= thresholds[suffix]:  # what the decode-once path replaces
                    setattr(triton_kernels, f"DEQUANT_MIN_TOKENS{suffix}", 1 << 30)
                    fused = f"{do_bench_cudagraph(lambda: kernel.linear(x, state)) * 1e3:.1f}"
                    setattr(triton_kernels, f"DEQUANT_MIN_TOKENS{suffix}", thresholds[suffix])
                moved = state_bytes(state) + x.numel() * 2 + m * out_f * 2
                floor = moved / bandwidth * 1e6
                print(f"| {in_f}x{out_f} | {m} | {name} | {t_kernel:.1f} | {t_dense:.1f} | "
                      f"{t_dense / t_kernel:.2f} | {floor / t_kernel:.2f} | {fused} |", flush=True)


def bench_moe(args) -> None:
    """Fused experts (8 experts, top-2, 4096 -> 14336) vs float16 experts run one F.linear per expert."""
    from triton.testing import do_bench, do_bench_cudagraph

    from hf_quant.kernels.triton import TritonKernel

    experts, top_k, in_f, out_f = 8, 2, 4096, 14336
    w = torch.randn(experts, out_f, in_f, device="cuda") * 0.02
    dense = w.half()
    print("\n| MoE experts x in x out | tokens | format | fused kernel (us) | fp16 per-expert loop (us) | ratio |")
    print("|---|---|---|---|---|---|")
    for name in args.formats:
        if FORMATS[name].get("format") in ("vq", "ternary"):  # no fused-experts kernel (eager experts loop)
            continue
        _, state, w_ref = quantized(w, name)
        for m in args.tokens:
            x = torch.randn(m, in_f, device="cuda", dtype=torch.float16)
            ids = torch.stack([torch.randperm(experts, device="cuda")[:top_k] for _ in range(m)])

            def loop(weights=dense):  # what an unfused float16 MoE does: one matmul per expert over its tokens
                y = x.new_empty(m, top_k, out_f)
                for e in range(experts):
                    rows, slots = (ids == e).nonzero(as_tuple=True)
                    y[rows, slots] = torch.nn.functional.linear(x[rows], weights[e])
                return y

            err = rel_err(TritonKernel.moe_linear(x, ids, state), loop(w_ref))
            if err > 5e-3:
                sys.exit(f"MoE {name} m={m}: relative error {err:.2e} against the reference; not timing")
            t_fused = do_bench_cudagraph(lambda: TritonKernel.moe_linear(x, ids, state)) * 1e3
            t_loop = do_bench(loop) * 1e3  # launch overhead included: `nonzero` syncs, so no CUDA graph
            row = f"| {experts}x{in_f}x{out_f} | {m} | {name} | {t_fused:.1f} | {t_loop:.1f} | {t_loop / t_fused:.2f} |"
            print(row, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="*", default=["int4-g128", "int3-g128", "int8-channel", "nf4-g64", "fp8-g128",
                                                     "vq2-g128", "ternary2-g128"],
                    choices=sorted(FORMATS))
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 128, 512])
    ap.add_argument("--moe", action="store_true", help="also time the fused MoE experts kernel")
    args = ap.parse_args()
    require_gpu()
    import triton

    bandwidth = copy_bandwidth()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"command: python {' '.join(sys.argv)}\n")
    with torch.inference_mode():
        bench_linear(args, bandwidth)
        if args.moe:
            bench_moe(args)


if __name__ == "__main__":
    main()
