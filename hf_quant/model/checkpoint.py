"""Checks of a pre-quantized checkpoint: every byte of it is untrusted input.

Before any tensor is read (`check_checkpoint_files`, headers only): the files are readable safetensors (pickled
.bin files are refused, never opened), the layout version is one we read, and the weights' own record wins over
config.json: the settings that decide how weights are read (`WEIGHT_FIELDS`, written into every shard's metadata
by `checkpoint_metadata`) and each module's scheme, shape and kind (`hf_quant_modules`) must equal what config.json
builds, every shard must carry the same record (shards of different saves are refused), every packed tensor the model
expects is present with the right dtype and shape, none is unexpected, and no packed tensor belongs to a module the
config keeps in float.
After the tensors are loaded (`check_packed_values`): every value check the format and its additive terms declare
(`Format.value_checks`: finite, positive normal scales, in-range indices, ...).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import SafetensorError, safe_open

from ..config import SUPPORTED_FORMAT_VERSIONS

METADATA_VERSION_KEY = "hf_quant_format_version"
METADATA_MODULES_KEY = "hf_quant_modules"  # per-module shape, scheme and kind, for readers without the model
METADATA_CONFIG_KEY = "hf_quant_config"  # the config fields that decide how the weights are read
METADATA_TENSORS_KEY = "hf_quant_float_tensors"  # name -> [dtype, SHA-256] of every other (float) tensor
# The HfQuantConfig fields that change how stored tensors are read (calibration and allocation settings do not).
WEIGHT_FIELDS = ("format_version", "format", "bits", "group_size", "symmetric", "double_quant", "lowrank_rank",
                 "planes", "outliers_per_row", "modules_to_not_convert", "overrides", "quantize_experts", "rotation",
                 "rotation_seed", "quantize_embeddings")
SAFETENSORS_DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_RESAVE = "download or save the checkpoint again"


class CheckpointError(ValueError):
    """A pre-quantized checkpoint does not match what its config describes, or is damaged."""


def _check_metadata_version(path, version) -> None:
    try:
        ok = int(version) in SUPPORTED_FORMAT_VERSIONS
    except (TypeError, ValueError):
        raise CheckpointError(
            f"{path}: safetensors metadata {METADATA_VERSION_KEY}={version!r} is not a format version number; "
            f"the file was modified: {_RESAVE}"
        ) from None
    if not ok:
        raise CheckpointError(
            f"{path}: written with hf_quant format version {version} (safetensors metadata "
            f"{METADATA_VERSION_KEY}); this hf_quant reads {list(SUPPORTED_FORMAT_VERSIONS)}. Upgrade hf_quant "
            "(pip install -U hf-quant) to load it."
        )


def read_headers(checkpoint_files: list[str]) -> dict[str, tuple[str, torch.dtype | str, tuple[int, ...]]]:
    """key -> (file, dtype, shape) for every tensor, reading headers only."""
    found = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise CheckpointError(
                f"{path}: hf_quant checkpoints are read from safetensors only (pickled files such as .bin are never "
                "loaded). Save the checkpoint with save_pretrained (it writes model.safetensors), or convert the "
                "file to safetensors where you trust its source"
            )
        try:
            with safe_open(path, framework="pt") as f:
                version = (f.metadata() or {}).get(METADATA_VERSION_KEY)
                if version is not None:
                    _check_metadata_version(path, version)
                for key in f.keys():
                    sl = f.get_slice(key)
                    if key in found:
                        raise CheckpointError(
                            f"tensor {key!r} is stored twice, in {found[key][0]} and {path}; the shards do not "
                            f"belong together: {_RESAVE}"
                        )
                    found[key] = (path, SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape()))
        except SafetensorError as e:
            size = os.path.getsize(path) if os.path.exists(path) else "missing"
            raise CheckpointError(
                f"{path} ({size} bytes) is not a readable safetensors file ({e}); it may be truncated or corrupted: "
                f"{_RESAVE}"
            ) from None
    return found


def checkpoint_metadata(config, modules: dict, float_tensors: dict) -> dict[str, str]:
    """The safetensors metadata hf_quant writes into every shard: layout version, the weight-reading config fields,
    each packed module's record (name -> shape, scheme, kind, SHA-256 of its tensors) and the dtype and SHA-256 of
    every other tensor of the model (`float_tensors`: state-dict name -> tensor)."""
    from ..config import FORMAT_VERSION

    fields = config.to_dict()
    records = {}
    for name, m in modules.items():
        records[name] = {"shape": list(m.quantized_shape), "scheme": m.scheme.to_dict(), "kind": type(m).__name__}
        tensors = m.packed_tensors()
        if not any(t.device.type == "meta" for t in tensors.values()):  # (offloaded tensors are not at hand)
            records[name]["sha256"] = tensor_digest(tensors)
    digests = {name: [str(t.dtype), tensor_digest({"": t})] for name, t in float_tensors.items()
               if t.device.type != "meta"}
    config_record = {f: fields[f] for f in WEIGHT_FIELDS}
    # config.json (written after this, by transformers) carries the digest of these records: the link that makes a
    # config.json beside other weights (stale files, an interrupted save) an error even when the settings agree.
    config.weights_digest = records_digest(*_canonical([config_record, records, digests]))
    return {
        METADATA_VERSION_KEY: str(FORMAT_VERSION),
        METADATA_CONFIG_KEY: json.dumps(config_record, sort_keys=True),
        METADATA_MODULES_KEY: json.dumps(records),
        METADATA_TENSORS_KEY: json.dumps(digests),
    }


def records_digest(config_record, module_records, tensor_records) -> str:
    """SHA-256 of the records a checkpoint's weights carry (as parsed from, or written to, their metadata)."""
    text = json.dumps([config_record, module_records, tensor_records], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a module's stored tensors (names, dtypes, shapes and bytes): safetensors has no checksum, and a
    flipped code byte is a valid value no range check can catch."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_records(checkpoint_files: list[str]) -> tuple[dict | None, dict | None, dict | None]:
    """(weight-reading config fields, module records, float tensor digests) from the shards' metadata, each None
    where the checkpoint predates it. Every shard must carry the same records: shards of different saves do not
    belong together."""
    seen: dict[str, tuple[str, str | None]] = {}
    for path in checkpoint_files:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        for key in (METADATA_CONFIG_KEY, METADATA_MODULES_KEY, METADATA_TENSORS_KEY):
            value = meta.get(key)
            if key in seen and seen[key][1] != value:
                raise CheckpointError(
                    f"{os.path.basename(path)} and {os.path.basename(seen[key][0])} carry different {key!r} records: "
                    f"they were written by different saves (an interrupted save, or stale shards beside new ones). "
                    f"Remove the stale files or {_RESAVE}"
                )
            seen.setdefault(key, (path, value))
    records = []
    for key in (METADATA_CONFIG_KEY, METADATA_MODULES_KEY, METADATA_TENSORS_KEY):
        text = seen.get(key, (None, None))[1]
        if text is None:
            records.append(None)
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"safetensors metadata {key!r} is not valid JSON ({e}): {_RESAVE}") from None
        if not isinstance(record, dict):
            raise CheckpointError(f"safetensors metadata {key!r} is not a JSON object: {_RESAVE}")
        records.append(record)
    return records[0], records[1], records[2]


