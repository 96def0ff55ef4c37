"""Big models in bounded memory (issue 17): peak RSS and wall time of quantize-on-load (mse) and of GPTQ calibration,
streamed block by block, on synthetic checkpoints of real shapes (random bfloat16 weights: quality is meaningless,
memory and time are not).

The checkpoint is written once (sharded safetensors with an index, ~1 GiB shards, and a byte-level tokenizer) under
--out; every measurement runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. With --blocks N the
checkpoint holds only the first N decoder blocks (embeddings and head at full size) and the GPTQ time is projected to
the whole depth.

    OMP_NUM_THREADS=1 python benchmarks/big_models.py [--shape tinyllama|llama3-8b] [--blocks N]
        [--n-samples 16] [--seq-len 512] [--runs mse gptq gptq-full] [--threads 1] [--out DIR] [--json FILE]

Peak memory is reported three ways: ru_maxrss (what `time -v` shows; it includes the pages of the memory-mapped
checkpoint the process touched, which are page cache, given back under pressure), the peak anonymous resident memory
(RssAnon, sampled every 20 ms: what the process itself holds) and that of the mapped files (RssFile).

Runs: "mse" quantize-on-load (int4 g128), "gptq" (int4 g128, streamed: one block's float weights at a time),
"gptq-full" (the same with HF_QUANT_STREAM_CALIBRATION=0: the whole float model loads first, for comparison),
"bnb-nf4" (bitsandbytes NF4 quantize-on-load, from --peers: `pip install --no-deps --target /tmp/peers
bitsandbytes`, kept out of the project's venv), "llmc-gptq" (llm-compressor's GPTQ, W4A16: int4 g128 symmetric, its
defaults otherwise, on the same token windows as ours; run with --llmc-python, the python of its own venv made by
benchmarks/peers/setup_calibration_peers.sh: it loads the whole model, then `oneshot` calibrates layer by layer).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    # Qwen3-30B-A3B: 128 experts of 768, 8 per token; 1.2 GiB of bf16 experts per block (61 GiB in all: run --blocks)
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936),
}
SCHEME = dict(bits=4, group_size=128)
SHARD_BYTES = 1 << 30


def write_checkpoint(folder: Path, shape: dict, blocks: int | None) -> int:
    """A LlamaForCausalLM (or, for an MoE shape, Qwen3MoeForCausalLM) checkpoint of `shape` with random bfloat16
    weights (N(0, 0.02), norms 1); returns its size in bytes. Written tensor by tensor: the whole model is never in
    memory. MoE experts are written one tensor per expert, as published checkpoints are (transformers fuses them
    while loading)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, Qwen3MoeConfig

    layers = blocks or shape["num_hidden_layers"]
    moe = "num_experts" in shape
    common = dict(max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  dtype="bfloat16")
    config = (Qwen3MoeConfig if moe else LlamaConfig)(**{**shape, "num_hidden_layers": layers}, **common)
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    head_dim = shape.get("head_dim", h // shape["num_attention_heads"])
    q, kv = head_dim * shape["num_attention_heads"], head_dim * shape["num_key_value_heads"]
    names = [("model.embed_tokens.weight", (v, h))]
    for b in range(layers):
        p = f"model.layers.{b}."
        names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q))]
        if moe:
            e_i = shape["moe_intermediate_size"]
            names += [(p + "self_attn.q_norm.weight", (head_dim,)), (p + "self_attn.k_norm.weight", (head_dim,)),
                      (p + "mlp.gate.weight", (shape["num_experts"], h))]
            for e in range(shape["num_experts"]):
                names += [(p + f"mlp.experts.{e}.gate_proj.weight", (e_i, h)),
                          (p + f"mlp.experts.{e}.up_proj.weight", (e_i, h)),
                          (p + f"mlp.experts.{e}.down_proj.weight", (h, e_i))]
        else:
            names += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                      (p + "mlp.down_proj.weight", (h, i))]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, total = {}, {}, 0, 0

    def flush():
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))

    for name, shp in names:
        t = (torch.ones(shp) if len(shp) == 1 else torch.randn(shp, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= SHARD_BYTES:
            flush()
            shard, size = {}, 0
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    _tokenizer(folder)
    return total


def _tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer (ids below 300; calibration text only needs to map to valid ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>").save_pretrained(folder)


class MemorySampler:
    """Peak anonymous and file-backed resident memory of this process, sampled every 20 ms from /proc/self/status.
    ru_maxrss counts the memory-mapped checkpoint pages the process touched (file-backed: the page cache, given back
    under pressure); RssAnon is what the process itself holds (tensors, activations, the interpreter)."""

    def __init__(self, period: float = 0.02):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def sample(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self.sample()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak


def child(run: str, folder: str, n_samples: int, seq_len: int, device: str | None = None) -> dict:
    """One measurement (in its own process)."""
    if run == "bnb-nf4":
        return _bnb_child(folder)
    if run == "llmc-gptq":  # (in llm-compressor's venv, which has no hf_quant)
        return _llmc_child(folder, os.environ["HF_QUANT_BENCH_IDS"])
    import torch
    from transformers import AutoModelForCausalLM

    from hf_quant import HfQuantConfig
    settings = dict(SCHEME)
    if run.startswith("gptq"):
        settings.update(method="gptq", n_samples=n_samples, seq_len=seq_len)
    if run == "gptq-full":
        os.environ["HF_QUANT_STREAM_CALIBRATION"] = "0"
    sampler = MemorySampler()
    baseline = dict(sampler.stop())  # after imports: the interpreter, torch and transformers
    sampler = MemorySampler()
    start = time.perf_counter()
    on_gpu = device is not None and device != "cpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=HfQuantConfig(**settings),
                                                 device_map=device)
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peaks = sampler.stop()
    report = getattr(model.hf_quantizer, "calibration_report", None)
    state = model.state_dict()
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return {
        "run": run, "seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "model_bytes": model_bytes, "threads": torch.get_num_threads(),
        "peak_anon_bytes": peaks["RssAnon"], "peak_file_bytes": peaks["RssFile"], "baseline_anon_bytes":
            baseline["RssAnon"], "device": device or "cpu",
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
        "gpu": torch.cuda.get_device_name() if on_gpu else None,
        "calibration": None if report is None else {
            "summary": report.summary(), "seconds": report.seconds, "blocks": report.blocks,
            "streamed": report.streamed, "largest_block_bytes": report.largest_block_bytes,
            "largest_tensor_bytes": report.largest_tensor_bytes, "n_samples": report.n_samples,
            "seq_len": report.seq_len},
    }


def _bnb_child(folder: str) -> dict:
    """bitsandbytes NF4 quantize-on-load (blocksize 64, its default; bfloat16 compute), the peers' usual answer."""
    import bitsandbytes
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    sampler = MemorySampler()
    baseline = dict(sampler.stop())
    sampler = MemorySampler()
    start = time.perf_counter()
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")
    seconds = time.perf_counter() - start
    peaks = sampler.stop()
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"run": "bnb-nf4", "library": f"bitsandbytes {bitsandbytes.__version__}", "seconds": seconds,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "model_bytes": model_bytes,
            "threads": torch.get_num_threads(), "peak_anon_bytes": peaks["RssAnon"],
            "peak_file_bytes": peaks["RssFile"], "baseline_anon_bytes": baseline["RssAnon"], "calibration": None}


def _llmc_child(folder: str, ids_file: str) -> dict:
    """llm-compressor's GPTQ as its users run it on a CPU: the whole model loads, then `oneshot` (its sequential
    pipeline: one layer's calibration at a time) with W4A16 (int4, group 128, symmetric), lm_head float."""
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    ids = json.loads(Path(ids_file).read_text())
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(ids[0]) for _ in ids]})
    sampler = MemorySampler()
    baseline = dict(sampler.stop())
    sampler = MemorySampler()
    start = time.perf_counter()
    if "num_experts" in json.loads((Path(folder) / "config.json").read_text()):
        # its documented MoE loading: fused 3-D experts become one Linear per expert, which GPTQ then targets
        from llmcompressor.modeling.moe.linearize import load_quantizable_moe

        with load_quantizable_moe():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    loaded = time.perf_counter() - start
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$"])
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=len(ids[0]), num_calibration_samples=len(ids))
    seconds = time.perf_counter() - start
    peaks = sampler.stop()
    quantized = sum(1 for m in model.modules() if hasattr(m, "weight_scale"))
    return {"run": "llmc-gptq", "quantized_modules": quantized, "library": f"llmcompressor {llmcompressor.__version__}", "seconds": seconds,
            "load_seconds": loaded, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            # after oneshot the model still holds its float weights (fake-quantized) beside scales and zero-points:
            # the packed form is made when it is saved
            "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
            "threads": torch.get_num_threads(), "peak_anon_bytes": peaks["RssAnon"],
            "peak_file_bytes": peaks["RssFile"], "baseline_anon_bytes": baseline["RssAnon"], "calibration": None}


