"""`HfQuantQuantizer`: the transformers `HfQuantizer` of hf_quant.

Quantize-on-load: before weights load, every nn.Linear / Conv1D to quantize is replaced (on the meta device) by a
`QuantLinear` holding a float `weight` placeholder; each weight tensor then goes through `HfQuantQuantize` as it
is read, so only one float tensor is alive at a time. Fused MoE expert parameters stay placeholders until their
tensor arrives, and are then replaced by a `QuantExpertWeight`.
Pre-quantized: the same modules are built with their packed buffers, checked against the checkpoint's header,
and loaded as ordinary buffers (bit-identical, nothing is re-quantized).
"""

from __future__ import annotations

import functools
import logging
import re

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from .algorithms import quantize_weight
from .config import HfQuantConfig
from .formats import bits_per_weight
from .model.checkpoint import (
    check_checkpoint_files,
    check_model_packed_values,
    checkpoint_metadata,
    save_pretrained_atomic,
)
from .model import (
    check_patterns_match,
    check_target_shapes,
    expert_params,
    find_embedding_targets,
    find_targets,
    is_fused_experts,
    modules_kept_float,
    resolve_placement,
    tied_linear_targets,
)
from .nn import PackedWeight, QuantEmbedding, QuantExpertWeight, QuantLinear, QuantTiedHead

logger = logging.getLogger(__name__)