def _check_config_record(config, recorded: dict, files: list[str]) -> None:
    """config.json's weight-reading fields must be the ones the weights were written with."""
    fields = config.to_dict()
    differ = [f for f in WEIGHT_FIELDS if f in recorded and _canonical(fields[f]) != _canonical(recorded[f])]
    if differ:
        listed = "; ".join(f"{f}: config.json {fields[f]!r}, weights {recorded[f]!r}" for f in differ)
        raise CheckpointError(
            f"config.json's quantization_config does not describe the weights in {files} ({listed}). config.json "
            "was edited, or written by another save than the weights (an interrupted save_pretrained). Restore the "
            f"quantization_config the weights were saved with, or {_RESAVE}"
        )


def _canonical(value):
    return json.loads(json.dumps(value, sort_keys=True))


def _check_module_record(name: str, module, recorded: dict | None, files: list[str]) -> None:
    """A packed module built from config.json must be the one the weights record (scheme, shape, kind)."""
    expected = {"shape": list(module.quantized_shape), "scheme": module.scheme.to_dict(), "kind": type(module).__name__}
    if isinstance(recorded, dict):
        recorded = {k: v for k, v in recorded.items() if k != "sha256"}  # checked once the tensors are loaded
    if recorded is None:
        raise CheckpointError(
            f"config.json makes {name!r} a packed {expected['kind']} ({module.scheme.describe()}), but the weights in "
            f"{files} record no such module: config.json does not belong to these weights. Restore its "
            f"quantization_config or {_RESAVE}"
        )
    if not isinstance(recorded, dict) or _canonical(recorded) != _canonical(expected):
        raise CheckpointError(
            f"module {name!r}: config.json gives {expected}, but the weights in {files} were written as {recorded}. "
            f"config.json was edited or belongs to another save: restore the quantization_config the weights were "
            f"saved with, or {_RESAVE}"
        )


