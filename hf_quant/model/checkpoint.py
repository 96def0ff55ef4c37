"""Checks of a pre-quantized checkpoint.

Before any tensor is read (`check_checkpoint_files`, headers only): the files are readable safetensors (pickled
.bin files are refused, never opened), the layout version is one we read, every packed tensor the model expects is
present with the right dtype and shape, and no packed tensor belongs to a module the config keeps in float.
After the tensors are loaded (`check_packed_values`, cheap: scales and zero-points only, about 1/group_size of
the weights): every scale is finite and positive, every zero-point finite.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open

from ..config import SUPPORTED_FORMAT_VERSIONS

METADATA_VERSION_KEY = "hf_quant_format_version"
METADATA_MODULES_KEY = "hf_quant_modules"  # per-module shape, scheme and kind, for readers without the model
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


def _key_candidates(key: str, prefix: str) -> list[str]:
    """The names `key` (a model state-dict key) may have in a checkpoint: with and without the base model prefix."""
    candidates = [key]
    if prefix and key.startswith(prefix + "."):
        candidates.append(key[len(prefix) + 1 :])
    elif prefix:
        candidates.append(f"{prefix}.{key}")
    return candidates


def check_checkpoint_files(model: torch.nn.Module, checkpoint_files: list[str]) -> None:
    from ..formats import tensor_specs
    from ..nn import PackedWeight

    found = read_headers(list(checkpoint_files))
    files = [os.path.basename(p) for p in checkpoint_files]
    prefix = getattr(model, "base_model_prefix", "")
    packed_names = set()
    for mod_name, module in model.named_modules():
        if not isinstance(module, PackedWeight):
            continue
        packed_names.update(_key_candidates(mod_name, prefix))
        for tname, (shape, dtype) in tensor_specs(module.scheme, module.quantized_shape).items():
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


def check_packed_values(module: torch.nn.Module, name: str = "") -> None:
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
    for tensor_name, values, ok, what in value_checks(module.scheme, tensors):
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


def check_model_packed_values(model: torch.nn.Module) -> None:
    """`check_packed_values` for every packed module of `model` (keys as in the model's state dict)."""
    from ..nn import PackedWeight

    for name, module in model.named_modules():
        if isinstance(module, PackedWeight):
            check_packed_values(module, name)
