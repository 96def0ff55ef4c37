"""Checks a pre-quantized checkpoint before any tensor is read: every packed tensor the model expects is present
with the right dtype and shape, the files are readable safetensors, and the layout version is one we read."""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open

from ..config import SUPPORTED_FORMAT_VERSIONS

METADATA_VERSION_KEY = "hf_quant_format_version"
_ST_DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A pre-quantized checkpoint does not match what its config describes."""


def read_headers(checkpoint_files: list[str]) -> dict[str, tuple[str, torch.dtype | str, tuple[int, ...]]]:
    """key -> (file, dtype, shape) for every tensor, reading headers only."""
    found = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise CheckpointError(
                f"{path}: hf_quant checkpoints are read from safetensors only (pickled .bin files are never loaded)"
            )
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                version = meta.get(METADATA_VERSION_KEY)
                if version is not None and int(version) not in SUPPORTED_FORMAT_VERSIONS:
                    raise CheckpointError(
                        f"{path}: written with hf_quant format version {version}; this hf_quant reads "
                        f"{list(SUPPORTED_FORMAT_VERSIONS)}. Upgrade hf_quant."
                    )
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[key] = (path, _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape()))
        except SafetensorError as e:
            size = os.path.getsize(path) if os.path.exists(path) else "missing"
            raise CheckpointError(
                f"{path} ({size} bytes) is not a readable safetensors file ({e}); it may be truncated or corrupted: "
                "download or save the checkpoint again"
            ) from None
    return found


def check_checkpoint_files(model: torch.nn.Module, checkpoint_files: list[str]) -> None:
    from ..formats import tensor_specs
    from ..nn import PackedWeight

    found = read_headers(list(checkpoint_files))
    prefix = getattr(model, "base_model_prefix", "")
    for mod_name, module in model.named_modules():
        if not isinstance(module, PackedWeight):
            continue
        for tname, (shape, dtype) in tensor_specs(module.scheme, module.quantized_shape).items():
            key = f"{mod_name}.{tname}"
            candidates = [key]
            if prefix and key.startswith(prefix + "."):
                candidates.append(key[len(prefix) + 1 :])
            elif prefix:
                candidates.append(f"{prefix}.{key}")
            hit = next((found[c] for c in candidates if c in found), None)
            if hit is None:
                raise CheckpointError(
                    f"checkpoint is missing tensor {key!r} that its quantization_config implies "
                    f"({module.scheme}); files: {[os.path.basename(p) for p in checkpoint_files]}. The checkpoint "
                    "is incomplete or its config.json does not belong to it: save it again with save_pretrained"
                )
            path, fdtype, fshape = hit
            if fdtype != dtype or fshape != tuple(shape):
                raise CheckpointError(
                    f"{os.path.basename(path)}: tensor {key!r} is {fdtype} {list(fshape)}, but its "
                    f"quantization_config ({module.scheme}) requires {dtype} {list(shape)}; the file was modified "
                    "or saved with other settings"
                )