class HfQuantQuantizer(HfQuantizer):
    requires_calibration = False
    quantization_config: HfQuantConfig

    def __init__(self, quantization_config: HfQuantConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self.pending_experts: dict[str, tuple] = {}  # param name -> (scheme, transposed), quantize-on-load
        self.load_errors: dict[str, str] = {}  # weight name -> why it could not be quantized (quantize-on-load)
        self.tied_to_quantize: dict[str, object] = {}  # tied linear (e.g. lm_head) -> scheme, quantized after load
        self.records: dict | None = None  # pre-quantized: the weights' own records (modules, float tensor digests)
        self.streamer = None  # calibration: the decoder blocks, read one at a time (pipeline/streaming.py)
        self.stream_later = None  # (model, files, dtype) while a named device_map waits to be resolved
        self.calibrated_sizes: dict[str, float] = {}  # calibration targets' weights -> stored bytes per weight

    # --- loading hooks ----------------------------------------------------------------------------

    def validate_environment(self, *args, **kwargs):
        # transformers calls this again right after resolving a named device_map ("auto", ...) into a dict, sized
        # with the decoder blocks in place: the blocks to stream are taken out now, before weights load. (There is
        # no hook between the device map's resolution and loading; the after-loading hook checks this happened.)
        device_map = kwargs.get("device_map")
        if self.stream_later is not None and isinstance(device_map, dict):
            from .pipeline.streaming import BlockStreamer

            model, files, dtype = self.stream_later
            self.stream_later = None
            self.streamer = BlockStreamer.detach(model, files, dtype, device_map)
        return None

    def update_dtype(self, dtype):
        return torch.float32 if dtype is None else dtype

    def param_element_size(self, model, param_name: str, param) -> float:
        # `device_map="auto"` / `max_memory` are sized by what each weight occupies once quantized (transformers
        # asks before loading): a QuantLinear's float `weight` is a placeholder whose packed buffers, already
        # registered on meta with their shapes, are counted themselves; a fused-expert tensor quantized as it loads
        # takes its scheme's stored bits.
        if not self.pre_quantized:
            if param_name in self.calibrated_sizes:  # quantized after loading, but sized as it will be stored
                return self.calibrated_sizes[param_name]
            if param_name in self.pending_experts:
                scheme, transposed, _ = self.pending_experts[param_name]
                e, a, b = param.shape
                return bits_per_weight(scheme, (e, b, a) if transposed else (e, a, b)) / 8
            module, name = get_module_from_name(model, param_name)
            if isinstance(module, (QuantLinear, QuantEmbedding)) and name == "weight":
                return 0.0
        return param.element_size()

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        if param_name in self.pending_experts:
            return True
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, (QuantLinear, QuantEmbedding)) and name == "weight"

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        config = self.quantization_config
        if not self.pre_quantized:  # (a saved config's patterns are checked against the weights' own records)
            check_patterns_match(model, config)
        if config.modules_to_not_convert is None:
            # Resolve the default once and record it (with the head's override, `lm_head`), so a reload does not
            # depend on transformers' heuristics or on the lm_head field.
            skip, overrides = resolve_placement(model, config)
            config.update(modules_to_not_convert=skip, overrides=overrides)
        self.modules_to_not_convert = modules_kept_float(model, config)
        if not self.pre_quantized:
            check_target_shapes(model, config, self.modules_to_not_convert)
        if config.target_bits is not None and not self.pre_quantized:
            # Mixed precision: the per-layer choice becomes overrides, so the saved config describes the checkpoint.
            from .algorithms.allocation import allocate_from_checkpoint, config_with_allocation

            allocation = allocate_from_checkpoint(model, config, checkpoint_files, self.modules_to_not_convert)
            logger.info(allocation.summary())
            config.update(overrides=config_with_allocation(config, allocation).overrides)
        # transformers 5.25 passes dtype=None here even when it resolved one ("auto": the checkpoint's bfloat16): the
        # model's (meta) parameters carry it. Fused experts dequantize to this dtype, so it must be the model's.
        compute_dtype = dtype or getattr(model, "dtype", None) or torch.float32
        if not self.pre_quantized:
            config.weights_digest = None  # (a loaded checkpoint's config reused to quantize another model)
            # A tied lm_head has no tensor of its own in the checkpoint: it is quantized from the tied embedding
            # after loading (and untied), so it is left out of the load-time conversion.
            self.tied_to_quantize = tied_linear_targets(model, config, self.modules_to_not_convert)
            self.modules_to_not_convert += list(self.tied_to_quantize)
        if not self.pre_quantized and config.quantizes_after_loading:
            # Calibration and rotations need the float weights: they load unchanged and are quantized after loading
            # (`quantize_with_calibration`).
            from .pipeline import check_calibration_supported

            check_calibration_supported(model, config)
            device_map = kwargs.get("device_map")
            if stream_blocks(model, config, checkpoint_files, device_map):
                from .pipeline.streaming import BlockStreamer, resolved_later

                # Only the packed form of a streamed block is ever resident: the device map is sized by it. (The
                # whole-model path loads every float weight where the map says, so it keeps the float sizes.)
                self.calibrated_sizes = {f"{t.module_name}.{t.param}": bits_per_weight(t.scheme, t.shape) / 8
                                         for t in find_targets(model, config, self.modules_to_not_convert)}

                if resolved_later(device_map):
                    self.stream_later = (model, checkpoint_files, compute_dtype)  # see validate_environment
                else:
                    self.streamer = BlockStreamer.detach(model, checkpoint_files, compute_dtype, device_map)
            return
        replaced = install_quantized_modules(
            model, config, self.modules_to_not_convert, self.pre_quantized, compute_dtype, self.pending_experts
        )
        if self.pre_quantized and config.rotation is not None:
            from .pipeline import attach_rotations

            attach_rotations(model, config)
        if replaced == 0:
            raise ValueError(
                "hf_quant found no nn.Linear, Conv1D or fused-expert weight to quantize in "
                f"{type(model).__name__} (modules_to_not_convert={config.modules_to_not_convert}, "
                f"overrides={config.overrides})"
            )
        if self.pre_quantized and checkpoint_files:
            self.records = check_checkpoint_files(model, checkpoint_files, config)
        # transformers initializes (missing) weights after loading; see `initialize_weights_with_stubs`.
        model.initialize_weights = functools.partial(initialize_weights_with_stubs, model, model.initialize_weights)

    def _process_model_after_weight_loading(self, model, **kwargs):
        model.__dict__.pop("initialize_weights", None)
        if not self.pre_quantized and self.quantization_config.quantizes_after_loading:
            from .pipeline import quantize_with_calibration

            streamer, self.streamer = self.streamer, None
            if self.stream_later is not None:  # transformers never handed over the resolved device map
                self.stream_later = None
                logger.warning("hf_quant: calibration loaded the whole float model: this transformers version did "
                               "not report the resolved device_map before loading")
            if streamer is not None:
                streamer.attach(model)  # the blocks come back with their float weights on meta, read one at a time
            self.calibration_report = quantize_with_calibration(model, self.quantization_config,
                                                                self.modules_to_not_convert, streamer=streamer)
        if self.tied_to_quantize:
            quantize_tied_linears(model, self.tied_to_quantize)
        if not self.pre_quantized and self.quantization_config.quantizes_after_loading:
            quantize_embeddings_after_loading(model, self.quantization_config, self.modules_to_not_convert)
        if self.load_errors:
            errors = sorted(self.load_errors.items())
            listed = "; ".join(f"{name}: {why}" for name, why in errors[:10])
            raise ValueError(
                f"hf_quant could not quantize {len(errors)} weight(s) of the checkpoint: {listed}"
                f"{' ...' if len(errors) > 10 else ''}. Fix the checkpoint, or keep these modules in float with "
                "HfQuantConfig(modules_to_not_convert=[...])"
            )
        if self.pre_quantized:
            # every value check the formats declare, and the recorded SHA-256 of every module's tensors
            check_model_packed_values(model, self.records)
        missing = []
        for name, module in model.named_modules():
            if isinstance(module, (QuantLinear, QuantEmbedding)) and "weight" in module._parameters:
                missing.append(f"{name}.weight")
            if is_fused_experts(module):
                missing += [f"{name}.{p}" for p in expert_params(module) if f"{name}.{p}" in self.pending_experts]
        if missing:
            raise ValueError(
                f"hf_quant: these weights were not found in the checkpoint, so they could not be quantized: "
                f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
            )
        if any(isinstance(m, QuantExpertWeight) for m in model.modules()) and hasattr(model, "set_experts_implementation"):
            # grouped/batched expert kernels read the whole 3-D float tensor; the eager loop indexes one expert
            # at a time, which QuantExpertWeight supports.
            model.set_experts_implementation("eager")
        # disk offload (device_map with "disk"): packed tensors leave RAM too, with no offload_buffers=True
        from .model.offload import offload_packed_tensors

        offload_packed_tensors(model)
        model._weight_conversions = conversions_sparing_packed(model)
        model.config.quantization_config = self.quantization_config
        # Saves are atomic (a temporary sibling folder swapped in): transformers writes config.json before the
        # weights, so an interrupted save would leave a new config beside the old weights. Its save_pretrained has
        # no hook around the file writes (HfQuantizer.get_state_dict_and_metadata runs before them and has no say
        # over the folder); such a hook would replace this per-instance wrapper.
        model.save_pretrained = functools.partial(save_pretrained_atomic, model)
        return model

    def get_quantize_ops(self):
        return HfQuantQuantize(self)

    def get_state_dict_and_metadata(self, model):
        # The per-module record makes a checkpoint self-describing: `hf-quant inspect` reads exact shapes and
        # schemes from the safetensors header without building the model.
        # The weights also record the config fields they must be read with: at load, the weights' record wins
        # over config.json (`check_checkpoint_files`).
        record_float_layers(model, self.quantization_config)
        packed = packed_modules(model)
        packed_keys = {f"{name}.{t}" for name, m in packed.items() for t in m.packed_names}
        floats = {k: v for k, v in model.state_dict().items() if k not in packed_keys}
        return None, checkpoint_metadata(self.quantization_config, packed, floats)

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        if isinstance(dtype, str):  # transformers passes model.config.dtype, a string after a config.json round trip
            dtype = getattr(torch, dtype.removeprefix("torch."))
        return dequantize_model(model, dtype or torch.float32)