def _key_candidates(key: str, prefix: str) -> list[str]:
    """The names `key` (a model state-dict key) may have in a checkpoint: with and without the base model prefix."""
    candidates = [key]
    if prefix and key.startswith(prefix + "."):
        candidates.append(key[len(prefix) + 1 :])
    elif prefix:
        candidates.append(f"{prefix}.{key}")
    return candidates


def check_checkpoint_files(model: torch.nn.Module, checkpoint_files: list[str], config=None) -> dict:
    """Header-level checks (module doc); returns the weights' records {"modules": ..., "float_tensors": ...} (None
    for checkpoints that predate them), whose digests `check_model_packed_values` verifies once the tensors are
    loaded."""
    from ..formats import tensor_specs
    from ..nn import PackedWeight, QuantTiedHead

    found = read_headers(list(checkpoint_files))
    files = [os.path.basename(p) for p in checkpoint_files]
    config_record, module_records, tensor_records = read_records(list(checkpoint_files))
    prefix = getattr(model, "base_model_prefix", "")
    packed_names = set()
    recorded_names = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, QuantTiedHead):  # no tensor of its own: a float weight for it would be dropped
            for c in _key_candidates(f"{mod_name}.weight", prefix):
                if c in found:
                    raise CheckpointError(
                        f"{os.path.basename(found[c][0])}: holds a float tensor {c!r}, but {mod_name!r} is tied to the "
                        f"packed embedding {module.tied_to!r} (tie_word_embeddings with quantize_embeddings): one of "
                        f"them would be ignored. The files were mixed or config.json was edited: {_RESAVE}"
                    )
        if not isinstance(module, PackedWeight):
            continue
        packed_names.update(_key_candidates(mod_name, prefix))
        if module_records is not None:
            key = next((c for c in _key_candidates(mod_name, prefix) if c in module_records), None)
            _check_module_record(mod_name, module, None if key is None else module_records[key], files)
            recorded_names.add(key)
        specs = tensor_specs(module.scheme, module.quantized_shape)
        for key in found:  # a tensor of this module the config does not expect (e.g. `zeros` of a symmetric scheme)
            for c in _key_candidates(mod_name, prefix):
                tname = key[len(c) + 1:] if key.startswith(c + ".") else None
                if tname and "." not in tname and tname not in specs and tname != "bias":
                    raise CheckpointError(
                        f"{os.path.basename(found[key][0])}: tensor {key!r} is not part of {mod_name!r} as its "
                        f"quantization_config ({module.scheme.describe()}) stores it (expected {sorted(specs)}); "
                        "config.json does not belong to these weights: restore its quantization_config or "
                        f"{_RESAVE}"
                    )
        for tname, (shape, dtype) in specs.items():
            key = f"{mod_name}.{tname}"
            hit = next((found[c] for c in _key_candidates(key, prefix) if c in found), None)
            if hit is None:
                raise CheckpointError(
                    f"checkpoint is missing tensor {key!r} that its quantization_config implies "
                    f"({module.scheme}); files: {files}. The checkpoint is incomplete or its config.json does not "
                    "belong to it: save it again with save_pretrained"
                )
            path, fdtype, fshape = hit
            if fdtype != dtype or fshape != tuple(shape):
                raise CheckpointError(
                    f"{os.path.basename(path)}: tensor {key!r} is {fdtype} {list(fshape)}, but its "
                    f"quantization_config ({module.scheme}) requires {dtype} {list(shape)}; the file was modified "
                    "or saved with other settings"
                )
        float_weight = next((f"{c}.weight" for c in _key_candidates(mod_name, prefix) if f"{c}.weight" in found), None)
        if float_weight is not None:
            raise CheckpointError(
                f"{os.path.basename(found[float_weight][0])}: holds a float tensor {float_weight!r} besides the packed "
                f"tensors of {mod_name!r}; one of them would be ignored. The files were mixed: {_RESAVE}"
            )
    # A packed tensor for a module the config keeps in float would be dropped and the float weight left
    # uninitialised: the config (modules_to_not_convert / overrides) does not describe this checkpoint.
    for key, (path, _, _) in found.items():
        if key.endswith(".qweight") and key[: -len(".qweight")] not in packed_names:
            raise CheckpointError(
                f"{os.path.basename(path)}: tensor {key!r} is a packed weight, but the quantization_config keeps "
                f"module {key[: -len('.qweight')]!r} in float (modules_to_not_convert / overrides / "
                "quantize_experts). The config.json does not belong to this checkpoint: restore its "
                "quantization_config or save the checkpoint again"
            )
    if module_records is not None:
        unclaimed = sorted(set(module_records) - recorded_names)
        if unclaimed:
            raise CheckpointError(
                f"the weights in {files} hold packed module(s) {unclaimed[:5]} that config.json keeps in float "
                "(modules_to_not_convert / overrides / quantize_experts): config.json does not belong to these "
                f"weights. Restore its quantization_config or {_RESAVE}"
            )
    # Last: the config fields the weights were written with (the checks above name a module where one differs).
    if config_record is not None and config is not None:
        _check_config_record(config, config_record, files)
    expected = getattr(config, "weights_digest", None)
    if expected is not None:
        found_digest = None if module_records is None else records_digest(config_record, module_records, tensor_records)
        if found_digest != expected:
            others = sorted({p.name for p in _siblings(checkpoint_files)} - set(files))
            raise CheckpointError(
                f"config.json was saved with other weights than those in {files} (its weights_digest {expected[:12]}... "
                f"does not match the weights' records{'' if found_digest is None else f' {found_digest[:12]}...'}): "
                "stale weight files of an earlier save, or a config.json of another save (an interrupted "
                f"save_pretrained). Weight files in the folder: {sorted(set(files) | set(others))}. Remove the stale "
                f"files (save with hf_quant.save_pretrained_atomic to avoid them) or {_RESAVE}"
            )
    return {"modules": module_records, "float_tensors": tensor_records}


