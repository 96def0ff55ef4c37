"""Calibrated 4-bit and 3-bit beside the GPTQ-class peers users pick (issue 18): llm-compressor's GPTQ, AutoRound and
GPTQModel's GPTQ, each in its own venv (benchmarks/peers/setup_calibration_peers.sh), against hf_quant's GPTQ with and
without the Hadamard rotation, on the real causal LMs of `hf_quant.assets.real_causal_lms()`.

Same calibration for all: the exact [n_samples, seq_len] token windows hf_quant's GPTQ takes
(`hf_quant.pipeline.calibration_token_ids`: 16 x 512 tokens spread evenly over Botchan after its first
BOTCHAN_EVAL_TOKENS = 8192 tokens) are written to a JSON file and handed to each peer. hf_quant's calibration windows
are deterministic, so the "seed" is the calibration window offset: seed s calibrates on Botchan tokens
[8192 + s * SEED_OFFSET, end) (s = 0 is hf_quant's default), which moves 15 of the 16 windows (the last one ends at
the text's end for every seed).

Each peer saves its checkpoint (llm-compressor: compressed-tensors pack-quantized; AutoRound: GPTQ v1 via its
auto_gptq export; GPTQModel: GPTQ v1, its format="gptq"), which is loaded back into hf_quant with
`hf_quant.load_foreign` (exact: the peer's own codes, scales and zero-points) and measured with the same
`hf_quant.eval.window_losses` (the first --tokens Botchan tokens, window 512, disjoint from the calibration text) and
`hf_quant.eval.model_storage` (true bits per weight of the quantized layers). lm_head stays float everywhere (linears
only). Quantize time: the peer's own quantize call (model already loaded); hf_quant's: its whole `from_pretrained`
with the config (load included).

Every run is a subprocess; results accumulate in --out (a run already there is skipped unless --force), so the
command can be re-run to fill in what a time limit cut off.

    python benchmarks/calibration_peers.py [--models smollm2 qwen2.5-coder] [--settings int4-g128 ...]
        [--methods hf-gptq hf-gptq-hadamard llmc-gptq-sym llmc-gptq-asym autoround gptqmodel] [--seeds 0 1 2]
        [--tokens 1024] [--threads 1] [--autoround-iters 50 --autoround-lr 5e-3]
    python benchmarks/calibration_peers.py --table      # the markdown tables from --out
    python benchmarks/calibration_peers.py --paired hf-gptq   # each method vs one, window by window (+- 2 SE)

Runs record per-window losses (`window_nll`), so `--paired` can say which gaps the evaluation text resolves. The
default --tokens 1024 (2 windows) is what the older tables used; paired comparisons want more windows: the 8192-token
runs (16 windows, all before the calibration text) go to their own file,
--tokens 8192 --out benchmarks/results/calibration_peers_8192.json (one file holds one token budget).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"
SEED_OFFSET = 1365  # tokens: a third of the spacing of 16 windows over Botchan's ~62k calibration tokens
SETTINGS = {
    "int4-g128": dict(bits=4, group_size=128),
    "int4-g64": dict(bits=4, group_size=64),
    "int3-g128": dict(bits=3, group_size=128),
    "int3-g64": dict(bits=3, group_size=64),
    "int2-g64": dict(bits=2, group_size=64),  # the 2-bit class: peers' int2 g64 (2.25 bits symmetric)
}
# Methods whose storage is not the setting's integer grid: GPTVQ's two 2-D codebooks per 128-column group (2.27 bits
# on these models), our best 2-bit-class format, compared with the peers' int2 g64 rows.
METHOD_FORMAT = {"hf-gptvq-hadamard": dict(format="vq", planes=2, group_size=128)}
# "-refit": the same with refit_scales=True (GPTQ's group scales refitted to its codes; off by default)
# "-cv": the same with damp="cv" (GPTQ's damping cross-validated per input group; off by default)
# "-gen": no calibration text: calibration="generated", the model writes its own 16 x 512 tokens, and the seed is the
# sampling seed (calibration_seed), not a Botchan offset. These are data-free for the user (no data given).
METHODS = ("hf-gptq", "hf-gptq-hadamard", "hf-gptq-sym", "hf-gptq-sym-hadamard", "hf-gptvq-hadamard",
           "hf-gptq-refit", "hf-gptq-hadamard-refit", "hf-gptq-sym-refit", "hf-gptq-sym-hadamard-refit",
           "hf-gptq-cv", "hf-gptq-sym-cv", "hf-gptq-hadamard-cv",
           "hf-gptq-gen", "hf-gptq-hadamard-gen", "hf-gptq-sym-gen", "hf-gptq-sym-hadamard-gen", "hf-gptq-residual-gen",
           "llmc-gptq-sym", "llmc-gptq-asym", "autoround", "gptqmodel")
LABELS = {
    "hf-gptq": "hf_quant GPTQ (asym)",
    "hf-gptq-hadamard": "hf_quant GPTQ + Hadamard (asym)",
    "hf-gptq-sym": "hf_quant GPTQ, symmetric",
    "hf-gptq-sym-hadamard": "hf_quant GPTQ + Hadamard, symmetric",
    "hf-gptvq-hadamard": "hf_quant GPTVQ (2 codebooks g128) + Hadamard",
    "hf-gptq-refit": "hf_quant GPTQ (asym), scales refitted",
    "hf-gptq-hadamard-refit": "hf_quant GPTQ + Hadamard (asym), scales refitted",
    "hf-gptq-sym-refit": "hf_quant GPTQ, symmetric, scales refitted",
    "hf-gptq-sym-hadamard-refit": "hf_quant GPTQ + Hadamard, symmetric, scales refitted",
    "hf-gptq-cv": "hf_quant GPTQ (asym), damping cross-validated",
    "hf-gptq-sym-cv": "hf_quant GPTQ, symmetric, damping cross-validated",
    "hf-gptq-hadamard-cv": "hf_quant GPTQ + Hadamard (asym), damping cross-validated",
    "hf-gptq-gen": "hf_quant GPTQ (asym) on self-generated text",
    "hf-gptq-hadamard-gen": "hf_quant GPTQ + Hadamard (asym) on self-generated text",
    "hf-gptq-sym-gen": "hf_quant GPTQ, symmetric, on self-generated text",
    "hf-gptq-sym-hadamard-gen": "hf_quant GPTQ + Hadamard, symmetric, on self-generated text",
    "hf-gptq-residual-gen": "hf_quant GPTQ + folded residual rotation (asym) on self-generated text",
    "llmc-gptq-sym": "llm-compressor GPTQ, symmetric",
    "llmc-gptq-asym": "llm-compressor GPTQ, asymmetric",
    "autoround": "AutoRound (sym)",
    "gptqmodel": "GPTQModel GPTQ (sym)",
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- inside subprocesses (.venv)


def _eval(model, tokenizer_dir, tokens: int) -> dict:
    from transformers import AutoTokenizer

    from hf_quant.assets import botchan_text
    from hf_quant.eval import model_storage, window_losses

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # per-window losses too, so two methods can be compared window by window (`--paired`)
    losses = window_losses(model, tok, botchan_text(), max_tokens=tokens)
    ppl = math.exp(sum(nll for nll, _ in losses) / sum(n for _, n in losses))
    s = model_storage(model)
    return {"ppl": ppl, "window_nll": losses, "bits_per_weight": s.bits_per_weight,
            "model_bits_per_weight": s.model_bits_per_weight}


def one_ours(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import hf_quant

    torch.set_num_threads(spec["threads"])
    config = hf_quant.HfQuantConfig(**spec["config"]) if spec["config"] is not None else None
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, quantization_config=config)
    seconds = time.perf_counter() - start
    out = _eval(model, spec["model"], spec["tokens"])
    if config is None:
        out.update(bits_per_weight=32.0, model_bits_per_weight=32.0)
    return {**out, "seconds": seconds}


def one_foreign(spec: dict) -> dict:
    import torch

    import hf_quant

    torch.set_num_threads(spec["threads"])
    model = hf_quant.load_foreign(spec["dir"], dtype=torch.float32)
    q = model.config.quantization_config
    q = q.to_dict() if hasattr(q, "to_dict") else q
    out = _eval(model, spec["model"], spec["tokens"])
    return {**out, "peer_format_bits_per_weight": _peer_format_bits(Path(spec["dir"]), model),
            "imported_as": {k: q.get(k) for k in ("format", "bits", "group_size", "symmetric")}}


def _peer_format_bits(folder: Path, model) -> float:
    """Bits per weight of the quantized linears in the peer's own files (every stored tensor of those modules but
    the bias: packed codes, scales, packed zero-points, g_idx, shapes), beside hf_quant's storage of the same weights
    (where asymmetric zero-points are float16, not packed 4-bit fields)."""
    from safetensors import safe_open

    from hf_quant.nn import PackedWeight

    size = {"I64": 8, "I32": 4, "F32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1}
    modules = {n: m for n, m in model.named_modules() if isinstance(m, PackedWeight)}
    nbytes = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name, _, leaf = key.rpartition(".")
                if name in modules and leaf != "bias":
                    sl = f.get_slice(key)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    nbytes += n * size[sl.get_dtype()]
    weights = sum(m.in_features * m.out_features for m in modules.values())
    return 8 * nbytes / weights


# --------------------------------------------------------------------------- driver


def _sub(cmd: list[str], what: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1])
    result.setdefault("wall_seconds", time.perf_counter() - start)
    return result


def _linear_in_features(model_dir: Path) -> set[int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return {cfg["hidden_size"], cfg["intermediate_size"], heads * head_dim}


def _peer_group(model_dir: Path, g: int) -> int:
    """llm-compressor needs every linear's in_features divisible by the group: halve it until it is (SmolLM2's 576
    takes 64 where 128 was asked)."""
    ins = _linear_in_features(model_dir)
    while any(i % g for i in ins):
        g //= 2
    return g


def _calibration(model_name: str, model_dir: Path, seed: int, work: Path) -> tuple[str | None, Path]:
    """(hf_quant's `calibration` setting, JSON file of the exact token windows it uses) for this seed."""
    from transformers import AutoTokenizer

    import hf_quant
    from hf_quant.assets import botchan_text
    from hf_quant.pipeline import BOTCHAN_EVAL_TOKENS, calibration_token_ids

    folder = work / model_name
    folder.mkdir(parents=True, exist_ok=True)
    ids_file = folder / f"calibration-seed{seed}.json"
    calibration = None
    tok = AutoTokenizer.from_pretrained(model_dir)
    if seed:
        text_file = folder / f"calibration-seed{seed}.txt"
        if not text_file.exists():
            ids = tok(botchan_text(), add_special_tokens=False, verbose=False)["input_ids"]
            text_file.write_text(tok.decode(ids[BOTCHAN_EVAL_TOKENS + seed * SEED_OFFSET:]), encoding="utf-8")
        calibration = str(text_file)
    if not ids_file.exists():
        windows = calibration_token_ids(tok, hf_quant.HfQuantConfig(method="gptq", calibration=calibration))
        ids_file.write_text(json.dumps(windows.tolist()))
    return calibration, ids_file


def _load(out: Path) -> dict:
    if out.exists():
        return json.loads(out.read_text())
    return {"float": {}, "runs": []}


def _key(r: dict) -> tuple:
    return r["model"], r["setting"], r["method"], r["seed"]


def _save(out: Path, data: dict, record: dict | None = None, float_model: str | None = None) -> dict:
    """Write this run's change into --out as it is on disk now, not this process's copy of it (two runners on the
    same file would otherwise drop each other's runs): `record` replaces any run of its key, `float_model`'s float
    entry is set. Returns the merged data."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(out.parent, os.O_RDONLY)  # the folder: the file itself is replaced, not rewritten
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = _load(out)
        disk["setup"] = data["setup"]
        if float_model is not None:
            disk["float"][float_model] = data["float"][float_model]
        if record is not None:
            disk["runs"] = [r for r in disk["runs"] if _key(r) != _key(record)] + [record]
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(disk, indent=1) + "\n")
        tmp.replace(out)
    finally:
        os.close(lock)  # releases the lock
    return disk


def run(args) -> None:
    from hf_quant.assets import real_causal_lms

    out = Path(args.out)
    data = _load(out)
    if data.get("setup", {}).get("tokens", args.tokens) != args.tokens:
        raise SystemExit(f"{out} holds runs scored on {data['setup']['tokens']} tokens: pass --tokens "
                         f"{data['setup']['tokens']}, or --out another file for {args.tokens}-token runs")
    data["setup"] = {
        "tokens": args.tokens, "window": 512, "n_samples": 16, "seq_len": 512, "seed_offset_tokens": SEED_OFFSET,
        "threads": args.threads, "autoround": {"iters": args.autoround_iters, "lr": args.autoround_lr,
                                               "batch_size": args.autoround_batch_size},
    }
    me = [sys.executable, str(Path(__file__).resolve())]
    venvs = Path(args.peer_venvs)
    work = Path(args.work)
    for model_name in args.models:
        model_dir = real_causal_lms()[model_name]()
        if model_name not in data["float"]:
            spec = {"model": str(model_dir), "config": None, "tokens": args.tokens, "threads": args.threads}
            data["float"][model_name] = _sub([*me, "--one-ours", json.dumps(spec)], f"{model_name} float")
            data = _save(out, data, float_model=model_name)
        _log(f"{model_name}: float32 ppl {data['float'][model_name]['ppl']:.3f}")
        for setting in args.settings:
            for seed in args.seeds:
                calibration, ids_file = _calibration(model_name, model_dir, seed, work)
                for method in args.methods or METHODS:
                    key = (model_name, setting, method, seed)
                    done = [r for r in data["runs"] if _key(r) == key]
                    # a peer run recorded before its own on-disk bits were measured is evaluated again (its
                    # checkpoint is kept, so it is not quantized again)
                    if done and not args.force and "error" not in done[0] and (
                            method.startswith("hf-") or "peer_format_bits_per_weight" in done[0]):
                        continue
                    s = SETTINGS[setting]
                    record = {"model": model_name, "setting": setting, "method": method, "seed": seed,
                              "bits": s["bits"], "group_size": s["group_size"], "threads": args.threads}
                    _log(f"{model_name} {setting} {method} seed {seed} ...")
                    try:
                        record.update(_one(args, me, venvs, work, model_dir, model_name, setting, method, seed,
                                           calibration, ids_file))
                    except Exception as e:  # keep going: record it
                        record["error"] = str(e)[-2000:]
                        _log(f"  FAILED: {str(e)[-600:]}")
                    data = _save(out, data, record)
                    if "ppl" in record:
                        _log(f"  ppl {record['ppl']:.3f}, {record['bits_per_weight']:.3f} bits, "
                             f"quantize {record['quantize_seconds']:.0f} s")


def _one(args, me, venvs, work, model_dir, model_name, setting, method, seed, calibration, ids_file) -> dict:
    s = SETTINGS[setting]
    if method.startswith("hf-gpt"):
        config = {**s, **METHOD_FORMAT.get(method, {}), "method": "gptq", "lm_head": "float", "n_samples": 16,
                  "seq_len": 512}
        if "format" in config:
            config.pop("bits")
        if method.endswith("-gen"):
            config.update(calibration="generated", calibration_seed=seed)
        elif calibration is not None:
            config["calibration"] = calibration
        if "-hadamard" in method:
            config["rotation"] = "hadamard"
        elif "-residual" in method:  # QuaRot's folded form: nothing online, so engine formats can take it
            config["rotation"] = "residual"
        if method.endswith("-refit"):
            config["refit_scales"] = True
        if method.endswith("-cv"):
            config["damp"] = "cv"
        if "-sym" in method:  # llm-compressor's W4A16 storage: one float16 scale per group, no zero-point
            config["symmetric"] = True
        spec = {"model": str(model_dir), "config": config, "tokens": args.tokens, "threads": args.threads}
        r = _sub([*me, "--one-ours", json.dumps(spec)], method)
        return {"group_size_used": config["group_size"], "ppl": r["ppl"], "window_nll": r["window_nll"],
                "bits_per_weight": r["bits_per_weight"],
                "model_bits_per_weight": r["model_bits_per_weight"], "quantize_seconds": r["seconds"]}
    if method.startswith("llmc"):
        g = _peer_group(model_dir, s["group_size"])
        cmd = [str(venvs / "llmcompressor" / "bin" / "python"), str(PEERS / "llmcompressor_gptq.py"),
               "--bits", str(s["bits"]), "--group-size", str(g)] + (["--asym"] if method.endswith("asym") else [])
    elif method == "autoround":
        g = s["group_size"]
        cmd = [str(venvs / "autoround" / "bin" / "python"), str(PEERS / "autoround_quantize.py"),
               "--bits", str(s["bits"]), "--group-size", str(g), "--iters", str(args.autoround_iters),
               "--batch-size", str(args.autoround_batch_size)]
        if args.autoround_lr is not None:
            cmd += ["--lr", str(args.autoround_lr)]
    elif method == "gptqmodel":
        g = s["group_size"]  # GPTQModel takes a group that does not divide in_features (a shorter last group)
        cmd = [str(venvs / "gptqmodel" / "bin" / "python"), str(PEERS / "gptqmodel_gptq.py"),
               "--bits", str(s["bits"]), "--group-size", str(g)]
    else:
        raise ValueError(method)
    # named by the group actually used: SmolLM2's int4-g128 and int4-g64 llm-compressor rows share one checkpoint
    ckpt = work / model_name / f"{method}-int{s['bits']}-g{g}-seed{seed}"
    stamp = ckpt / "peer_run.json"
    if stamp.exists() and not args.force:  # checkpoint already made (e.g. the run was cut after quantizing)
        q = json.loads(stamp.read_text())
    else:
        cmd += ["--model", str(model_dir), "--ids", str(ids_file), "--out", str(ckpt), "--threads", str(args.threads)]
        q = _sub(cmd, f"{method} quantize")
        stamp.write_text(json.dumps(q))
    spec = {"dir": str(ckpt), "model": str(model_dir), "tokens": args.tokens, "threads": args.threads}
    r = _sub([*me, "--one-foreign", json.dumps(spec)], f"{method} load_foreign + eval")
    return {"group_size_used": g, "ppl": r["ppl"], "window_nll": r["window_nll"], "bits_per_weight": r["bits_per_weight"],
            "model_bits_per_weight": r["model_bits_per_weight"], "quantize_seconds": q["seconds"],
            "peer_format_bits_per_weight": r["peer_format_bits_per_weight"], "imported_as": r["imported_as"],
            "versions": q.get("versions"), **({"peer_config": q["config"]} if "config" in q else {})}


# --------------------------------------------------------------------------- tables


def table(out: Path) -> str:
    data = _load(out)
    lines = []
    for model_name, base in data["float"].items():
        lines += [f"**{model_name}** (float32 {base['ppl']:.3f}); perplexity per calibration seed (window offset "
                  f"0 / {SEED_OFFSET} / {2 * SEED_OFFSET} tokens), mean and spread (max - min):", "",
                  "| setting | method | group used | bits/weight (hf_quant / peer's files) | ppl seed 0 | seed 1 | "
                  "seed 2 | mean | spread | quantize s (seed 0) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for setting in SETTINGS:
            for method in METHODS:
                runs = {r["seed"]: r for r in data["runs"]
                        if (r["model"], r["setting"], r["method"]) == (model_name, setting, method)}
                if not runs:
                    continue
                ok = {k: r for k, r in runs.items() if "ppl" in r}
                first = ok[min(ok)] if ok else runs[min(runs)]
                cells = []
                for seed in (0, 1, 2):
                    r = runs.get(seed)
                    cells.append("-" if r is None else ("failed" if "ppl" not in r else f"{r['ppl']:.3f}"))
                ppls = [r["ppl"] for r in ok.values()]
                mean = f"{statistics.mean(ppls):.3f}" if len(ppls) > 1 else "-"
                spread = f"{max(ppls) - min(ppls):.3f}" if len(ppls) > 1 else "-"
                bits = f"{first['bits_per_weight']:.3f}" if "bits_per_weight" in first else "-"
                if "peer_format_bits_per_weight" in first:
                    bits += f" / {first['peer_format_bits_per_weight']:.3f}"
                secs = f"{ok[0]['quantize_seconds']:.0f}" if 0 in ok else "-"
                lines.append(f"| {setting} | {LABELS[method]} | {first.get('group_size_used', '-')} | {bits} | "
                             f"{' | '.join(cells)} | {mean} | {spread} | {secs} |")
        lines.append("")
    return "\n".join(lines)


def paired(out: Path, reference: str) -> str:
    """Per model, bits, group actually used and seed: every method against `reference` on the same evaluation windows
    (the paired per-window difference and two standard errors, as benchmarks/quality_smollm2.py's `paired_table`).
    Grouped by the group used, not the one asked, so equal storage meets: llm-compressor's SmolLM2 rows asked for
    g128 ran at g64 and pair with the int4-g64 runs. Runs scored before per-window losses were recorded have none and
    are left out."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.quality_smollm2 import paired_table

    data = _load(out)
    groups: dict[tuple, dict[str, dict]] = {}
    for r in sorted(data["runs"], key=lambda r: (METHODS.index(r["method"]), r["setting"])):
        if "window_nll" in r:
            key = (r["model"], r["bits"], r.get("group_size_used", r["group_size"]), r["seed"])
            groups.setdefault(key, {}).setdefault(r["method"], r)  # one checkpoint may serve two settings
    lines = []
    for (model_name, bits, group, seed), runs in groups.items():
        rows = [{"name": LABELS[m], "bpw": r["bits_per_weight"], "window_nll": r["window_nll"]} for m, r in runs.items()]
        t = paired_table(rows, LABELS[reference])
        if t:
            lines += [f"**{model_name}, int{bits}, group {group} used, seed {seed}.** {t}", ""]
    return "\n".join(lines) or f"(no {reference!r} run with per-window losses in {out})"


def pooled(out: Path, reference: str, seeds=(0, 1, 2)) -> str:
    """Per model, bits and group used: every method run on all of `seeds` against `reference` on the same seeds, with
    each window's loss averaged over the seeds (so the difference is that of the log of the seeds' geometric-mean
    perplexity). Two uncertainties: the windows' (the text's, as `paired`) and the seeds' (the spread of the per-seed
    differences over sqrt(seeds): calibration's own randomness, which `paired` cannot see). The verdict takes both:
    resolved when the gap exceeds two combined standard errors, sqrt(se_windows^2 + se_seeds^2)."""
    from hf_quant.eval import paired_log_ppl_difference

    data = _load(out)
    groups: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in sorted(data["runs"], key=lambda r: (METHODS.index(r["method"]), r["setting"])):
        if "window_nll" in r and r["seed"] in seeds:
            key = (r["model"], r["bits"], r.get("group_size_used", r["group_size"]))
            groups.setdefault(key, {}).setdefault(r["method"], {}).setdefault(r["seed"], r)

    def mean_losses(runs):
        return [(statistics.mean(runs[s]["window_nll"][i][0] for s in seeds), runs[seeds[0]]["window_nll"][i][1])
                for i in range(len(runs[seeds[0]]["window_nll"]))]

    lines = []
    for (model_name, bits, group), methods in groups.items():
        ref = methods.get(reference, {})
        if set(ref) != set(seeds):
            continue
        rows = []
        for method, runs in methods.items():
            if method == reference or set(runs) != set(seeds):
                continue
            d, se_windows = paired_log_ppl_difference(mean_losses(ref), mean_losses(runs))
            per_seed = [paired_log_ppl_difference(ref[s]["window_nll"], runs[s]["window_nll"])[0] for s in seeds]
            se_seeds = statistics.stdev(per_seed) / math.sqrt(len(seeds))
            se = math.hypot(se_windows, se_seeds)
            verdict = "within noise" if abs(d) <= 2 * se else ("worse" if d > 0 else "better")
            gm = math.exp(statistics.mean(math.log(runs[s]["ppl"]) for s in seeds))
            rows.append(f"| {LABELS[method]} | {runs[seeds[0]]['bits_per_weight']:.3f} | {gm:.3f} | "
                        f"{' / '.join(f'{100 * math.expm1(x):+.2f}' for x in per_seed)} | {100 * math.expm1(d):+.2f}% | "
                        f"{200 * se_windows:.2f}% | {200 * se_seeds:.2f}% | {verdict} |")
        if rows:
            gm_ref = math.exp(statistics.mean(math.log(ref[s]["ppl"]) for s in seeds))
            lines += [f"**{model_name}, int{bits}, group {group} used, seeds {', '.join(map(str, seeds))} pooled.** "
                      f"Against {LABELS[reference]} (geometric-mean perplexity {gm_ref:.3f}):", "",
                      "| configuration | bits/weight | geometric-mean ppl | per seed, % | pooled | +- 2 SE windows | "
                      "+- 2 SE seeds | verdict (both) |", "|---|---|---|---|---|---|---|---|", *rows, ""]
    return "\n".join(lines) or f"(no {reference!r} runs on seeds {seeds} with per-window losses in {out})"


DATA_FREE_ROWS = ("int4 g128 mse", "int4 g128 rtn", "bnb nf4 b64", "nf4 g64 rtn", "hqq int4 g128 fp16 meta",
                  "hqq int4 g64 fp16 meta", "int4 g64 mse")


def versus_data_free(out: Path, data_free: Path, methods=None, rows=DATA_FREE_ROWS) -> str:
    """Every "-gen" run (or every run of `methods`) (calibrated on text the model wrote itself: no data given, so data-free for the user) against
    the data-free rows of benchmarks/quality_smollm2.py's `data_free` results on the same evaluation windows. A
    generated run's seeds are pooled as in `pooled` (each window's loss averaged over the seeds run); the data-free
    rows have no seed. With one seed only the windows' standard error is known, and the verdict says so."""
    from hf_quant.eval import paired_log_ppl_difference

    data = _load(out)
    free = json.loads(data_free.read_text())
    if free.get("tokens") != data["setup"]["tokens"]:
        raise SystemExit(f"{data_free} scored {free.get('tokens')} tokens, {out} {data['setup']['tokens']}: the "
                         "windows differ")
    by_model: dict[str, dict[str, dict]] = {}
    for r in free["results"]:
        if r["name"] in rows and "window_nll" in r:
            by_model.setdefault(r["model"], {})[r["name"]] = r
    runs: dict[tuple, dict[int, dict]] = {}
    for r in data["runs"]:
        if (r["method"] in methods if methods else r["method"].endswith("-gen")) and "window_nll" in r:
            runs.setdefault((r["model"], r["setting"], r["method"]), {})[r["seed"]] = r
    lines = []
    for (model_name, setting, method), by_seed in sorted(runs.items()):
        seeds = sorted(by_seed)
        windows = len(by_seed[seeds[0]]["window_nll"])
        mean = [(statistics.mean(by_seed[s]["window_nll"][i][0] for s in seeds), by_seed[seeds[0]]["window_nll"][i][1])
                for i in range(windows)]
        gm = math.exp(statistics.mean(math.log(by_seed[s]["ppl"]) for s in seeds))
        table = []
        for name in rows:
            ref = by_model.get(model_name, {}).get(name)
            if ref is None:
                continue
            d, se_windows = paired_log_ppl_difference(ref["window_nll"], mean)
            per_seed = [paired_log_ppl_difference(ref["window_nll"], by_seed[s]["window_nll"])[0] for s in seeds]
            se_seeds = statistics.stdev(per_seed) / math.sqrt(len(seeds)) if len(seeds) > 1 else None
            se = math.hypot(se_windows, se_seeds or 0.0)
            verdict = "within noise" if abs(d) <= 2 * se else ("worse" if d > 0 else "better")
            if se_seeds is None:
                verdict += " (windows only: one seed)"
            table.append(f"| {name} | {ref['bpw']:.3f} | {ref['ppl']:.3f} | "
                         f"{' / '.join(f'{100 * math.expm1(x):+.2f}' for x in per_seed)} | {100 * math.expm1(d):+.2f}% | "
                         f"{200 * se_windows:.2f}% | {'-' if se_seeds is None else f'{200 * se_seeds:.2f}%'} | "
                         f"{verdict} |")
        if table:
            lines += [f"**{model_name}, {setting}: {LABELS[method]}** ({by_seed[seeds[0]]['bits_per_weight']:.3f} "
                      f"bits/weight; seeds {', '.join(map(str, seeds))}; geometric-mean perplexity {gm:.3f}) against "
                      "the data-free rows:", "",
                      "| data-free row | its bits/weight | its ppl | this run vs it, per seed, % | pooled | "
                      "+- 2 SE windows | +- 2 SE seeds | verdict (both) |", "|---|---|---|---|---|---|---|---|",
                      *table, ""]
    return "\n".join(lines) or f"(no -gen runs in {out} with rows of {data_free})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["smollm2", "qwen2.5-coder"])
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--methods", nargs="*", choices=list(METHODS), help="default: all (--versus-data-free: the -gen ones)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--autoround-iters", type=int, default=50, help="50: AutoRound's 'light' recipe (default 200)")
    ap.add_argument("--autoround-lr", type=float, default=5e-3, help="5e-3: the 'light' recipe's")
    ap.add_argument("--autoround-batch-size", type=int, default=8)
    ap.add_argument("--peer-venvs", default=os.environ.get("PEER_VENVS", "/work/peer-venvs"))
    ap.add_argument("--work", default=os.environ.get("PEER_WORK", "/work/peer-work"),
                    help="calibration windows and the peers' checkpoints")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibration_peers.json"))
    ap.add_argument("--force", action="store_true", help="re-run runs already in --out")
    ap.add_argument("--table", action="store_true", help="print the markdown tables from --out and exit")
    ap.add_argument("--paired", metavar="METHOD", choices=list(METHODS),
                    help="print, from --out, every method paired window by window against METHOD, and exit")
    ap.add_argument("--pooled", metavar="METHOD", choices=list(METHODS),
                    help="print, from --out, every method run on seeds 0-2 against METHOD on the same seeds, window "
                         "losses averaged over the seeds, with the windows' and the seeds' standard errors, and exit")
    ap.add_argument("--versus-data-free", metavar="QUALITY_JSON", nargs="?",
                    const=str(ROOT / "benchmarks" / "results" / "data_free_8192" / "quality.json"),
                    help="print, from --out, every -gen run (calibrated on self-generated text) against the data-free "
                         "rows of benchmarks/quality_smollm2.py's results (default: the 8192-token ones), and exit")
    ap.add_argument("--one-ours", help=argparse.SUPPRESS)
    ap.add_argument("--one-foreign", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_ours:
        print(json.dumps(one_ours(json.loads(args.one_ours))))
    elif args.one_foreign:
        print(json.dumps(one_foreign(json.loads(args.one_foreign))))
    elif args.table:
        print(table(Path(args.out)))
    elif args.paired:
        print(paired(Path(args.out), args.paired))
    elif args.pooled:
        print(pooled(Path(args.out), args.pooled))
    elif args.versus_data_free:
        print(versus_data_free(Path(args.out), Path(args.versus_data_free), args.methods))
    else:
        run(args)


if __name__ == "__main__":
    main()