class HfQuantQuantize(ConversionOps):
    """Quantizes each float weight as the loader reads it."""

    def __init__(self, hf_quantizer: HfQuantQuantizer):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        result = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, pname = get_module_from_name(model, name)
            if isinstance(module, (QuantLinear, QuantEmbedding)) and pname == "weight":
                weight = value.t() if getattr(module, "source_is_conv1d", False) else value
                try:
                    packed = quantize_weight(weight, module.scheme)
                except ValueError as e:
                    # Raised from here, transformers' loader would catch it and raise a RuntimeError that does
                    # not name the weight: record it, leave the weight unloaded, raise after loading.
                    self.hf_quantizer.load_errors[name] = str(e)
                    continue
                del module._parameters["weight"]
                prefix = name.rsplit(".", 1)[0]
                result.update({f"{prefix}.{k}": v for k, v in packed.items()})
            elif name in self.hf_quantizer.pending_experts:
                scheme, transposed, compute_dtype = self.hf_quantizer.pending_experts.pop(name)
                shape = QuantExpertWeight.logical_shape(tuple(value.shape), transposed)
                q = QuantExpertWeight(*shape, scheme, transposed, device=value.device, dtype=compute_dtype)
                try:
                    q.load_packed(quantize_weight(value.transpose(1, 2) if transposed else value, scheme))
                except ValueError as e:
                    self.hf_quantizer.load_errors[name] = str(e)
                    continue
                del module._parameters[pname]
                module.add_module(pname, q)
            else:
                result[name] = value
                continue
            if missing_keys is not None:
                missing_keys.discard(name)
        return result