def _siblings(checkpoint_files: list[str]):
    from pathlib import Path

    folders = {Path(p).parent for p in checkpoint_files}
    return [p for folder in folders for p in folder.glob("*.safetensors")]


def check_packed_values(module: torch.nn.Module, name: str = "", digest: str | None = None) -> None:
    """Raise CheckpointError naming the tensor when a loaded packed module holds a value its format or an additive
    term declares invalid (`Format.value_checks`: e.g. a scale that is not finite and positive, a zero-point or
    codebook entry that is not finite, a ternary byte >= 243). hf_quant never writes such values, so they mean a
    damaged or modified file. Costs one pass over the checked tensors (scales and zero-points are about
    1/group_size of the weight's size). Tensors still on the meta device (offloaded) are not read."""
    from ..formats import value_checks

    tensors = module.packed_tensors()
    if any(t.device.type == "meta" for t in tensors.values()):
        return
    prefix = f"{name}." if name else ""
    if digest is not None and tensor_digest(tensors) != digest:
        raise CheckpointError(
            f"the stored tensors of {name!r} ({sorted(tensors)}) are not the bytes saved with them (SHA-256 recorded in "
            f"the safetensors metadata): the file was corrupted or modified. {_RESAVE[0].upper()}{_RESAVE[1:]}"
        )
    for tensor_name, values, ok, what in value_checks(module.scheme, tensors, module.quantized_shape):
        _require(prefix + tensor_name, values, ok, what)


