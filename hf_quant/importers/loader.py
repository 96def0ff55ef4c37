"""`load_foreign`: a GPTQ, AWQ or compressed-tensors checkpoint folder as an hf_quant model.

The checkpoint is untrusted input: config files are parsed as JSON (size-limited), tensors are read from safetensors
only (`model.checkpoint.read_headers`: never a pickle), each packed tensor's dtype and shape is checked against the
model's config and the quantization settings before it is read, and its values (scales, zero-points, group indices)
before they are used. The packed tensors of each quantized linear are mapped to hf_quant's canonical layout
(formats/scalar.py) by the source's reader (gptq.py, awq.py, compressed_tensors.py) without going through float
weights; the model is then built by transformers with hf_quant's quantizer in its pre-quantized mode (the same path
as an hf_quant checkpoint: packed modules, value checks) from that state dict, and every float tensor of the
checkpoint (embeddings, norms, biases, float linears) loads as it is. A tensor the model does not expect, or a
model tensor the checkpoint lacks, is refused rather than left randomly initialised.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch

from ..config import HfQuantConfig
from ..formats import GROUP_SIZES, QuantParams, QuantScheme, get_format, pack, tensor_specs
from ..model import is_float_linear
from ..model.checkpoint import read_headers
from ..nn import QuantLinear
from .awq import AWQSource
from .common import Checkpoint, ImportRefused, ImportRefusedModules
from .compressed_tensors import CompressedTensorsSource
from .gptq import GPTQSource

SOURCES = {"gptq": GPTQSource, "awq": AWQSource, "compressed-tensors": CompressedTensorsSource}
_MAX_JSON_BYTES = 16 << 20  # config files are small; a huge one is not a config


def load_foreign(path, **from_pretrained_kwargs):
    """Load a GPTQ (v1/v2), AWQ (GEMM) or compressed-tensors (pack-quantized int) checkpoint folder as a model whose
    quantized linears are hf_quant `QuantLinear`s holding the checkpoint's own codes, scales and zero-points (never
    dequantized), so hf_quant's kernels, `dequantize()`, PEFT LoRA, eval and `hf_quant.export` work on it; its
    `config.quantization_config` is the equivalent `HfQuantConfig` (`save_pretrained` writes an hf_quant checkpoint).

    path: a checkpoint folder, or a Hub id already in the local cache.
    from_pretrained_kwargs: passed to transformers' `from_pretrained` (dtype, device_map, ...); not
        `quantization_config` or `config`, which the checkpoint decides.

    Raises `ImportRefused` (naming the file, module or tensor, the reason and the fix; `ImportRefusedModules` lists
    every refused module) for what hf_quant cannot hold exactly: see each source module's doc.
    """
    for key in ("quantization_config", "config", "state_dict"):
        if key in from_pretrained_kwargs:
            raise ValueError(f"load_foreign decides `{key}` from the checkpoint; do not pass it")
    want_info = from_pretrained_kwargs.pop("output_loading_info", False)
    folder = _resolve(path)
    config_path = folder / "config.json"
    config_dict = _read_json(config_path)
    qc, qc_file = _quantization_config(folder, config_dict)
    method = qc.get("quant_method")
    source_cls = SOURCES.get(method.lower().replace("_", "-") if isinstance(method, str) else None)
    if source_cls is None:
        raise ImportRefused(str(qc_file), f"quant_method {method!r}: hf_quant imports {list(SOURCES)} checkpoints",
                            "load it with its own library (transformers' from_pretrained)")
    source = source_cls(qc, str(qc_file))
    ckpt = Checkpoint(read_headers(_weight_files(folder)))

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
    cls = _model_class(config, folder)
    with torch.device("meta"):
        skeleton = cls._from_config(config)
    linears = {name: m for name, m in skeleton.named_modules() if name and is_float_linear(m)}

    weights, refusals = {}, []
    marker = "." + source.marker
    # modules the checkpoint stores quantized: the packed tensor, or any tensor only a quantized module has (e.g. a
    # compressed-tensors FP8 weight's scale: its scheme is then refused by name)
    suffixes = tuple(f".{t}" for t in (source.marker, *source.quantized_only))
    for name in sorted({k.rpartition(".")[0] for k in ckpt.keys() if k.endswith(suffixes)}):
        try:
            module = linears.get(name)
            if module is None:
                raise ImportRefused(name, f"quantized tensors ({name}.*) for a module that is not a linear layer of "
                                    f"{cls.__name__} built from config.json (checkpoints whose tensor names "
                                    "transformers renames when loading, e.g. per-expert MoE weights, are not imported "
                                    "yet)", "check that config.json belongs to these weights")
            if f"{name}.weight" in ckpt and f"{name}{marker}" in ckpt:
                raise ImportRefused(name, "the checkpoint stores both a float weight and packed tensors",
                                    "remove one of them; the checkpoint is inconsistent")
            w = module.weight
            out, in_features = (w.shape[1], w.shape[0]) if _is_conv1d(module) else tuple(w.shape)
            extra = {"module": module} if source_cls is CompressedTensorsSource else {}
            weights[name] = source.read(ckpt, name, out, in_features, GROUP_SIZES, **extra)
            own = {f"{name}.{t}" for t in source.tensors} | {f"{name}.bias"}
            stray = sorted(k for k in ckpt.keys() if k.rpartition(".")[0] == name and k not in own)
            if stray:
                raise ImportRefused(stray[0], f"a tensor the {source.name} layout does not have (with "
                                    f"{stray[1:4]})" if stray[1:] else f"a tensor the {source.name} layout does not "
                                    "have", "remove it, or load the checkpoint with the library that wrote it")
        except ImportRefused as e:
            refusals.append(e)
    if refusals:
        raise ImportRefusedModules(source.name, str(folder), refusals)
    if not weights:
        raise ImportRefused(str(folder), f"no packed module ({source.marker} tensors) in the checkpoint",
                            "check the folder: its config says it is quantized but its weights are not")

    hf_config = _hf_quant_config(weights, [n for n in linears if n not in weights])
    state = {k: _read_float(ckpt, k) for k in ckpt.keys() if k not in ckpt.consumed}
    for name, w in weights.items():
        scheme = hf_config.scheme_for(name)
        tensors = pack(scheme, QuantParams(w.codes, w.scale, w.zero))
        specs = tensor_specs(scheme, (w.codes.shape[0], w.codes.shape[1]))
        assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == specs, name  # our own mapping
        state.update({f"{name}.{k}": t for k, t in tensors.items()})
    head = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
    if head is not None and any(skeleton.get_submodule(n) is head for n in weights):
        for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False  # a packed head has its own tensors
    config.quantization_config = hf_config.to_dict()
    del skeleton

    model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True,
                                      **from_pretrained_kwargs)
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems or info.get("error_msgs"):
        listed = "; ".join(f"{k}: {v[:5]}{' ...' if len(v) > 5 else ''}" for k, v in problems.items())
        raise ImportRefused(str(folder), f"the checkpoint's tensors do not match {cls.__name__} built from its "
                            f"config.json ({listed or info.get('error_msgs')})",
                            "check that config.json belongs to these weights (nothing is left randomly initialised)")
    for name, w in weights.items():
        module = model.get_submodule(name)
        if not isinstance(module, QuantLinear) or not torch.equal(module.qweight.cpu(), state[f"{name}.qweight"]):
            raise ImportRefused(name, "was not loaded as the packed module built from the checkpoint",
                                "report this: the model's loader renamed or converted the tensor")
    model.config._name_or_path = str(folder)
    _load_generation_config(model, folder)
    return (model, info) if want_info else model


def _resolve(path) -> Path:
    if os.path.isdir(path):
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception as e:  # noqa: BLE001 - the message says what was looked for
        raise FileNotFoundError(f"{path!r} is neither a folder nor a Hub id in the local cache ({e})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ImportRefused(str(path), "missing", "point load_foreign at a checkpoint folder with its config.json")
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise ImportRefused(str(path), f"{path.stat().st_size} bytes is too large for a config file",
                            "check the file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ImportRefused(str(path), f"not valid JSON ({e})", "repair or re-download the file") from None
    if not isinstance(data, dict):
        raise ImportRefused(str(path), "is not a JSON object", "repair or re-download the file")
    return data


def _quantization_config(folder: Path, config: dict) -> tuple[dict, Path]:
    """config.json's quantization_config (what transformers reads), else GPTQ's quantize_config.json or AutoAWQ's
    quant_config.json."""
    qc = config.get("quantization_config")
    if qc is not None:
        if not isinstance(qc, dict):
            raise ImportRefused(str(folder / "config.json"), "quantization_config is not a JSON object",
                                "repair the file")
        return qc, folder / "config.json"
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        if (folder / name).is_file():
            qc = _read_json(folder / name)
            return {"quant_method": method, **qc}, folder / name
    raise ImportRefused(str(folder / "config.json"), "no quantization_config (and no quantize_config.json or "
                        "quant_config.json): not a quantized checkpoint",
                        "load a float checkpoint with transformers, and quantize it with HfQuantConfig")


def _weight_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ImportRefused(str(index), "has no weight_map object", "repair or re-download the file")
        names = sorted(set(weight_map.values()))
        for n in names:  # file names only: an index must not point outside its folder
            if not isinstance(n, str) or Path(n).name != n or not n.endswith(".safetensors"):
                raise ImportRefused(str(index), f"weight_map names {n!r}, not a .safetensors file of this folder",
                                    "repair or re-download the index")
            if not (folder / n).is_file():
                raise ImportRefused(str(folder / n), "listed in the index but missing", "download every shard")
        return [str(folder / n) for n in names]
    if (folder / "model.safetensors").is_file():
        return [str(folder / "model.safetensors")]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    raise ImportRefused(str(folder), f"no model.safetensors{' (only ' + ', '.join(pickles) + ')' if pickles else ''}: "
                        "hf_quant reads safetensors only (pickled files can run code when loaded)",
                        "convert the checkpoint to safetensors where you trust its source")


def _model_class(config, folder: Path):
    import transformers

    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures and isinstance(architectures[0], str) \
        else None
    if cls is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        try:
            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        except KeyError:
            raise ImportRefused(str(folder / "config.json"), f"architectures {architectures} is not a transformers "
                                "model class", "load models with custom code with their own library") from None
    return cls


def _is_conv1d(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _read_float(ckpt: Checkpoint, key: str) -> torch.Tensor:
    dtype = ckpt.dtype(key)
    if not isinstance(dtype, torch.dtype):
        raise ImportRefused(key, f"stored as {dtype}, which torch does not read", "re-export the checkpoint")
    return ckpt.read(key, (dtype,), None)


def _hf_quant_config(weights: dict, float_linears: list[str]) -> HfQuantConfig:
    """The HfQuantConfig describing the imported schemes: the most common one as the default, anchored per-module
    overrides for the others and for the linears kept in float (so a save/reload builds exactly these modules)."""
    int_format = get_format("int")  # every layout imported is affine integer codes
    assert int_format.affine_int

    def settings(w):
        return {"bits": w.bits, "group_size": w.group_size, "symmetric": w.zero is None, "method": w.method}

    counts = Counter(tuple(sorted(settings(w).items())) for w in weights.values())
    default = dict(counts.most_common(1)[0][0])
    overrides = {f"^{re.escape(n)}$": None for n in sorted(float_linears)}
    for name in sorted(weights):
        s = settings(weights[name])
        if s != default:
            overrides[f"^{re.escape(name)}$"] = s
    config = HfQuantConfig(format=int_format.name, **default, modules_to_not_convert=[], overrides=overrides)
    for name, w in weights.items():  # the config resolves to exactly the imported schemes
        assert config.scheme_for(name) == QuantScheme(format=int_format.name, **settings(w)), name
    return config


def _load_generation_config(model, folder: Path) -> None:
    if (folder / "generation_config.json").is_file() and model.can_generate():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except Exception:  # noqa: BLE001 - optional file: the model's default generation config stays
            pass
