"""Sharing on the Hugging Face Hub: upload a saved hf_quant checkpoint (or a loaded quantized model) with a model
card generated from the checkpoint itself and, when given, the record written by `hf-quant eval --json`.

One commit per push, through `huggingface_hub`: files the repository already holds with the same content are
dropped from the commit (the client compares hashes with the Hub's pre-upload answer) and LFS objects the Hub
already stores are not sent again, so re-pushing an unchanged checkpoint uploads nothing. The card is rendered into
a temporary folder; the checkpoint folder is only read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, constants, get_token, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)

CARD_TEMPLATE = "model_card.md.jinja"
EVAL_RECORD_FILENAME = "hf_quant_eval.json"  # the eval record is uploaded next to the card it fed
DEFAULT_COMMIT_MESSAGE = "Upload hf_quant checkpoint"
_TOKEN_FIX = "log in with `hf auth login`, or set HF_TOKEN (or pass --token / token=) to a token with write access"
_METHOD_DESCRIPTIONS = {
    "rtn": "round to nearest, min/max range",
    "mse": "data-free search of each group's scale and zero-point minimising the weight reconstruction error",
    "gptq": "GPTQ: calibrated, error-compensating rounding",
}
# Architecture suffix -> (transformers auto class, Hub pipeline tag).
_MODEL_KINDS = (
    ("ForCausalLM", "AutoModelForCausalLM", "text-generation"),
    ("LMHeadModel", "AutoModelForCausalLM", "text-generation"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
)


class HubPushError(ValueError):
    """A push that cannot start or that the Hub refused; the message names the fix."""


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str | os.PathLike | None = None,
    eval_record: str | os.PathLike | dict | None = None,
    license: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
):
    """Upload a checkpoint folder written by `save_pretrained` (safetensors, config, tokenizer and any other files
    in it, hidden files excepted) to `repo_id`, creating the repository if needed, with a generated README.md card
    (a README.md in the folder is replaced by it). Returns huggingface_hub's `CommitInfo`.

    base_model: Hub id or local folder of the model that was quantized (the card's `base_model`; its license is
    copied when its card can be read). eval_record: a `hf-quant eval --json` record (path or dict) for this
    checkpoint; its figures go into the card and the file is uploaded as hf_quant_eval.json.
    """
    folder = Path(folder)
    _check_repo_id(repo_id)
    files = _checkpoint_files(folder)
    record = load_eval_record(eval_record, folder) if eval_record is not None else None
    if constants.HF_HUB_OFFLINE:
        raise HubPushError(f"cannot push {repo_id}: HF_HUB_OFFLINE is set; unset it to upload")
    if token is None and get_token() is None:
        raise HubPushError(f"no Hugging Face token found to push {repo_id}: {_TOKEN_FIX}")
    api = HfApi(endpoint=endpoint, token=token, library_name="hf_quant", library_version=_version())
    card = render_model_card(folder, repo_id=repo_id, base_model=base_model, eval_record=record, license=license,
                             endpoint=api.endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="hf_quant_push_") as tmp:
        generated = {"README.md": card}
        if record is not None:
            generated[EVAL_RECORD_FILENAME] = json.dumps(record, indent=2, sort_keys=True) + "\n"
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files
                      if name not in generated]
        for name, text in generated.items():
            path = Path(tmp, name)
            path.write_text(text, encoding="utf-8")
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
        with _hub_errors(repo_id, api.endpoint):
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.create_commit(repo_id, operations=operations, revision=revision,
                                     commit_message=commit_message or DEFAULT_COMMIT_MESSAGE)


def push_to_hub(model, repo_id: str, *, tokenizer=None, base_model: str | os.PathLike | None = None, **kwargs):
    """Save a quantized model (and its tokenizer) to a temporary folder and `push_folder` it, with the generated
    card. `base_model` defaults to the path or id the model was loaded from. `kwargs` as for `push_folder`.

    transformers' own `model.push_to_hub(repo_id)` uploads the same packed checkpoint, with transformers' generic
    card (or the card already in the repository)."""
    _check_repo_id(repo_id)
    if base_model is None:
        base_model = getattr(model, "name_or_path", None) or None
    with tempfile.TemporaryDirectory(prefix="hf_quant_save_") as tmp:
        model.save_pretrained(tmp)
        for weights in Path(tmp).glob("*.safetensors"):
            _sort_safetensors_metadata(weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return push_folder(tmp, repo_id, base_model=base_model, **kwargs)


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite, in place, the header of a safetensors file just saved with its `__metadata__` keys sorted.
    safetensors writes them in a random order (safetensors issue #584), so two saves of the same model differ in
    bytes and a re-push would upload the weights again. Only the header's key order changes; it keeps its length
    (padded with spaces, as the format allows), so tensor offsets stay valid."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        metadata = header.get("__metadata__") or {}
        if len(metadata) < 2:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # escaped differently from safetensors' writer: leave the file as it is
            return
        f.seek(8)
        f.write(text + b" " * (length - len(text)))


def render_model_card(
    folder: str | os.PathLike,
    *,
    repo_id: str,
    base_model: str | os.PathLike | None = None,
    eval_record: dict | None = None,
    license: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> str:
    """The README.md for `folder` pushed as `repo_id`: Hub metadata header, how to load it, true bits per weight,
    size before/after, settings per module, measured quality from `eval_record` when given."""
    from ..eval.storage import checkpoint_storage

    folder = Path(folder)
    config = _read_config(folder)
    qc = config["quantization_config"]
    storage = eval_record["storage"] if eval_record is not None else checkpoint_storage(folder).to_dict()
    quality = [dict(q, change_percent=100 * (q["quantized"] - q["float"]) / q["float"], digits=_digits(q["metric"]),
                    source=TEXT_SOURCES.get(q["dataset"]))
               for q in (eval_record or {}).get("quality", [])]
    base_id, base_card = _base_model_card(base_model, endpoint=endpoint, token=token)
    model_class, pipeline_tag = _model_kind(config)
    groups = _module_groups(storage["modules"])
    card_data = ModelCardData(
        base_model=base_id,
        library_name="transformers",
        license=license or base_card.get("license"),
        license_name=None if license else base_card.get("license_name"),
        license_link=None if license else base_card.get("license_link"),
        pipeline_tag=base_card.get("pipeline_tag") or pipeline_tag,
        tags=_tags(groups),
        base_model_relation="quantized" if base_id else None,
    )
    on_hub = [q for q in quality if q["dataset"] not in TEXT_SOURCES]  # model-index names Hub datasets only
    if on_hub:
        card_data.model_name = repo_id
        card_data.eval_results = [_eval_result(q, pipeline_tag) for q in on_hub]
    return ModelCard.from_template(
        card_data,
        template_path=str(_template_dir() / CARD_TEMPLATE),
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        summary=_summary(groups),
        hf_quant_version=_version(),
        transformers_version=config.get("transformers_version"),
        model_class=model_class,
        causal=model_class == "AutoModelForCausalLM",
        has_tokenizer=any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")),
        storage=storage,
        float_dtype=config.get("dtype") or config.get("torch_dtype") or "float",
        quantization_config=qc,
        quantization_config_json=json.dumps(qc, indent=2, sort_keys=True),
        method_description=_METHOD_DESCRIPTIONS.get(qc.get("method")),
        module_groups=[g | {"names": ", ".join(f"`{n}`" for n in g["names"])} for g in groups],
        float_modules=_float_modules(folder, qc, storage["modules"]),
        calibration=_calibration_description(qc),
        install=INSTALL,
        quality=quality,
    ).content


# Texts hf_quant measures quality on that are not Hub datasets: named in the card, never as a model-index dataset.
TEXT_SOURCES = {
    "botchan": "Botchan (Natsume Sōseki, English translation from Project Gutenberg), the text sentencepiece ships "
               "as `test/botchan.txt` in its source distribution (sentencepiece 0.2.3 on PyPI; "
               "`hf_quant.assets.botchan_text()`)",
}
# hf_quant is not on PyPI yet: the card says how to install it from its source.
INSTALL = ("hf_quant is not published on PyPI yet: install it from a checkout of its source repository, e.g. "
           "`pip install /path/to/hf_quant` (or `pip install -e .` inside the checkout).")


def _digits(metric: str) -> int:
    """Decimals a metric is printed with: perplexity 2, cosine similarity 4 (near 1, its changes are small)."""
    return 2 if metric == "perplexity" else 4


def _float_modules(folder: Path, qc: dict, quantized: dict) -> str:
    """The modules kept in float, each named once: the config's `modules_to_not_convert` and every module with a
    float weight of two or more dimensions in the checkpoint (embeddings included), then norms and biases."""
    from safetensors import safe_open

    from ..eval.storage import natural_key

    names = {m for m in qc.get("modules_to_not_convert") or [] if m not in quantized}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                module, _, tensor = key.rpartition(".")
                if tensor == "weight" and module not in quantized and len(f.get_slice(key).get_shape()) >= 2:
                    names.add(module)
    listed = ", ".join(f"`{n}`" for n in sorted(names, key=natural_key))
    return (listed + "; " if listed else "") + "every norm and bias"


def _calibration_description(qc: dict) -> str | None:
    """What a calibrated checkpoint (GPTQ, AWQ, rotations) was calibrated on, and how many tokens; None for
    data-free ones."""
    from ..config import HfQuantConfig

    from ..pipeline.data import GENERATED

    config = HfQuantConfig.from_dict(qc)
    if not config.quantizes_after_loading:
        return None
    tokens = config.n_samples * config.seq_len
    if config.calibration_dataset is not None:
        d = config.calibration_dataset
        text = (f"the `datasets` dataset `{d['path']}`" + (f" (config `{d['name']}`)" if d.get("name") else "")
                + f", split `{d.get('split', 'train')}`, field `{d.get('text_field', 'text')}`")
    elif config.calibration is None or config.calibration == "botchan":
        from ..pipeline.data import BOTCHAN_EVAL_TOKENS

        text = (f"{TEXT_SOURCES['botchan']}, after its first {BOTCHAN_EVAL_TOKENS:,} tokens (disjoint from the text "
                "hf_quant's perplexity evaluation reads)")
    elif config.calibration == GENERATED:
        text = (f"no data: text the float model wrote itself (sampled from its own next-token distribution after a "
                f"random first token, seed {config.calibration_seed})")
        return f"{text}; {config.n_samples} sequences of {config.seq_len} tokens ({tokens:,} tokens)"
    elif isinstance(config.calibration, str):
        text = f"the text file `{Path(config.calibration).name}`"
    else:
        text = f"{len(config.calibration)} text(s) given in the config"
    return (f"{text}; {config.n_samples} sequences of {config.seq_len} tokens ({tokens:,} tokens), tokenised with "
            "this model's tokenizer")


def load_eval_record(record: str | os.PathLike | dict, folder: str | os.PathLike) -> dict:
    """Read an `hf-quant eval --json` record (schema checked by `hf_quant.eval.report`) and check it describes the
    checkpoint in `folder`: the same quantization settings and the same stored size."""
    from ..eval.report import read_record, validate_record
    from ..eval.storage import checkpoint_storage

    source = "the eval record" if isinstance(record, dict) else str(record)
    if isinstance(record, dict):
        validate_record(record)
    else:
        record = read_record(record)
    saved = _read_config(Path(folder))["quantization_config"]
    measured = record["quantization_config"]
    differing = sorted(k for k in saved.keys() & measured.keys() if saved[k] != measured[k])
    if differing:
        raise HubPushError(f"{source} was measured on another quantization ({', '.join(differing)} differ from "
                           f"{Path(folder) / 'config.json'}); run `hf-quant eval` on this checkpoint")
    stored = checkpoint_storage(folder).to_dict()
    if record["storage"]["bytes_after"] != stored["bytes_after"]:
        raise HubPushError(f"{source} describes a checkpoint of {record['storage']['bytes_after']:,} bytes but {folder} "
                           f"stores {stored['bytes_after']:,}; run `hf-quant eval` on this checkpoint")
    return record


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubPushError(f"invalid repo id {repo_id!r}: {e} Use 'your-name/model-name' (letters, digits, '-', "
                           "'_', '.'; no leading or trailing '-' or '.')") from e


def _read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise HubPushError(f"{path} not found; pass a folder written by save_pretrained (e.g. `hf-quant quantize --out`)")
    config = json.loads(path.read_text())
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "hf_quant":
        raise HubPushError(f"{path} has no hf_quant quantization_config; quantize the model with hf_quant first")
    return config


def _checkpoint_files(folder: Path) -> list[tuple[str, Path]]:
    """(path in repo, local path) of every file to upload, after checking the folder is an hf_quant checkpoint."""
    if not folder.is_dir():
        raise HubPushError(f"{folder} is not a folder; pass a folder written by save_pretrained")
    _read_config(folder)
    if not any(folder.glob("*.safetensors")):
        raise HubPushError(f"{folder} has no .safetensors weights; save the model with save_pretrained")
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append((rel.as_posix(), path))
    return files


@contextmanager
def _hub_errors(repo_id: str, endpoint: str):
    """Turn the Hub's refusals into messages that name the fix."""
    try:
        yield
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise HubPushError(f"{endpoint} rejected the credentials for pushing to {repo_id} (HTTP 401): "
                               f"{_TOKEN_FIX}") from e
        if status == 403:
            namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
            raise HubPushError(f"{endpoint} refused writing to {repo_id} (HTTP 403): use a token with write access "
                               f"to '{namespace}', or push to a repo id in your own namespace") from e
        raise
    except _transport_errors() as e:  # connection refused, DNS, TLS: the Hub was not reached
        raise HubPushError(f"cannot reach {endpoint} to push {repo_id}: {e}; check the network or HF_ENDPOINT") from e


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Errors of a request that never got an answer (huggingface_hub's HTTP client varies across versions)."""
    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(__import__(client).TransportError)
        except ImportError:
            pass
    return tuple(errors)


def _base_model_card(base_model, *, endpoint: str | None, token: str | None) -> tuple[str | None, dict]:
    """(Hub id of the base model or None, metadata of its card or {}). A local folder gives its README.md and, for
    a Hub cache snapshot (…/models--org--name/snapshots/<sha>), its repo id."""
    if base_model is None:
        return None, {}
    local = Path(base_model)
    if local.is_dir():
        found = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]", str(local.resolve()) + os.sep)
        hub_id = f"{found.group(1)}/{found.group(2)}" if found else None
        if hub_id is None:
            logger.warning("base model %s is a local folder: the card names no base_model; pass a Hub id to link it",
                           local)
        readme = local / "README.md"
        return hub_id, _card_metadata(readme.read_text(encoding="utf-8")) if readme.is_file() else {}
    base_model = str(base_model)
    try:
        validate_repo_id(base_model)
    except HFValidationError as e:
        raise HubPushError(f"base model {base_model!r} is neither a local folder nor a Hub repo id: {e}") from e
    try:
        readme = hf_hub_download(base_model, "README.md", endpoint=endpoint, token=token)
    except _transport_errors() as e:  # includes HTTP errors and offline mode
        logger.warning("could not read the card of %s (%s): its license is not copied; pass license= / --license",
                       base_model, type(e).__name__)
        return base_model, {}
    return base_model, _card_metadata(Path(readme).read_text(encoding="utf-8"))