def stream_blocks(model: nn.Module, config: HfQuantConfig, checkpoint_files, device_map) -> bool:
    """Whether calibration can read the decoder blocks one at a time (pipeline/streaming.py); when the whole float
    model must load instead, the reason is logged."""
    from .pipeline.streaming import ENV_DISABLE, streaming_disabled_reason

    reason = streaming_disabled_reason(model, config, checkpoint_files, device_map)
    if reason is not None:
        log = logger.info if ENV_DISABLE in reason else logger.warning
        log("hf_quant: calibration loads the whole float model first (peak memory at least the float model's "
            "size) because %s", reason)
    return reason is None


def initialize_weights_with_stubs(model: nn.Module, initialize_weights) -> None:
    """Run transformers' `initialize_weights` with a stand-in `weight` on every packed QuantLinear.

    Some models' `_init_weights(parent)` reach into a child layer's weight (GPT-2: `init.normal_(module.c_proj.weight)`,
    likewise T5, wav2vec2, ...), which a QuantLinear does not have. The stand-in is a meta tensor of the replaced
    weight's shape flagged `_is_hf_initialized`, so transformers' init functions leave it alone; it is removed
    afterwards, so the model never holds a float weight for a quantized layer.
    """
    stubbed = []
    for module in model.modules():
        if isinstance(module, QuantLinear) and "weight" not in module._parameters and "weight" not in module.__dict__:
            shape = (module.out_features, module.in_features)
            stub = torch.empty(shape[::-1] if module.source_is_conv1d else shape, device="meta")
            stub._is_hf_initialized = True
            module.__dict__["weight"] = stub
            stubbed.append(module)
    try:
        initialize_weights()
    finally:
        for module in stubbed:
            module.__dict__.pop("weight", None)