def calibration_ids(folder: Path, n_samples: int, seq_len: int) -> Path:
    """The token windows hf_quant's GPTQ calibrates on, written for the peer's run (same text, same windows)."""
    from transformers import AutoTokenizer

    from hf_quant import HfQuantConfig
    from hf_quant.pipeline import calibration_token_ids

    config = HfQuantConfig(**SCHEME, method="gptq", n_samples=n_samples, seq_len=seq_len)
    ids = calibration_token_ids(AutoTokenizer.from_pretrained(folder), config)
    out = folder / f"calibration_ids_{n_samples}x{seq_len}.json"
    out.write_text(json.dumps(ids.tolist()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--blocks", type=int, default=None, help="write and run only the first N decoder blocks")
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--runs", nargs="+", default=["mse", "gptq", "gptq-full"],
                        choices=["mse", "gptq", "gptq-full", "bnb-nf4", "llmc-gptq"])
    parser.add_argument("--llmc-python", default="/work/peer-venvs/llmcompressor/bin/python",
                        help="the python of llm-compressor's venv (benchmarks/peers/setup_calibration_peers.sh)")
    parser.add_argument("--peers", default=os.environ.get("HF_QUANT_PEERS", "/tmp/peers"),
                        help="where bitsandbytes is installed for the bnb-nf4 run (pip install --no-deps --target "
                             "DIR bitsandbytes: never into the project's venv)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None, help="device_map of the hf_quant runs (e.g. cuda: each block is "
                        "calibrated on the GPU, which then holds the packed model and one float block)")
    parser.add_argument("--out", default="/tmp/hf_quant_big_models")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("RUN", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(child(*args.child, args.n_samples, args.seq_len, args.device)))
        return

    shape = SHAPES[args.shape]
    folder = Path(args.out) / f"{args.shape}{'' if args.blocks is None else f'-{args.blocks}blocks'}"
    index = folder / "model.safetensors.index.json"
    if index.exists():
        float_bytes = json.loads(index.read_text())["metadata"]["total_size"]
    else:
        start = time.perf_counter()
        float_bytes = write_checkpoint(folder, shape, args.blocks)
        print(f"wrote {folder} ({float_bytes / 2**30:.2f} GiB bf16) in {time.perf_counter() - start:.0f} s")
    layers = args.blocks or shape["num_hidden_layers"]
    results = {"shape": args.shape, "config": shape, "blocks_run": layers, "float_checkpoint_bytes": float_bytes,
               "n_samples": args.n_samples, "seq_len": args.seq_len, "threads": args.threads, "runs": []}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for run in args.runs:
        cmd = [sys.executable, __file__, "--child", run, str(folder), "--n-samples", str(args.n_samples),
               "--seq-len", str(args.seq_len), "--threads", str(args.threads)] + (
                   ["--device", args.device] if args.device else [])
        run_env = env if run != "bnb-nf4" else {**env, "PYTHONPATH": os.pathsep.join(
            filter(None, [args.peers, env.get("PYTHONPATH")]))}
        if run == "llmc-gptq":
            cmd[0] = args.llmc_python
            run_env = {**env, "HF_QUANT_BENCH_IDS": str(calibration_ids(folder, args.n_samples, args.seq_len))}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{run}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        if args.blocks is not None and r["calibration"]:
            per_block = r["calibration"]["seconds"] / layers
            r["projected_calibration_seconds"] = per_block * shape["num_hidden_layers"]
        results["runs"].append(r)
        cal = r["calibration"]
        print(f"{run:>9}: {r['seconds']:7.1f} s, peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB (anonymous "
              f"{r['peak_anon_bytes'] / 2**30:.2f} GiB of which {r['baseline_anon_bytes'] / 2**30:.2f} GiB after "
              f"imports, mapped checkpoint pages {r['peak_file_bytes'] / 2**30:.2f} GiB), quantized model "
              f"{r['model_bytes'] / 2**30:.2f} GiB (float checkpoint {float_bytes / 2**30:.2f} GiB bf16)"
              + (f"\n           {r['gpu']}: peak allocated {r['peak_gpu_bytes'] / 2**30:.2f} GiB"
                 if r.get("peak_gpu_bytes") else "")
              + (f"\n           {cal['summary']}" if cal else "")
              + (f"\n           projected calibration of all {shape['num_hidden_layers']} blocks: "
                 f"{r['projected_calibration_seconds'] / 60:.1f} min" if "projected_calibration_seconds" in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
