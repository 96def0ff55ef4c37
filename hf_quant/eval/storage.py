"""True storage accounting: bits per weight counting every stored tensor (codes, scales, zero-points,
second-level scale metadata), per module and for the whole model or checkpoint."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..formats import QuantScheme, tensor_specs


@dataclass
class ModuleStorage:
    name: str
    kind: str
    shape: list[int]  # logical [*lead, out, in]
    scheme: dict
    weights: int  # logical weight count
    stored_bits: int  # every stored bit of this module's packed tensors

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / self.weights


@dataclass
class StorageReport:
    modules: list[ModuleStorage] = field(default_factory=list)
    float_bytes: int = 0  # tensors kept in float (embeddings, norms, lm_head, biases, ...)

    @property
    def quantized_weights(self) -> int:
        return sum(m.weights for m in self.modules)

    @property
    def quantized_bits(self) -> int:
        return sum(m.stored_bits for m in self.modules)

    @property
    def bits_per_weight(self) -> float:
        """Average over quantized weights only."""
        return self.quantized_bits / max(self.quantized_weights, 1)

    @property
    def total_bytes(self) -> int:
        return self.quantized_bits // 8 + self.float_bytes

    def to_dict(self) -> dict:
        return {
            "bits_per_weight": self.bits_per_weight,
            "quantized_weights": self.quantized_weights,
            "quantized_bytes": self.quantized_bits // 8,
            "float_bytes": self.float_bytes,
            "total_bytes": self.total_bytes,
            "modules": [asdict(m) | {"bits_per_weight": m.bits_per_weight} for m in self.modules],
        }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _module_storage(name: str, kind: str, shape: list[int], scheme: QuantScheme) -> ModuleStorage:
    bits = 0
    for shp, dtype in tensor_specs(scheme, tuple(shape)).values():
        bits += _numel(shp) * torch.empty(0, dtype=dtype).element_size() * 8
    return ModuleStorage(name, kind, list(shape), scheme.to_dict(), _numel(shape), bits)


def model_storage(model: torch.nn.Module) -> StorageReport:
    """Storage of a loaded model (tied tensors counted once)."""
    from ..nn import PackedWeight

    report = StorageReport()
    packed_ids = set()
    for name, m in model.named_modules():
        if isinstance(m, PackedWeight):
            report.modules.append(_module_storage(name, type(m).__name__, list(m.quantized_shape), m.scheme))
            packed_ids.update(id(getattr(m, n)) for n in m.packed_names)
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in packed_ids or id(t) in seen:
            continue
        seen.add(id(t))
        report.float_bytes += t.numel() * t.element_size()
    return report


def checkpoint_storage(folder: str | os.PathLike) -> StorageReport:
    """Storage of a saved hf_quant checkpoint, from its safetensors headers only (no model is built)."""
    from ..quantizer import METADATA_MODULES_KEY

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors files; is it a checkpoint saved by save_pretrained?")
    report = StorageReport()
    modules: dict[str, dict] = {}
    sizes: dict[str, int] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if METADATA_MODULES_KEY in meta:
                modules.update(json.loads(meta[METADATA_MODULES_KEY]))
            for key in f.keys():
                sl = f.get_slice(key)
                itemsize = torch.empty(0, dtype=_dtype(sl.get_dtype())).element_size()
                sizes[key] = _numel(sl.get_shape()) * itemsize
    if not modules:
        raise ValueError(f"{folder}: the safetensors metadata has no {METADATA_MODULES_KEY!r}; not an hf_quant checkpoint")
    packed_keys = set()
    for name, info in sorted(modules.items()):
        scheme = QuantScheme(**info["scheme"])
        report.modules.append(_module_storage(name, info["kind"], info["shape"], scheme))
        packed_keys.update(f"{name}.{t}" for t in tensor_specs(scheme, tuple(info["shape"])))
    report.float_bytes = sum(size for key, size in sizes.items() if key not in packed_keys)
    return report


def _dtype(st_dtype: str) -> torch.dtype:
    from ..integrations.checkpoint import SAFETENSORS_DTYPES

    return SAFETENSORS_DTYPES[st_dtype]