def _card_metadata(text: str) -> dict:
    return ModelCard(text, ignore_metadata_errors=True).data.to_dict()


def _model_kind(config: dict) -> tuple[str, str | None]:
    for arch in config.get("architectures") or []:
        for suffix, auto_class, pipeline_tag in _MODEL_KINDS:
            if arch.endswith(suffix):
                return auto_class, pipeline_tag
    return "AutoModel", "feature-extraction"


def _module_groups(modules: dict) -> list[dict]:
    """Quantized modules grouped by stored format, largest first: name suffixes, count, format, bits/weight."""
    groups: dict[str, dict] = {}
    for name, m in modules.items():
        g = groups.setdefault(m["format"], {"format": m["format"], "names": [], "count": 0, "weights": 0, "bits": 0.0})
        suffix = name.rsplit(".", 1)[-1]
        if suffix not in g["names"]:
            g["names"].append(suffix)
        weights = m.get("weights", 1)
        g["count"] += 1
        g["weights"] += weights
        g["bits"] += m["bits_per_weight"] * weights
    out = sorted(groups.values(), key=lambda g: -g["weights"])
    for g in out:
        g["bits_per_weight"] = g["bits"] / g["weights"]
    return out


def _summary(groups: list[dict]) -> str:
    return f"`{groups[0]['format']}`" + (" (other modules at other settings, see below)" if len(groups) > 1 else "")


