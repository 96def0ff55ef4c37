"""True storage accounting: bytes and bits per weight counting every stored tensor, per module and for the whole
model or checkpoint.

Nothing is computed from a format's nominal bit width: every tensor the model would save (its state dict, with
tensor subclasses such as torchao's flattened into their inner tensors) is counted at its real size. A quantized
module owns every tensor under its name except its bias (codes, scales, zero-points, second-level scale metadata,
and whatever else a format declares: codebooks, outliers, low-rank factors), so a new format needs no change here.
The same code measures other libraries' quantized modules (see ``benchmarks/peers.py``): pass
``quantized={name: QuantizedModule(...)}`` for the modules they replaced.

Whole-model bits per weight = every stored bit / every logical weight of the float model (a float32 model is 32).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..formats import QuantScheme, tensor_specs

__all__ = [
    "ModuleStorage",
    "ParameterCount",
    "count_parameters",
    "mib",
    "natural_key",
    "size_line",
    "QuantizedModule",
    "StorageReport",
    "checkpoint_storage",
    "model_storage",
    "scheme_label",
    "stored_tensors",
]


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int  # every parameter, packed weights counted as the weights they stand for
    quantized: int  # of `total`, the weights stored packed (buffers, not parameters)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: "
                f"{100 * self.trainable / max(self.total, 1):.4f} ({self.quantized:,} of all params are quantized "
                "weights, stored packed)")


def count_parameters(model: nn.Module) -> ParameterCount:
    """The model's true parameter count: hf_quant's packed weights are buffers, so PEFT's
    `print_trainable_parameters()` (and `sum(p.numel() for p in model.parameters())`) leave them out (30M of
    SmolLM2-135M's 135M at 4 bits). Here every packed module counts as the weights it stands for."""
    from ..nn import PackedWeight

    params = list(model.parameters())  # (shared parameters, e.g. tied embeddings, once)
    quantized = sum(_numel(m.quantized_shape) for m in model.modules() if isinstance(m, PackedWeight))
    return ParameterCount(trainable=sum(p.numel() for p in params if p.requires_grad),
                          total=sum(p.numel() for p in params) + quantized, quantized=quantized)


def mib(n: int) -> str:
    """Bytes as MiB, the one format of every size hf-quant prints (quantize, inspect, eval, model cards)."""
    return f"{n / 2**20:.1f} MiB"


def size_line(bytes_before: int, bytes_after: int) -> str:
    """'X MiB -> Y MiB (Zx smaller)': how `hf-quant quantize`, `inspect` and `eval` print a model's size, always
    from a `StorageReport` (`bytes_before`, `total_bytes`: every stored tensor, not file sizes), so they agree."""
    ratio = f" ({bytes_before / bytes_after:.2f}x smaller)" if bytes_after and bytes_before else ""
    return f"{mib(bytes_before)} -> {mib(bytes_after)}{ratio}"


def natural_key(name: str) -> tuple:
    """Sort key ordering module names by their numbers: layers.2 before layers.10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def scheme_label(scheme: QuantScheme | Mapping) -> str:
    """Short name of a stored format, e.g. 'int4 g128', 'int8-sym ch', 'nf4 g64 dq' (`QuantScheme.describe`)."""
    return (scheme if isinstance(scheme, QuantScheme) else QuantScheme(**scheme)).describe()


@dataclass(frozen=True)
class QuantizedModule:
    """What storage accounting must know about a quantized module beyond its tensors."""

    format: str  # a label, e.g. "int4 g128" or "bnb nf4 b64"
    shape: tuple[int, ...]  # logical weight shape [*lead, out, in]
    kind: str = ""  # class name


@dataclass
class ModuleStorage:
    name: str
    kind: str
    format: str
    shape: list[int]  # logical [*lead, out, in]
    weights: int  # logical weight count
    tensors: dict[str, int]  # stored bytes of every tensor of this module (bias excluded: it stays float)

    @property
    def stored_bytes(self) -> int:
        return sum(self.tensors.values())

    @property
    def stored_bits(self) -> int:
        return 8 * self.stored_bytes

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / self.weights

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "bits_per_weight": self.bits_per_weight,
            "kind": self.kind,
            "shape": self.shape,
            "weights": self.weights,
            "bytes": self.stored_bytes,
            "tensors": dict(self.tensors),
        }


@dataclass
class StorageReport:
    modules: list[ModuleStorage] = field(default_factory=list)
    float_bytes: int = 0  # tensors kept in float (embeddings, norms, lm_head, biases, ...)
    float_weights: int = 0  # their element count
    float_itemsize: int = 4  # bytes per weight of the float model the quantized one came from

    @property
    def quantized_weights(self) -> int:
        return sum(m.weights for m in self.modules)

    @property
    def quantized_bits(self) -> int:
        return sum(m.stored_bits for m in self.modules)

    @property
    def bits_per_weight(self) -> float:
        """Average over the quantized modules' weights only (every tensor they store)."""
        return self.quantized_bits / max(self.quantized_weights, 1)

    @property
    def total_weights(self) -> int:
        return self.quantized_weights + self.float_weights

    @property
    def total_bytes(self) -> int:
        """Every stored byte (quantized modules and float tensors)."""
        return sum(m.stored_bytes for m in self.modules) + self.float_bytes

    @property
    def model_bits_per_weight(self) -> float:
        """Every stored bit of the model over every logical weight."""
        return 8 * self.total_bytes / max(self.total_weights, 1)

    @property
    def bytes_before(self) -> int:
        """The same model all in float: quantized weights at the float item size, float tensors as they are."""
        return self.quantized_weights * self.float_itemsize + self.float_bytes

    def to_dict(self) -> dict:
        """The ``storage`` record of ``hf_quant.eval.report`` (model-card schema)."""
        return {
            "bits_per_weight": self.model_bits_per_weight,
            "quantized_bits_per_weight": self.bits_per_weight,
            "bytes_before": self.bytes_before,
            "bytes_after": self.total_bytes,
            "modules": {m.name: m.to_dict() for m in self.modules},
        }


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def stored_tensors(tensor: torch.Tensor, name: str = "") -> dict[str, torch.Tensor]:
    """The plain tensors actually stored for `tensor`: itself, or the inner tensors of a tensor subclass
    (``__tensor_flatten__``, as torchao and torch.compile use), recursively, keyed ``name.inner``."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return {name: tensor}
    inner_names, _ = tensor.__tensor_flatten__()
    out: dict[str, torch.Tensor] = {}
    for inner in inner_names:
        out.update(stored_tensors(getattr(tensor, inner), f"{name}.{inner}" if name else inner))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _owner(key: str, module_names: list[str]) -> str | None:
    """The quantized module a state-dict key belongs to (its bias excluded), or None for a float tensor."""
    for name in module_names:  # longest first
        if key.startswith(name + ".") and key[len(name) + 1 :] != "bias":
            return name
    return None


def _assign(
    sizes: Mapping[str, tuple[int, int]], quantized: Mapping[str, QuantizedModule], float_itemsize: int
) -> StorageReport:
    """Split stored tensors {key: (bytes, element count)} into quantized modules and float tensors."""
    names = sorted(quantized, key=len, reverse=True)
    per_module: dict[str, dict[str, int]] = {n: {} for n in quantized}
    report = StorageReport(float_itemsize=float_itemsize)
    for key, (nbytes, numel) in sizes.items():
        owner = _owner(key, names)
        if owner is None:
            report.float_bytes += nbytes
            report.float_weights += numel
        else:
            per_module[owner][key[len(owner) + 1 :]] = nbytes
    for name in sorted(quantized, key=natural_key):
        q = quantized[name]
        if not per_module[name]:
            raise ValueError(f"quantized module {name!r} stores no tensors; is the module name right?")
        report.modules.append(
            ModuleStorage(name, q.kind, q.format, [int(d) for d in q.shape], _numel(q.shape), per_module[name])
        )
    return report


def _ours(model: nn.Module) -> dict[str, QuantizedModule]:
    from ..nn import PackedWeight

    return {
        name: QuantizedModule(scheme_label(m.scheme), tuple(m.quantized_shape), type(m).__name__)
        for name, m in model.named_modules()
        if isinstance(m, PackedWeight)
    }


def model_storage(
    model: nn.Module,
    quantized: Mapping[str, QuantizedModule] | None = None,
    float_dtype: torch.dtype | None = None,
) -> StorageReport:
    """Storage of a loaded model, from its state dict (what ``save_pretrained`` would write; tied tensors once).

    quantized: the quantized modules by name (default: hf_quant's ``PackedWeight`` modules).
    float_dtype: dtype of the float model, for ``bytes_before`` (default: the model's ``dtype``, else float32).
    """
    if quantized is None:
        quantized = _ours(model)
    sizes: dict[str, tuple[int, int]] = {}
    seen = set()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        for inner_key, t in stored_tensors(value, key).items():
            # Tied tensors (e.g. embeddings and lm_head) share storage: count them once.
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
            if ident is not None and ident in seen:
                continue
            seen.add(ident)
            sizes[inner_key] = (_nbytes(t), t.numel())
    if float_dtype is None:
        float_dtype = getattr(model, "dtype", None)
    if not isinstance(float_dtype, torch.dtype) or not float_dtype.is_floating_point:
        float_dtype = torch.float32
    return _assign(sizes, quantized, torch.empty(0, dtype=float_dtype).element_size())


def checkpoint_storage(folder: str | os.PathLike) -> StorageReport:
    """Storage of a saved hf_quant checkpoint, from its safetensors headers only (no model is built).

    The headers are untrusted: every module record (`hf_quant_modules`) must be well formed, and the tensors it
    implies (`tensor_specs`) must be exactly those in the files, so every figure reported is read from real tensors."""
    from ..model.checkpoint import METADATA_MODULES_KEY, SAFETENSORS_DTYPES

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors files; is it a checkpoint saved by save_pretrained?")
    records: dict[str, tuple[Path, dict]] = {}
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if METADATA_MODULES_KEY in meta:
                    records.update((name, (path, info)) for name, info in _module_records(path, meta).items())
                for key in f.keys():
                    sl = f.get_slice(key)
                    if sl.get_dtype() not in SAFETENSORS_DTYPES:
                        raise ValueError(f"{path}: tensor {key!r} has dtype {sl.get_dtype()!r}, which hf_quant does "
                                         f"not read; {_RESAVE}")
                    tensors[key] = (tuple(sl.get_shape()), SAFETENSORS_DTYPES[sl.get_dtype()])
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}); {_RESAVE}") from None
    if not records:
        raise ValueError(f"{folder}: the safetensors metadata has no {METADATA_MODULES_KEY!r}; not an hf_quant checkpoint")
    quantized, expected = {}, {}
    for name, (path, info) in records.items():
        scheme = QuantScheme(**info["scheme"])
        expected[name] = tensor_specs(scheme, tuple(info["shape"]))
        for t, (shape, dtype) in expected[name].items():
            found = tensors.get(f"{name}.{t}")
            if found is None:
                raise ValueError(f"{folder}: module {name!r} lacks stored tensor {t!r}; the checkpoint is incomplete: "
                                 f"{_RESAVE}")
            if found != (tuple(shape), dtype):
                raise ValueError(f"{path}: module {name!r} records shape {info['shape']}, so its tensor {t!r} must be "
                                 f"{dtype} {list(shape)}, but the file holds {found[1]} {list(found[0])}; the header "
                                 f"or metadata was modified: {_RESAVE}")
        quantized[name] = QuantizedModule(scheme_label(scheme), tuple(info["shape"]), info["kind"])
    report = _assign({k: (_numel(s) * torch.empty(0, dtype=d).element_size(), _numel(s)) for k, (s, d) in
                      tensors.items()}, quantized, _float_itemsize(folder))
    for m in report.modules:
        extra = sorted(set(m.tensors) - set(expected[m.name]))
        if extra:
            raise ValueError(f"{records[m.name][0]}: module {m.name!r} stores tensor(s) {extra} that its scheme does "
                             f"not write; the file was modified: {_RESAVE}")
    return report


_RESAVE = "download or save the checkpoint again"
_MAX_DIM = 2**31


def _module_records(path: Path, meta: Mapping[str, str]) -> dict[str, dict]:
    """The `hf_quant_modules` metadata of one file, checked: {module: {"shape": [positive ints], "scheme": the fields
    of a QuantScheme, "kind": a class name}} (extra keys, e.g. a digest, are left to the loader)."""
    from ..model.checkpoint import METADATA_MODULES_KEY

    where = f"{path}: safetensors metadata {METADATA_MODULES_KEY!r}"
    try:
        records = json.loads(meta[METADATA_MODULES_KEY])
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON ({e}); {_RESAVE}") from None
    if not isinstance(records, dict):
        raise ValueError(f"{where} must be a JSON object {{module: record}}, got {type(records).__name__}; {_RESAVE}")
    for name, info in records.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and len(shape) in (2, 3)
                and all(type(d) is int and 0 < d <= _MAX_DIM for d in shape)):
            raise ValueError(f"{where}: module {name!r} needs a 'shape' of 2 or 3 ints in [1, 2**31] ([out, in] or "
                             f"[experts, out, in]), got {info!r:.200}; {_RESAVE}")
        if not isinstance(info.get("kind"), str) or not info["kind"].isidentifier():
            raise ValueError(f"{where}: module {name!r} needs a 'kind' (a class name), got {info.get('kind')!r:.100}; "
                             f"{_RESAVE}")
        try:
            if not isinstance(info.get("scheme"), dict):
                raise ValueError(f"expected a dict, got {info.get('scheme')!r:.100}")
            QuantScheme(**info["scheme"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: module {name!r} has an invalid 'scheme' ({e}); {_RESAVE}") from None
    return records


def _float_itemsize(folder: Path) -> int:
    """Item size of the float model a checkpoint was quantized from (its config's dtype; float32 if unknown)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 4
    name = (config.get("dtype") or config.get("torch_dtype") or "float32") if isinstance(config, dict) else "float32"
    dtype = getattr(torch, str(name), torch.float32)
    return torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4