def conversions_sparing_packed(model: nn.Module) -> list | None:
    """The model's weight conversions (what `save_pretrained` reverts to write the checkpoint's original layout),
    less every transform whose reverse would rename or convert a tensor of a packed module.

    Packed tensors are saved under the model's own module names, the layout `check_checkpoint_files` and the
    pre-quantized loader expect. Reverting a conversion on them is wrong: e.g. the per-expert split of a fused
    MoE converter would chunk `experts.gate_up_proj.qweight` into `experts.0.gate_proj.weight.qweight` (and cut
    double-quant blocks, which span experts, apart), a layout nothing reads back.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if not conversions:
        return conversions
    packed_keys = [
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, PackedWeight)
        for key, t in [*module.named_buffers(recurse=False), *module.named_parameters(recurse=False)]
        if t is not None
    ]
    kept = []
    for transform in conversions:
        reverse = transform.reverse_transform()
        if not any(reverse.rename_source_key(key)[1] is not None for key in packed_keys):
            kept.append(transform)
    return kept


def install_quantized_modules(
    model: nn.Module,
    config: HfQuantConfig,
    modules_to_not_convert: list[str],
    pre_quantized: bool,
    compute_dtype: torch.dtype,
    pending_experts: dict,
) -> int:
    """Swap the modules to quantize for packed modules on the meta device; returns how many were swapped."""
    embeddings = find_embedding_targets(model, config, modules_to_not_convert)
    for t in embeddings:
        module = model.get_submodule(t.module_name)
        with torch.device("meta"):
            q = QuantEmbedding.like(module, t.scheme, dtype=compute_dtype)
        if not pre_quantized:
            q.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
        q.requires_grad_(False)
        model.set_submodule(t.module_name, q)
        tie_heads_to(model, q, t)
    # (after the tied heads are replaced: they are not linears to quantize of their own)
    targets = find_targets(model, config, modules_to_not_convert)
    for t in targets:
        module = model.get_submodule(t.module_name)
        if not t.experts:
            out_f, in_f = t.shape
            with torch.device("meta"):
                q = QuantLinear(in_f, out_f, module.bias is not None, t.scheme, dtype=compute_dtype)
            q.source_is_conv1d = t.conv1d
            if not pre_quantized:
                # Placeholder for the checkpoint's float weight; HfQuantQuantize replaces it by packed tensors.
                q.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
            q.requires_grad_(False)
            model.set_submodule(t.module_name, q)
        elif pre_quantized:
            with torch.device("meta"):
                q = QuantExpertWeight(*t.shape, t.scheme, t.transposed, dtype=compute_dtype)
            del module._parameters[t.param]
            module.add_module(t.param, q)
        else:
            pending_experts[t.name] = (t.scheme, t.transposed, compute_dtype)
    return len(targets) + len(embeddings)


def tie_heads_to(model: nn.Module, embedding: QuantEmbedding, target) -> None:
    """Replace the heads tied to the embedding `target` by `QuantTiedHead`s over its packed table, and drop the ties
    from transformers' mapping (there is no float parameter left to tie)."""
    for head_name in target.tied_heads:
        head = model.get_submodule(head_name)
        bias = head.bias if head.bias is not None else None
        model.set_submodule(head_name, QuantTiedHead(embedding, target.module_name, bias).requires_grad_(False))
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied:
        for head_name in target.tied_heads:
            for a, b in list(tied.items()):
                if {a, b} == {f"{head_name}.weight", f"{target.module_name}.weight"}:
                    tied.pop(a)


@torch.no_grad()
def quantize_embeddings_after_loading(model: nn.Module, config: HfQuantConfig, skip: list[str]) -> None:
    """Quantize the embeddings (data-free) of a model whose weights loaded in float (calibration, rotations): after
    calibration, so a rotation folded into the table is quantized with it."""
    for t in find_embedding_targets(model, config, skip):
        module = model.get_submodule(t.module_name)
        if module.weight.device.type == "meta":
            raise ValueError(f"hf_quant cannot quantize the embedding {t.module_name!r} when device_map offloads it "
                             f"to disk; place it on a device or the CPU, or keep it in float with "
                             f"overrides={{{t.module_name!r}: None}}")
        q = QuantEmbedding.from_float(module, t.scheme, t.module_name).requires_grad_(False)
        if (hook := getattr(module, "_hf_hook", None)) is not None:
            from accelerate.hooks import add_hook_to_module

            add_hook_to_module(q, hook)
        model.set_submodule(t.module_name, q)
        tie_heads_to(model, q, t)