def _tags(groups: list[dict]) -> list[str]:
    """hf_quant, quantized, and per stored format e.g. int4 and 4-bit (labels are like 'int4-sym g128')."""
    tags = ["hf_quant", "quantized"]
    for g in groups:
        fmt, bits = _label_format(g["format"].split()[0])
        for tag in (fmt, f"{bits}-bit" if bits else None):
            if tag and tag not in tags:
                tags.append(tag)
    return tags


def _label_format(label: str) -> tuple[str, int | None]:
    """(format tag, code width) of a format label ('int4-sym' -> ('int4', 4), 'nf4' -> ('nf4', 4)): the registered
    format whose name starts the label, its width following the name when the format has several."""
    from ..formats import format_names, get_format

    tag = label.removesuffix("-sym")
    for name in sorted(format_names(), key=len, reverse=True):
        fmt = get_format(name)
        width = tag[len(name):]
        if tag == name and len(fmt.bits) == 1:
            return tag, fmt.bits[0]
        if tag.startswith(name) and width.isdigit() and int(width) in fmt.bits:
            return tag, int(width)
    return tag, None


def _eval_result(q: dict, pipeline_tag: str | None):
    from huggingface_hub import EvalResult

    return EvalResult(task_type=pipeline_tag or "feature-extraction", dataset_type=q["dataset"],
                      dataset_name=q["dataset"], metric_type=q["metric"],
                      metric_value=round(q["quantized"], _digits(q["metric"])))


def _template_dir() -> Path:
    """model_cards/ ships inside the wheel as hf_quant/model_cards; a source checkout has it at the top level. The top
    level is trusted only beside our pyproject.toml: in an installed package it is site-packages, where a stray
    `model_cards` folder of another project would otherwise render a foreign template."""
    package = Path(__file__).resolve().parents[1]
    candidates = [package / "model_cards"]
    if (package.parent / "pyproject.toml").is_file():
        candidates.append(package.parent / "model_cards")
    for candidate in candidates:
        if (candidate / CARD_TEMPLATE).is_file():
            return candidate
    raise HubPushError(f"model card template {CARD_TEMPLATE} not found in {package / 'model_cards'}: the hf-quant "
                       "installation is incomplete; reinstall it (pip install --force-reinstall hf-quant)")


def _version() -> str:
    from ..version import __version__

    return __version__
