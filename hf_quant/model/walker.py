"""Finding the weights to quantize and the decoder blocks of a model (see the package doc)."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from ..formats import QuantScheme
from ..nn import QuantEmbedding, QuantLinear


def is_fused_experts(module: nn.Module) -> bool:
    """transformers v5 experts modules (decorated with `use_experts_implementation`) declare their layout."""
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate")


def expert_params(module: nn.Module) -> list[str]:
    """The 3-D [experts, out, in] (or transposed) parameters of a fused experts module."""
    return [name for name, p in module.named_parameters(recurse=False) if p.dim() == 3]


def is_float_linear(module: nn.Module) -> bool:
    """An nn.Linear (exactly: subclasses such as PEFT or bitsandbytes layers are someone else's) or GPT-2 Conv1D."""
    return type(module) is nn.Linear or isinstance(module, Conv1D)


@dataclass(frozen=True)
class Target:
    """One weight to quantize: a linear's `weight`, or a 3-D parameter of a fused experts module."""

    module_name: str
    scheme: QuantScheme
    shape: tuple[int, ...]  # logical [*lead, out, in]
    param: str = "weight"
    conv1d: bool = False  # a GPT-2 Conv1D, whose parameter is stored [in, out]
    transposed: bool = False  # fused experts stored [experts, in, out]
    experts: bool = False

    @property
    def name(self) -> str:
        """The module (linears) or parameter (experts) name the config's overrides match."""
        return f"{self.module_name}.{self.param}" if self.experts else self.module_name


def modules_kept_float(model: nn.Module, config) -> list[str]:
    """Module names (or prefixes) kept in float: the config's `modules_to_not_convert` (None: transformers' default,
    the output embedding, tied weights and the last module, less the head unless `config.lm_head` keeps it float;
    `resolve_placement`) plus the model's `_keep_in_fp32_modules`."""
    skip = config.modules_to_not_convert
    if skip is None:
        skip = resolve_placement(model, config)[0]
    return list(skip) + list(getattr(model, "_keep_in_fp32_modules", None) or [])


@dataclass(frozen=True)
class EmbeddingTarget:
    """An nn.Embedding to quantize (`config.quantize_embeddings`), with the heads whose weight is tied to its table."""

    module_name: str
    scheme: QuantScheme
    shape: tuple[int, int]  # [num_embeddings, embedding_dim]
    tied_heads: tuple[str, ...] = ()  # nn.Linear modules whose weight is the table (lm_head): they share its tensors

    @property
    def name(self) -> str:
        return self.module_name


def embedding_names(model: nn.Module) -> list[str]:
    """Names of the model's float nn.Embedding modules (subclasses included)."""
    return [name for name, m in model.named_modules() if name and isinstance(m, nn.Embedding)]


def tied_heads(model: nn.Module, embedding_name: str) -> list[str]:
    """nn.Linear modules whose `weight` transformers ties to the embedding's (`all_tied_weights_keys`, either way)."""
    source = f"{embedding_name}.weight"
    found = []
    for a, b in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        other = b if a == source else a if b == source else None
        if other is None:
            continue
        name, _, pname = other.rpartition(".")
        if pname == "weight" and name and type(model.get_submodule(name)) is nn.Linear:
            found.append(name)
    return found


def find_embedding_targets(model: nn.Module, config, skip: list[str]) -> list[EmbeddingTarget]:
    """With `config.quantize_embeddings`: every nn.Embedding not in `skip` whose scheme is not None, checked
    quantizable (ValueError naming the module and the fix otherwise). Empty without it."""
    if not config.quantize_embeddings:
        return []
    out = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, nn.Embedding) or not should_convert_module(name, skip):
            continue
        scheme = config.scheme_for(name)
        if scheme is None:
            continue
        QuantEmbedding.check_supported(name, module, scheme)
        out.append(EmbeddingTarget(name, scheme, (module.num_embeddings, module.embedding_dim),
                                   tuple(tied_heads(model, name))))
    return out