@torch.no_grad()
def quantize_tied_linears(model: nn.Module, schemes: dict) -> None:
    """Quantize each tied linear from its (loaded, tied) float weight and untie it: the quantized layer has its own
    packed tensors, and the config says `tie_word_embeddings=False` so a saved checkpoint reloads them as they are
    (the embedding it was tied to stays float)."""
    for name, scheme in schemes.items():
        module = model.get_submodule(name)
        if module.weight.device.type == "meta":
            raise ValueError(
                f"hf_quant cannot quantize the tied layer {name!r} when device_map offloads it to disk; place "
                f"{name!r} on a device or the CPU, or keep it in float with modules_to_not_convert=[{name!r}, ...]"
            )
        q = QuantLinear.from_float(module, scheme).requires_grad_(False)
        if (hook := getattr(module, "_hf_hook", None)) is not None:  # accelerate's device placement (device_map)
            from accelerate.hooks import add_hook_to_module

            add_hook_to_module(q, hook)
        model.set_submodule(name, q)
        model.all_tied_weights_keys.pop(f"{name}.weight", None)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every packed module by its float equivalent (nn.Linear / a 3-D expert parameter / nn.Embedding, a head
    tied to a quantized embedding tied again to the float one)."""
    had_experts = False
    heads = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantTiedHead)]
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantEmbedding):
            model.set_submodule(name, module.to_float(dtype))
        elif isinstance(module, QuantLinear):
            layer = module.to_float(dtype)
            if getattr(module, "source_is_conv1d", False):
                conv = Conv1D(layer.out_features, layer.in_features).to(device=layer.weight.device, dtype=dtype)
                conv.weight = nn.Parameter(layer.weight.t().contiguous(), requires_grad=False)
                if layer.bias is not None:
                    conv.bias = nn.Parameter(layer.bias, requires_grad=False)
                layer = conv
            model.set_submodule(name, layer)
        elif is_fused_experts(module):
            for pname, child in list(module.named_children()):
                if isinstance(child, QuantExpertWeight):
                    del module._modules[pname]
                    module.register_parameter(pname, child.to_float(dtype))
                    had_experts = True
    for name, head in heads:
        model.set_submodule(name, head.to_float(model.get_submodule(head.tied_to).weight))
        if isinstance(getattr(model, "all_tied_weights_keys", None), dict):
            model.all_tied_weights_keys[f"{name}.weight"] = f"{head.tied_to}.weight"
    if had_experts and hasattr(model, "set_experts_implementation"):
        # Quantized experts were pinned to "eager"; float ones get transformers' default back. (Setting the config
        # field to None instead leaves the experts without an implementation: transformers warns on every forward.)
        model.set_experts_implementation(model.get_correct_experts_implementation(None))
    return model


def record_float_layers(model: nn.Module, config: HfQuantConfig) -> list[str]:
    """Record in `config` the layers it would quantize that `model` holds in float (e.g. a LoRA adapter merged with
    `set_merge_target(model, "float")`): each gets an anchored `overrides` entry of None (keep in float), placed
    first, so a save writes what the model is and a reload builds those layers as float. Returns their names."""
    names = [t.name for t in find_targets(model, config, modules_kept_float(model, config))]
    if names:
        logger.info("hf_quant: %d layer(s) are float in the model and recorded as float in its config: %s",
                    len(names), names[:5])
        config.update(overrides={**{f"^{re.escape(n)}$": None for n in names}, **config.overrides})
    return names


def packed_modules(model: nn.Module) -> dict[str, PackedWeight]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedWeight)}


__all__ = [
    "HfQuantQuantizer",
    "conversions_sparing_packed",
    "dequantize_model",
    "install_quantized_modules",
    "packed_modules",
]
