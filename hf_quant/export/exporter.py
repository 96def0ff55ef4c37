"""`export`: an hf_quant checkpoint (or model) written in another library's checkpoint format.

The exporter walks the packed modules and asks each module's format for its tensors in the target's layout
(`Format.export_tensors`, given the target object of hf_quant/export/<target>.py); it never looks at a format's
name. What the formats do not own is refused here, naming the module: online input rotations
(`rotation="hadamard"`), additive terms stored beside the codes (sparse outliers, low-rank factors), GPT-2 Conv1D
modules, fused MoE experts, formats with no export mapping (ternary, VQ). All refusals of a model are collected and
raised together (`ExportRefusedModules`) before anything is written.

Everything else is copied as the model holds it: embeddings, norms, biases, float linears (listed as ignored),
config.json (with the target's `quantization_config` instead of hf_quant's), generation_config.json, and the
tokenizer and other non-weight files of the source folder. The output folder is written beside `out` and swapped
in whole, so a failed export leaves `out` as it was.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..formats.format import active_terms
from ..formats.scalar import ExportRefused
from ..nn import PackedWeight, QuantExpertWeight, QuantLinear
from .compressed_tensors import CompressedTensorsTarget
from .gguf import GGUFTarget
from .gptq import GPTQTarget

TARGETS = {"compressed-tensors": CompressedTensorsTarget, "gptq": GPTQTarget, "gguf": GGUFTarget}

# Files of a source folder that the export writes itself or that describe the hf_quant checkpoint only.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_COPIED = {"config.json", "generation_config.json", "model.safetensors.index.json",
               "pytorch_model.bin.index.json", "README.md", "quantize_config.json", ".gitattributes"}


def lines_by_fix(refusals, where, shown: int, collection: str) -> list[str]:
    """The body of a many-refusals message: refusals grouped by their `fix`, up to `shown` of each group listed as
    `where(r)`: reason (shared by export and import)."""
    by_fix: dict[str, list] = {}
    for r in refusals:
        by_fix.setdefault(r.fix, []).append(r)
    lines = []
    for fix, group in by_fix.items():
        lines.append(f"* {len(group)} refused; fix: {fix}")
        lines += [f"  - {where(r)}: {r.reason}" for r in group[:shown]]
        if len(group) > shown:
            lines.append(f"  - ... and {len(group) - shown} more ({collection}.refusals lists all)")
    return lines


class ExportRefusedModules(ExportRefused):
    """Every module of a model that the target cannot hold exactly (`refusals`: one `ExportRefused` each). The
    message groups them by fix, listing up to `SHOWN` modules of each group with their reasons."""

    SHOWN = 8

    def __init__(self, target: str, refusals: list[ExportRefused]):
        self.target, self.refusals = target, refusals
        lines = [f"cannot export {len(refusals)} module(s) exactly to {target}:"]
        lines += lines_by_fix(refusals, lambda r: r.module, self.SHOWN, "ExportRefusedModules")
        super().__init__("\n".join(lines), "see each group's fix above")

    def __str__(self) -> str:
        return self.reason


@dataclass
class ExportReport:
    """What `export` wrote."""

    target: str
    out: str
    modules: dict[str, dict] = field(default_factory=dict)  # packed module -> the target's scheme description
    added_error: dict[str, float] = field(default_factory=dict)  # requantized module -> relative weight error added
    ignored: list[str] = field(default_factory=list)  # linears kept in float
    files: list[str] = field(default_factory=list)
    # requantize: the whole model's perplexity with hf_quant's weights and with the re-fitted ones
    # ({"text", "tokens", "before", "after"}), or why it was not measured (`perplexity_note`)
    perplexity: dict | None = None
    perplexity_note: str | None = None

    def summary(self) -> str:
        lines = [f"exported {len(self.modules)} quantized modules to {self.target} in {self.out} "
                 f"({len(self.ignored)} float linears kept)"]
        if self.added_error:
            worst = max(self.added_error.items(), key=lambda kv: kv[1])
            mean = sum(self.added_error.values()) / len(self.added_error)
            lines.append(f"requantized {len(self.added_error)} modules; added relative weight error: worst "
                         f"{worst[1]:.3e} ({worst[0]}), mean {mean:.3e}")
            lines += [f"  {name}: {err:.3e}" for name, err in sorted(self.added_error.items())]
            if self.perplexity:
                p = self.perplexity
                lines.append(f"perplexity ({p['text']}, {p['tokens']} tokens): {p['before']:.4f} with hf_quant's "
                             f"weights -> {p['after']:.4f} with the exported ones "
                             f"({100 * (p['after'] / p['before'] - 1):+.2f}%)")
            elif self.perplexity_note:
                lines.append(f"perplexity change not measured: {self.perplexity_note}")
        else:
            lines.append("exact: every exported weight decodes to hf_quant's own dequantized weight")
        return "\n".join(lines)


def export(model_or_dir, to: str, out, requantize: bool = False, scale_dtype: torch.dtype | str | None = None,
           overwrite: bool = False, max_shard_size: int | str = "5GB", perplexity_text: str | None = "botchan",
           perplexity_tokens: int = 1024) -> ExportReport:
    """Write an hf_quant model in another checkpoint format.

    model_or_dir: a model holding hf_quant packed modules, an hf_quant checkpoint folder, or a Hub id already in the
        local cache.
    to: "compressed-tensors", "gptq" or "gguf".
    out: the output folder (created; an existing non-empty folder only with `overwrite=True`, replaced whole);
        for "gguf", a path ending in .gguf is the file itself, otherwise the file is `out`/model.gguf.
    requantize: re-fit what the target cannot hold exactly (fractional or out-of-range zero-points, scales not
        exact in the target's dtype) to codes it holds, per group the better of the nearest codes under the
        target's rounding of our scale/zero-point and the format's own search with integer zero-points on the
        decoded weight, and report the relative weight error added per module (`ExportReport.added_error`).
        Without it such modules are refused (`ExportRefusedModules`, each module named with the reason and the
        fix); structural gaps (formats, rotations, additive terms, group layouts, bit widths the target lacks) are
        refused either way. Re-fitting codes that already sit on another grid costs about a rounding step's error
        again (SmolLM2 int4 g64 mse: Botchan perplexity 32.98 -> 40.01; benchmarks/export_requantize.py):
        quantizing for the target in the first place (`HfQuantConfig(target=...)`) is better.
        When anything was re-fitted, the whole model's perplexity is measured with hf_quant's weights and with the
        re-fitted ones (`ExportReport.perplexity`, in `summary()`), on `perplexity_text`: "botchan" (default: the
        first `perplexity_tokens` tokens of Botchan, what `hf-quant eval` measures), the path of a UTF-8 text
        file, or None to skip. Needs a causal LM and its tokenizer in the source folder; otherwise
        `ExportReport.perplexity_note` says why it was not measured.
    scale_dtype: compressed-tensors only: torch.float16 (default, hf_quant's scale precision) or torch.float32.
    """
    if to not in TARGETS:
        raise ValueError(f"to must be one of {list(TARGETS)}, got {to!r}")
    if isinstance(scale_dtype, str):
        scale_dtype = getattr(torch, scale_dtype.removeprefix("torch."), None)
    if scale_dtype is not None and to != "compressed-tensors" and scale_dtype != torch.float16:
        raise ValueError(f"scale_dtype applies to compressed-tensors only ({to} stores float16 scales)")
    target = TARGETS[to](scale_dtype) if scale_dtype is not None else TARGETS[to]()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not an empty folder; pass overwrite=True to replace it")

    model, source_dir = _load(model_or_dir)
    packed = {name: m for name, m in model.named_modules() if isinstance(m, PackedWeight)}
    if not packed:
        raise ValueError(f"{type(model).__name__} holds no hf_quant packed module: nothing to export")

    report = ExportReport(target=target.name, out=str(out))
    exported, refusals = {}, []
    for name, module in packed.items():
        try:
            weight = _export_module(target, module, requantize)
        except ExportRefused as e:
            refusals.append(e.for_module(name))
            continue
        exported[name] = weight
        report.modules[name] = weight.scheme
        if weight.added_error is not None:
            report.added_error[name] = weight.added_error
    if refusals:
        raise ExportRefusedModules(target.name, refusals)
    if report.added_error and perplexity_text is not None:
        report.perplexity, report.perplexity_note = _perplexity_change(
            model, source_dir, {n: w.decoded for n, w in exported.items() if w.decoded is not None}, packed,
            perplexity_text, perplexity_tokens)
    report.ignored = sorted(name for name, m in model.named_modules() if _is_float_linear(m))
    try:
        quant_config, extra_files = target.quantization_config(model, report.modules, report.ignored)
    except ExportRefused as e:
        raise ExportRefusedModules(target.name, [e]) from None

    state = model.state_dict()
    for name, module in packed.items():
        for t in module.packed_names:
            state.pop(f"{name}.{t}", None)
    write_file = getattr(target, "write", None)
    if write_file is not None:
        # A single-file target (GGUF): it names and lays out every tensor itself.
        try:
            report.files = write_file(model, state, {f"{n}.weight": (packed[n], w) for n, w in exported.items()},
                                      report, source_dir, out)
        except ExportRefused as e:
            raise ExportRefusedModules(target.name, [e]) from None
        return report
    for name in packed:
        state.update({f"{name}.{t}": v.detach().cpu().contiguous() for t, v in exported[name].tensors.items()})
    report.files = _write(model, state, quant_config, extra_files, source_dir, out, max_shard_size)
    return report


def _export_module(target, module: PackedWeight, requantize: bool):
    scheme, shape = module.scheme, module.quantized_shape
    if isinstance(module, QuantExpertWeight):
        raise ExportRefused(f"fused MoE experts ({tuple(shape)}) are not exported yet",
                            "quantize with quantize_experts=False (experts kept in float) to export the rest")
    if getattr(module, "input_rotation", None) is not None:
        raise ExportRefused(f"the stored weight is W R with an online input rotation x -> x R (rotation='hadamard'); "
                            f"{target.name} loaders do not rotate inputs",
                            "quantize with rotation='residual' (folded into the float weights, nothing online) or "
                            "without rotation")
    if getattr(module, "source_is_conv1d", False):
        raise ExportRefused("GPT-2 Conv1D modules (weight stored [in, out]) are not exported yet",
                            "keep them in float (modules_to_not_convert) to export the rest")
    terms = active_terms(scheme)
    if terms:
        fields = ", ".join(f"{t.field}={getattr(scheme, t.field)}" for t in terms)
        raise ExportRefused(f"the weight has terms stored beside its codes ({fields}) that {target.name} has no "
                            "place for",
                            "quantize this module without them (" + ", ".join(f"{t.field}=0" for t in terms) + ")")
    export_tensors = getattr(scheme.codec, "export_tensors", None)
    if export_tensors is None:
        raise ExportRefused(f"format {scheme.label} has no export mapping (no exact counterpart in {target.name})",
                            "quantize these modules with format='int' (affine integer codes), or keep them in "
                            "float with modules_to_not_convert")
    tensors = {n: t.detach().cpu() for n, t in module.packed_tensors().items()}
    return export_tensors(target, scheme, tensors, tuple(shape), requantize=requantize)


def _is_float_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return (isinstance(module, nn.Linear) or isinstance(module, Conv1D)) and not isinstance(module, QuantLinear)


def _perplexity_change(model, source_dir, decoded: dict[str, torch.Tensor], packed: dict, text: str, tokens: int):
    """(perplexity record, None) or (None, why not): the model's perplexity as hf_quant holds it, then with each
    re-fitted module swapped for a float module holding the weight the target decodes to (swapped back after)."""
    from transformers import AutoTokenizer

    from ..eval import perplexity

    if not hasattr(model, "generation_config") or getattr(model.config, "is_encoder_decoder", False):
        return None, f"{type(model).__name__} is not a causal LM"
    if source_dir is None or not any((source_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None, (f"no tokenizer in the source folder ({source_dir}); export from a checkpoint folder saved with "
                      "its tokenizer")
    if text == "botchan":
        from ..assets import botchan_text

        body, name = botchan_text(), "Botchan"
    else:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"perplexity_text {text!r} is neither 'botchan' nor an existing text file")
        body, name = path.read_text(encoding="utf-8"), path.name
    for module_name in decoded:
        if not callable(getattr(packed[module_name], "to_float", None)):
            return None, f"{module_name} ({type(packed[module_name]).__name__}) has no float counterpart to swap in"
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    before = perplexity(model, tokenizer, body, max_tokens=tokens)
    swapped = {}
    try:
        for module_name, weight in decoded.items():
            module = packed[module_name]
            float_module = module.to_float(model.dtype)
            with torch.no_grad():
                float_module.weight.copy_(weight.to(float_module.weight.device, float_module.weight.dtype))
            swapped[module_name] = module
            model.set_submodule(module_name, float_module)
        after = perplexity(model, tokenizer, body, max_tokens=tokens)
    finally:
        for module_name, module in swapped.items():
            model.set_submodule(module_name, module)
    return {"text": name, "tokens": tokens, "before": before, "after": after}, None


def _load(model_or_dir):
    """(model, source folder or None)."""
    if isinstance(model_or_dir, nn.Module):
        path = getattr(model_or_dir, "name_or_path", None)
        return model_or_dir, (Path(path) if path and os.path.isdir(path) else None)
    path = str(model_or_dir)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - the message says what was looked for
            raise FileNotFoundError(f"{model_or_dir!r} is neither a folder nor a Hub id in the local cache ({e})") \
                from None
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is None:
        raise ValueError(f"{path} is not a quantized checkpoint (its config.json has no quantization_config)")
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype="auto")
    return model, Path(path)


def _write(model, state, quant_config, extra_files, source_dir, out: Path, max_shard_size) -> list[str]:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(state, model)
    state = revert_weight_conversion(model, state)
    tag = uuid.uuid4().hex[:8]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{tag}"
    old = out.parent / f".{out.name}.old-{tag}"
    try:
        tmp.mkdir()
        if source_dir is not None:
            for f in sorted(source_dir.iterdir()):
                if f.is_file() and f.name not in _NOT_COPIED and not f.name.startswith(".") \
                        and not f.name.endswith(_NOT_COPIED_SUFFIXES):
                    shutil.copy2(f, tmp / f.name)
        config = copy.deepcopy(model.config)
        for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
            if hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
        config.save_pretrained(tmp)
        config_path = tmp / "config.json"
        data = json.loads(config_path.read_text())
        data["quantization_config"] = quant_config
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        for name, content in extra_files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        for filename, names in split.filename_to_tensors.items():
            save_file({n: state[n].contiguous() for n in names}, str(tmp / filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return files
