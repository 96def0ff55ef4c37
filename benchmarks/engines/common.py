"""Shared by the engine benchmarks (bench_llama_cpp.py, bench_vllm_cpu.py): the Botchan windows, hf_quant's side of each
measurement, running an engine's runner script in its own venv, and the table."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The young teacher arrived in the small town and"


def add_arguments(parser) -> None:
    """The options every engine benchmark takes."""
    parser.add_argument("--tokens", type=int, default=2048, help="Botchan tokens scored (windows of --window)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)


def setup(args, engine_python: Path, setup_script: str, prefix: str):
    """(SmolLM2's folder, its tokenizer, the scored ids, their windows, the prompt's ids, a scratch folder), after
    checking that the engine's venv exists."""
    import sys
    import tempfile

    if not engine_python.exists():
        sys.exit(f"the engine is not set up ({engine_python} is missing): run bash benchmarks/engines/{setup_script}")
    import torch
    from transformers import AutoTokenizer

    from hf_quant.assets import smollm2_path

    torch.set_num_threads(args.threads)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    ids, windows, prompt_ids = botchan_windows(tok, args.tokens, args.window)
    return path, tok, ids, windows, prompt_ids, Path(tempfile.mkdtemp(prefix=prefix))


def botchan_windows(tok, tokens: int, window: int) -> tuple[list[int], list[list[int]], list[int]]:
    """(the first `tokens` Botchan ids, non-overlapping windows of them, the prompt's ids)."""
    from hf_quant.assets import botchan_text

    ids = tok(botchan_text(), add_special_tokens=False, verbose=False)["input_ids"][:tokens]
    windows = [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]
    return ids, windows, tok(PROMPT, add_special_tokens=False)["input_ids"]


def run_engine(python: Path, runner: Path, spec: dict, scratch: Path, tag: str) -> dict:
    """Run `runner` SPEC OUT with the engine venv's `python`; return OUT's JSON."""
    spec_path, out_path = scratch / f"{tag}.spec.json", scratch / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    subprocess.run([str(python), str(runner), str(spec_path), str(out_path)], check=True)
    return json.loads(out_path.read_text())


def hf_quant_side(model, windows: list[list[int]], prompt_ids: list[int], new_tokens: int) -> dict:
    """hf_quant's own perplexity (every token after each window's first), greedy tokens and tokens/s, in
    transformers with hf_quant's kernels."""
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    prefill_tokens, prefill_seconds = 0, 0.0
    with torch.no_grad():
        for ids in windows:
            x = torch.tensor([ids])
            start = time.perf_counter()
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            prefill_seconds += time.perf_counter() - start
            prefill_tokens += len(ids)
            nll += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += len(ids) - 1
        prompt = torch.tensor([prompt_ids])
        model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        decode_seconds = time.perf_counter() - start
    return {"perplexity": math.exp(nll / count), "scored_tokens": count,
            "greedy": out[0, len(prompt_ids):].tolist(), "prefill_tokens_per_s": prefill_tokens / prefill_seconds,
            "decode_tokens_per_s": new_tokens / decode_seconds}


def compare(row: dict) -> None:
    """Add the perplexity gap (engine vs hf_quant, %) and the greedy agreement (leading tokens equal)."""
    engine, ours = row["engine"], row.get("hf_quant")
    if ours is None:
        return
    row["ppl_gap_percent"] = 100 * (engine["perplexity"] / ours["perplexity"] - 1)
    n = 0
    for x, y in zip(engine["greedy"], ours["greedy"]):
        if x != y:
            break
        n += 1
    row["greedy_agreement"] = n


def table(engine: str, rows: dict, new_tokens: int) -> str:
    nan = float("nan")
    lines = [f"| model | size MiB | ppl {engine} | ppl hf_quant | gap | greedy agree | prefill tok/s {engine} / "
             f"hf_quant | decode tok/s {engine} / hf_quant |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        e, h = row["engine"], row.get("hf_quant") or {}
        lines.append(
            f"| {name} | {row['bytes'] / 2**20:.1f} | {e['perplexity']:.3f} | {h.get('perplexity', nan):.3f} | "
            f"{row.get('ppl_gap_percent', nan):+.2f}% | {row.get('greedy_agreement', '-')}/{new_tokens} | "
            f"{e['prefill_tokens_per_s']:.0f} / {h.get('prefill_tokens_per_s', nan):.0f} | "
            f"{e['decode_tokens_per_s']:.1f} / {h.get('decode_tokens_per_s', nan):.1f} |")
    return "\n".join(lines)


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