def default_modules_to_not_convert(model: nn.Module, config) -> list[str]:
    """transformers' default modules kept in float (the output embedding, tied weights, the last module), less the
    embeddings when `config.quantize_embeddings` (tied ones are in transformers' list)."""
    skip = sorted(HfQuantizer.get_modules_to_not_convert(model, None, None))
    if config.quantize_embeddings:
        embeddings = set(embedding_names(model))
        skip = [s for s in skip if s not in embeddings]
    return skip


def output_head_name(model: nn.Module) -> str | None:
    """The module name of the model's output embedding (`get_output_embeddings()`), or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if name and m is head), None)


def resolve_placement(model: nn.Module, config) -> tuple[list[str], dict]:
    """For a fresh quantization (`config.modules_to_not_convert` None): the modules kept in float and the overrides
    the config then records, applying `config.lm_head` to the output head:

    "float": transformers' default list (`default_modules_to_not_convert`, which holds the head), overrides unchanged;
    "int8": the head leaves that list and gets the anchored override `^head$` -> `HEAD_INT8` (or the target's
    `head_int8`; the head stays float where the target cannot export its shape), appended after the user's
    overrides, unless one of those already matches the head (theirs wins);
    with `target_bits` it acts as "float" (the budget covers the linears the allocator chooses or the user fixes);
    "same": the head leaves that list and takes the config's scheme (the allocator's choice with `target_bits`); with
    a calibration method (gptq/awq), rounded data-free ({"method": "mse"}), as calibration covers the blocks only.

    A head tied to an embedding that `quantize_embeddings` quantizes shares its packed table: left as it was."""
    from ..formats.scheme import CALIBRATION_METHODS, HEAD_INT8
    from ..formats.targets import SERVING_TARGETS

    skip = default_modules_to_not_convert(model, config)
    overrides = dict(config.overrides)
    policy = config.lm_head
    if policy == "int8" and config.target_bits is not None:
        policy = "float"
    head = output_head_name(model)
    if policy == "float" or head is None or not is_float_linear(model.get_submodule(head)):
        return skip, overrides
    if config.quantize_embeddings and head in {h for t in find_embedding_targets(model, config, skip)
                                               for h in t.tied_heads}:
        return skip, overrides
    skip = [s for s in skip if s != head]
    if any(re.search(pattern, head) for pattern in overrides):
        return skip, overrides
    if policy == "int8":
        target = SERVING_TARGETS[config.target] if config.target is not None else None
        if target is not None and any(n % target.head_multiple for n in model.get_submodule(head).weight.shape):
            return default_modules_to_not_convert(model, config), overrides  # a shape the target cannot export
        overrides[f"^{re.escape(head)}$"] = dict(target.head_int8 if target is not None else HEAD_INT8)
    elif config.method in CALIBRATION_METHODS:
        overrides[f"^{re.escape(head)}$"] = {"method": "mse"}
    return skip, overrides


def find_targets(model: nn.Module, config, skip: list[str], experts: bool = True) -> list[Target]:
    """Every weight of `model` to quantize under `config`, in module order: linears and Conv1D not in `skip` whose
    scheme is not None (an override may keep them float), and (with `experts` and `config.quantize_experts`) the
    3-D parameters of fused experts modules."""
    out = []
    for name, module in model.named_modules():
        if not name or not should_convert_module(name, skip):
            continue
        if is_float_linear(module):
            scheme = config.scheme_for(name)
            if scheme is not None:
                conv1d = isinstance(module, Conv1D)
                shape = tuple(module.weight.shape)
                out.append(Target(name, scheme, shape[::-1] if conv1d else shape, conv1d=conv1d))
        elif experts and config.quantize_experts and is_fused_experts(module):
            transposed = bool(module.is_transposed)
            for pname in expert_params(module):
                scheme = config.scheme_for(f"{name}.{pname}")
                if scheme is not None:
                    e, a, b = getattr(module, pname).shape
                    out.append(Target(name, scheme, (e, b, a) if transposed else (e, a, b), param=pname,
                                      transposed=transposed, experts=True))
    return out


def check_patterns_match(model: nn.Module, config) -> None:
    """A typo must not quantize the model differently without a word: every `overrides` pattern and every
    `modules_to_not_convert` entry the user gave must match at least one module (or fused-expert parameter) name;
    otherwise ValueError naming the pattern and the nearest names. (Patterns are checked safe to match by the
    config.)"""
    names = []
    for name, module in model.named_modules():
        if name:
            names.append(name)
            if is_fused_experts(module):
                names += [f"{name}.{p}" for p in expert_params(module)]
    problems = []
    embeddings = set(embedding_names(model))
    for pattern, settings in config.overrides.items():
        hits = [n for n in names if re.search(pattern, n)]
        if not hits:
            problems.append(f"overrides[{pattern!r}]")
        elif settings is not None and not config.quantize_embeddings and all(
            n in embeddings or any(n.startswith(e + ".") for e in embeddings) for n in hits
        ):
            raise ValueError(f"overrides[{pattern!r}] only matches embeddings ({hits[:3]}), which stay float unless "
                             "quantize_embeddings=True: set quantize_embeddings=True, or remove the override")
    for entry in config.modules_to_not_convert or []:
        if all(should_convert_module(n, [entry]) for n in names):
            problems.append(f"modules_to_not_convert entry {entry!r}")
    if problems:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names})
        hints = []
        for what in problems:
            text = what.split("'")[1] if "'" in what else what
            near = difflib.get_close_matches(text, leaves, n=3, cutoff=0.5)
            hints.append(f"{what} matches no module of {type(model).__name__}"
                         + (f" (nearest names: {near})" if near else ""))
        raise ValueError("; ".join(hints) + f". Module names look like {names[min(5, len(names) - 1)]!r}: fix the "
                         "pattern, or remove it")


def check_target_shapes(model: nn.Module, config, skip: list[str]) -> None:
    """With `config.target`, every module to quantize must be exportable to it with its shape (its group size
    dividing its in_features; no GPT-2 Conv1D): otherwise ValueError listing the modules and the fix, before
    anything is quantized. (The schemes themselves were checked by the config.)"""
    if config.target is None:
        return
    from ..formats.targets import SERVING_TARGETS

    target = SERVING_TARGETS[config.target]
    problems = []
    for t in find_targets(model, config, skip):
        if t.conv1d:
            problems.append(f"{t.name}: a GPT-2 Conv1D (no exporter writes them yet)")
        elif (reason := target.check_shape(t.name, t.scheme, t.shape[-1])) is not None:
            problems.append(reason)
    for name, scheme in tied_linear_targets(model, config, skip).items():
        in_features = model.get_submodule(name).weight.shape[-1]
        if (reason := target.check_shape(name, scheme, in_features)) is not None:
            problems.append(reason)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} modules)" if len(problems) > 6 else "")
        raise ValueError(f"target={config.target!r}: {shown}. Fix: give these modules a group size that divides "
                         "their in_features (e.g. group_size=64, or overrides={regex: {'group_size': -1}}), or keep "
                         "them in float (modules_to_not_convert)")


def tied_linear_targets(model: nn.Module, config, skip: list[str]) -> dict[str, QuantScheme]:
    """Linear layers to quantize whose weight is tied to another parameter (lm_head tied to the input embedding):
    name -> scheme. The checkpoint stores only the tied source, so these cannot be quantized as they load. (A head
    tied to an embedding that is quantized is not one: it shares the embedding's packed table.)"""
    found = {}
    shared = {h for t in find_embedding_targets(model, config, skip) for h in t.tied_heads}
    for target in getattr(model, "all_tied_weights_keys", None) or {}:
        name, _, pname = target.rpartition(".")
        if pname != "weight" or not name or not should_convert_module(name, skip) or name in shared:
            continue
        module = model.get_submodule(name)
        if type(module) is nn.Linear and (scheme := config.scheme_for(name)) is not None:
            found[name] = scheme
    return found


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, module) of the model's transformer blocks: the ModuleList of `num_hidden_layers` blocks with linears."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n and any(
            isinstance(m, (nn.Linear, Conv1D, QuantLinear)) for m in module[0].modules()
        ):
            return name, module
    raise ValueError(f"calibration: found no list of {n} transformer blocks in {type(model).__name__}")