def _require(key: str, values: torch.Tensor, ok: torch.Tensor, what: str) -> None:
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()
    index = tuple(bad[0].tolist())
    raise CheckpointError(
        f"tensor {key!r} has {bad.shape[0]} invalid value(s), e.g. {values[index].item()!r} at index "
        f"{list(index)}; values must be {what}. The checkpoint is corrupted or was modified: {_RESAVE}"
    )


def check_model_packed_values(model: torch.nn.Module, records: dict | None = None) -> None:
    """`check_packed_values` for every packed module of `model` (keys as in the model's state dict), and the digests
    of `records` (from `check_checkpoint_files`) where the save recorded them: every packed module's tensors, and
    every float tensor loaded in the dtype it was saved in (a float tensor cast to another dtype at load, or
    offloaded, cannot be compared and is skipped)."""
    from ..nn import PackedWeight

    prefix = getattr(model, "base_model_prefix", "")
    modules = (records or {}).get("modules") or {}
    for name, module in model.named_modules():
        if isinstance(module, PackedWeight):
            record = next((modules[c] for c in _key_candidates(name, prefix) if c in modules), None)
            check_packed_values(module, name, record.get("sha256") if isinstance(record, dict) else None)
    floats = (records or {}).get("float_tensors") or {}
    if not floats:
        return
    for key, t in model.state_dict().items():
        record = next((floats[c] for c in _key_candidates(key, prefix) if c in floats), None)
        if not isinstance(record, list) or len(record) != 2 or t.device.type == "meta" or str(t.dtype) != record[0]:
            continue
        if tensor_digest({"": t}) != record[1]:
            raise CheckpointError(
                f"tensor {key!r} is not the bytes saved with it (SHA-256 recorded in the safetensors metadata): the "
                f"file was corrupted or modified. {_RESAVE[0].upper()}{_RESAVE[1:]}"
            )


def save_pretrained_atomic(model: torch.nn.Module, directory, also=(), **kwargs) -> None:
    """`model.save_pretrained(directory, **kwargs)` that either completes or leaves `directory` as it was (with
    `also`: objects saved beside it in the same swap, e.g. the tokenizer).

    transformers writes config.json before the weights and removes stale files as it goes, so a save that fails or
    is killed half way leaves a folder whose parts do not belong together (hf_quant's loader then refuses it, naming
    the mismatch). This writes into a temporary sibling folder and swaps it in with two renames; an earlier
    checkpoint in `directory` is replaced whole (no stale shard survives). A failure before the swap removes the
    temporary folder and leaves `directory` untouched; a process killed between the two renames leaves the earlier
    checkpoint in the sibling `.<name>.old-*` folder."""
    import shutil
    import uuid
    from pathlib import Path

    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_pretrained: {target} exists and is not a folder")
    tag = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    old = target.parent / f".{target.name}.old-{tag}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if kwargs.get("push_to_hub"):
        kwargs.setdefault("repo_id", target.name)  # transformers would name the repo after the temporary folder
    save = getattr(type(model), "save_pretrained")  # the class's own method, not an instance's atomic wrapper
    try:
        save(model, tmp, **kwargs)
        for other in also:
            other.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not tmp.exists():  # nothing written (e.g. not the main process of a distributed save)
        return
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
