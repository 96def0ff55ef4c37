"""LoRA (PEFT) on hf_quant's packed modules.

Importing hf_quant registers the LoRA layers below with PEFT, so ordinary PEFT code works on a quantized model:

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hf_quant.HfQuantConfig(bits=4))
    model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))

Registration goes through PEFT's custom-module API (`LoraConfig._register_custom_module`): every `LoraConfig` maps
`QuantLinear` -> `QuantLoraLinear` and `QuantExpertWeight` -> `QuantLoraExperts`, including configs PEFT reads
back in `PeftModel.from_pretrained`.

Training: the base stays packed and frozen; gradients reach the adapters and the inputs through the packed weight
(`PackedWeight.packed_linear` dequantizes it on the fly in backward), and the base codes never change.

Merging (`merge_adapter`, `merge_and_unload`) re-quantizes W + sum of deltas into the base's own scheme; the
original packed tensors are kept aside, so `unmerge_adapter` restores them bit for bit. That re-quantization can undo
much of a fine-tune (a LoRA update is often smaller than one quantization step), so every such merge warns
(`LossyMergeWarning`) with what it measured: the fraction of weights whose quantized value moved, and the relative
error of the merged layers' change against the adapter's own change W + delta (`last_merge_report(model)` returns the
figures). The lossless choices: keep the adapter unmerged, or `set_merge_target(model, "float")`, which merges into a
float `nn.Linear` (saved as such by `save_pretrained` and loaded back by `from_pretrained`).

`init_lora_from_residual` is a quantization-aware adapter initialisation (LoftQ-style), given the float weights.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTuner, check_adapters_to_merge
from torch import nn

from ..algorithms import quantize_weight
from ..formats import dequantize
from ..nn import QuantEmbedding, QuantExpertWeight, QuantLinear, QuantTiedHead

MERGE_TARGETS = ("quantized", "float")
# init_lora_weights values that need nothing but the adapter's own shapes (the others read a float base weight)
_PLAIN_INITS = (True, False, "gaussian")


def _check_plain_lora(layer: LoraLayer, config: LoraConfig) -> None:
    init = config.init_lora_weights
    if init not in _PLAIN_INITS:
        raise ValueError(
            f"LoraConfig.init_lora_weights={init!r} needs the float base weight, which an hf_quant layer does not hold; "
            f"use one of {list(_PLAIN_INITS)} and, for a quantization-aware start (LoftQ-style), call "
            "hf_quant.integrations.peft.init_lora_from_residual(peft_model, float_weights) after get_peft_model"
        )
    variant = LoraLayer.resolve_lora_variant(layer, config=config)
    if variant is not None:
        raise ValueError(
            f"{type(variant).__name__}: hf_quant LoRA layers support plain LoRA only; unset the LoraConfig option that "
            "selects this variant (use_dora, arrow_config, ...)"
        )


class LossyMergeWarning(UserWarning):
    """A merge re-quantized W + delta into the base's low-bit format, losing part of the fine-tune."""


LOSSLESS_CHOICES = (
    "Lossless choices: keep the adapter unmerged (save it with model.save_pretrained and load it with "
    "PeftModel.from_pretrained), or call hf_quant.integrations.peft.set_merge_target(model, 'float') before merging "
    "(the merged layers become float nn.Linear; save_pretrained records them as float and from_pretrained loads them "
    "back). Silence this warning with warnings.simplefilter('ignore', hf_quant.integrations.peft.LossyMergeWarning)."
)


@dataclass
class MergeStats:
    """What one re-quantizing merge did to a layer (or, summed, to a model)."""

    layers: int = 0
    weights: int = 0  # weights of the merged layers
    moved: int = 0  # weights whose dequantized value changed
    lost: float = 0.0  # sum over layers of ||merged change - adapter change||^2
    intended: float = 0.0  # sum over layers of ||adapter change||^2
    worst: tuple[float, str] = (0.0, "")  # (relative error, layer name) of the worst layer

    @property
    def moved_fraction(self) -> float:
        return self.moved / max(self.weights, 1)

    @property
    def relative_error(self) -> float:
        """||what the merged layers changed - what the adapter changes|| / ||what the adapter changes||: the relative
        error of the adapter's effect on the layers' outputs for white-noise inputs (0: exact, 1: as if not
        merged)."""
        return math.sqrt(self.lost / self.intended) if self.intended > 0 else 0.0

    def add(self, other: "MergeStats") -> None:
        self.layers += other.layers
        self.weights += other.weights
        self.moved += other.moved
        self.lost += other.lost
        self.intended += other.intended
        self.worst = max(self.worst, other.worst)

    def message(self) -> str:
        worst, name = self.worst
        return (
            f"merging the LoRA adapter re-quantized W + delta into the low-bit codes of {self.layers} hf_quant layer(s) "
            f"and lost part of the fine-tune: {100 * self.moved_fraction:.1f}% of their {self.weights:,} weights moved "
            f"to another quantized value, and the merged layers reproduce the adapter's change to their outputs with a "
            f"relative error of {100 * self.relative_error:.0f}% (0% = exact, 100% = as if not merged; worst layer "
            f"{name or '?'}: {100 * worst:.0f}%). {LOSSLESS_CHOICES}"
        )


# Re-quantizing merges in progress, per PeftModel tuner (merge_adapter / merge_and_unload): one warning per pass,
# emitted when its last hf_quant layer is merged.
_PASSES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_LAST_REPORT: "weakref.WeakKeyDictionary[nn.Module, MergeStats]" = weakref.WeakKeyDictionary()


def _calling_tuner() -> BaseTuner | None:
    """The PEFT tuner (LoraModel) whose merge_adapter / merge_and_unload is merging this layer, if any."""
    frame = sys._getframe(2)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, BaseTuner):
            return candidate
        frame = frame.f_back
    return None


def _to_merge(layer: nn.Module, adapter_names: list[str] | None) -> list[str]:
    """The adapters `layer.merge(adapter_names=...)` will merge (check_adapters_to_merge, without its warnings)."""
    names = layer.active_adapters if adapter_names is None else adapter_names
    return [a for a in names if a in layer.lora_A and a not in layer.merged_adapters]


def _report_merge(layer: nn.Module, stats: MergeStats, adapter_names: list[str] | None) -> None:
    """Add one layer's merge to its pass; warn once the pass's last hf_quant layer has merged (or at once, for a
    layer merged on its own)."""
    tuner = _calling_tuner()
    if tuner is None:
        _warn(stats)
        return
    state = _PASSES.get(tuner)
    if state is None or id(layer) in state["done"]:  # a new pass (or a stale one, interrupted by an error)
        pending = {id(m) for m in tuner.model.modules() if isinstance(m, _QuantMergeMixin) and m is not layer
                   and m.merge_target == "quantized" and _to_merge(m, adapter_names)}
        state = _PASSES[tuner] = {"pending": pending, "done": set(), "stats": MergeStats()}
    state["pending"].discard(id(layer))
    state["done"].add(id(layer))
    state["stats"].add(stats)
    if not state["pending"]:
        del _PASSES[tuner]
        _LAST_REPORT[tuner.model] = state["stats"]
        _warn(state["stats"])


def _warn(stats: MergeStats) -> None:
    warnings.warn(stats.message(), LossyMergeWarning, stacklevel=2)


def last_merge_report(model: nn.Module) -> MergeStats | None:
    """The figures of the last re-quantizing merge pass (merge_adapter / merge_and_unload) of `model` (a PeftModel,
    its tuner, or the model it wraps), or None."""
    for m in (model, getattr(model, "base_model", None), getattr(model, "model", None),
              getattr(getattr(model, "base_model", None), "model", None)):
        if isinstance(m, nn.Module) and m in _LAST_REPORT:
            return _LAST_REPORT[m]
    return None


class _MergeAside:
    """What a merge replaced, kept aside (not a submodule: not saved, not moved) so that unmerge restores it exactly."""

    def __init__(self, packed: dict[str, torch.Tensor] | None = None, bias: torch.Tensor | None = None,
                 module: nn.Module | None = None):
        self.packed, self.bias, self.module = packed, bias, module


class _QuantMergeMixin:
    """merge/unmerge for LoRA layers whose base is a PackedWeight: re-quantized merge, exact unmerge."""

    merge_target = "quantized"

    def _merged_float_weight(self, adapters: list[str]) -> torch.Tensor:
        base = self.get_base_layer()
        weight = base.dequantize_weight(torch.float32)
        for name in adapters:
            weight = weight + self.get_delta_weight(name).to(weight.device, torch.float32)
        return weight

    def _layer_name(self) -> str:
        tuner = _calling_tuner()
        if tuner is not None:
            for name, module in tuner.model.named_modules():
                if module is self:
                    return name
        return type(self).__name__

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        requested = adapter_names
        adapter_names = [a for a in (check_adapters_to_merge(self, adapter_names) or []) if a in self.lora_A]
        if not adapter_names:
            return
        self._merge_request = requested
        if self.merged:  # merge everything again from the original codes: one re-quantization, not one per adapter
            already = list(self.merged_adapters)
            self.unmerge()
            adapter_names = already + [a for a in adapter_names if a not in already]
        weight = self._merged_float_weight(adapter_names)
        bias = self._merged_bias(adapter_names)
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"NaNs detected in the merged weights. The adapters {adapter_names} seem to be broken")
        self._install_merged(weight, bias)
        self.merged_adapters.extend(adapter_names)

    def _merged_bias(self, adapters: list[str]) -> torch.Tensor | None:
        base = self.get_base_layer()
        with_bias = [a for a in adapters if self.lora_bias.get(a)]
        if not with_bias:
            return None
        if getattr(base, "bias", None) is None:
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        bias = base.bias.detach().float()
        for name in with_bias:
            bias = bias + self.lora_B[name].bias.detach().float() * self.scaling[name]
        return bias

    def _install_merged(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        base = self.get_base_layer()
        if self.merge_target == "float":
            layer = self._float_layer(base, weight, bias)
            self._aside = _MergeAside(module=base)
            self.base_layer = layer
            return
        self._aside = _MergeAside(packed=base.packed_tensors(),
                                  bias=None if bias is None else base.bias.detach().clone())
        before = base.dequantize_weight(torch.float32)
        base.load_packed(quantize_weight(weight.detach(), base.scheme))
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)
        with torch.no_grad():
            after = base.dequantize_weight(torch.float32)
            intended = weight.detach().to(after.device) - before
            lost = float((after - before - intended).double().square().sum())
            norm = float(intended.double().square().sum())
        stats = MergeStats(layers=1, weights=after.numel(), moved=int((after != before).sum()), lost=lost,
                           intended=norm)
        stats.worst = (stats.relative_error, self._layer_name())
        _report_merge(self, stats, getattr(self, '_merge_request', None))

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        aside, self._aside = self._aside, None
        if aside.module is not None:
            device = next(iter(self.base_layer.parameters())).device
            self.base_layer = aside.module.to(device)
        else:
            base = self.get_base_layer()
            base.load_packed(aside.packed)
            if aside.bias is not None:
                base.bias.data = aside.bias
        self.merged_adapters.clear()


class QuantLoraLinear(_QuantMergeMixin, LoraLinear):
    """LoRA on a `QuantLinear`: y = base(x) + scaling * B A dropout(x), PEFT's `lora.Linear` forward unchanged.

    `merge_target` "quantized" (default): merge replaces the base codes by quantize(W + delta) in the base's
    scheme; "float": the base becomes an `nn.Linear` holding W + delta (set with `set_merge_target`)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        if config.fan_in_fan_out:
            # A QuantLinear stores [out, in] whatever it replaced (GPT-2's Conv1D included) and takes x [..., in].
            warnings.warn("fan_in_fan_out=True ignored: hf_quant QuantLinear weights are stored [out, in]")
            config.fan_in_fan_out = False
        self._aside = None
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        _check_plain_lora(self, config)
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    @staticmethod
    def _float_layer(base: QuantLinear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
        dtype = base.bias.dtype if base.bias is not None else torch.float32
        layer = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        if base.bias is not None:
            b = base.bias.detach() if bias is None else bias
            layer.bias = nn.Parameter(b.to(dtype), requires_grad=False)
        return layer


class QuantLoraExperts(_QuantMergeMixin, nn.Module, LoraLayer):
    """LoRA on fused MoE experts (`QuantExpertWeight`, [experts, out, in]): one rank-r adapter per expert.

    The model's experts loop indexes the weight (`self.gate_up_proj[e]`); indexing this layer returns expert e's
    dequantized weight plus its scaled low-rank delta, so gradients reach the adapter. The factors use PEFT's
    `ParamWrapper` layout: lora_A [r * experts, in], lora_B [out, r * experts]. Not supported here: lora_dropout
    (it cannot act on a weight), lora_bias, merging into float (the parent expects a 3-D weight)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._aside = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        _, out, inp = module.quantized_shape
        return inp, out

    @property
    def num_experts(self) -> int:
        return self.get_base_layer().quantized_shape[0]

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        _check_plain_lora(self, config)
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if config.lora_dropout:
            raise ValueError("lora_dropout must be 0 for hf_quant MoE expert weights (dropout cannot act on a weight)")
        if config.lora_bias:
            raise ValueError("lora_bias=True is not supported on MoE expert weights (they have no bias)")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Identity()
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)
        self.lora_bias[adapter_name] = False
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        if config.init_lora_weights:
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _expert_factors(self, adapter: str, index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [experts, out, r], A [experts, r, in]), or one expert's (B [out, r], A [r, in])."""
        a = self.lora_A[adapter].weight.reshape(self.num_experts, -1, self.in_features)
        b = self.lora_B[adapter].weight.reshape(self.out_features, -1, self.num_experts).permute(2, 0, 1)
        return (b, a) if index is None else (b[index], a[index])

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        b, a = self._expert_factors(adapter)
        return torch.bmm(b, a) * self.scaling[adapter]

    def __getitem__(self, index) -> torch.Tensor:
        index = int(index)
        if self.disable_adapters and self.merged:
            self.unmerge()
        base = self.get_base_layer()
        weight = base.dequantize_weight(base.compute_dtype, index)
        if not (self.disable_adapters or self.merged):
            for name in self.active_adapters:
                if name in self.lora_A:
                    b, a = self._expert_factors(name, index)
                    weight = weight + (b @ a).to(weight.dtype) * self.scaling[name]
        return weight.t() if base.transposed else weight

    def __len__(self) -> int:
        return self.num_experts

    @property
    def shape(self) -> torch.Size:
        return self.get_base_layer().shape

    @property
    def dtype(self) -> torch.dtype:
        return self.get_base_layer().dtype

    @property
    def device(self) -> torch.device:
        return self.get_base_layer().device

    def _float_layer(self, *args):
        raise ValueError("merging MoE expert adapters into float is not supported; use set_merge_target(model, "
                         "'quantized') (the default) or model.dequantize() before attaching the adapter")

    def forward(self, *args, **kwargs):
        raise TypeError("QuantLoraExperts holds expert weights; the experts module indexes it, it is not called")


def set_merge_target(model: nn.Module, target: str) -> None:
    """Choose what merging does on every hf_quant LoRA layer of `model` (a PeftModel or any module):
    "quantized" (default) re-quantizes W + delta into the base format; "float" replaces the base by a float layer."""
    if target not in MERGE_TARGETS:
        raise ValueError(f"target must be one of {list(MERGE_TARGETS)}, got {target!r}")
    for module in model.modules():
        if isinstance(module, _QuantMergeMixin):
            if module.merged:
                raise ValueError("unmerge the adapters (model.unmerge_adapter()) before changing the merge target")
            module.merge_target = target


# --- quantization-aware initialisation ------------------------------------------------------------------------


def _float_weight_reader(float_weights):
    """name -> float tensor, from a safetensors file or folder, a mapping of tensors, or a float nn.Module."""
    if isinstance(float_weights, nn.Module):
        return float_weights.state_dict().__getitem__
    if isinstance(float_weights, Mapping):
        return float_weights.__getitem__
    if isinstance(float_weights, (str, os.PathLike)):
        from safetensors import safe_open

        path = os.fspath(float_weights)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"float_weights={path!r}: no .safetensors file found there")
        where = {}
        for f in files:
            with safe_open(f, framework="pt") as h:
                where.update(dict.fromkeys(h.keys(), f))

        def read(key: str) -> torch.Tensor:
            if key not in where:
                raise KeyError(key)
            with safe_open(where[key], framework="pt") as h:
                return h.get_tensor(key)

        return read
    raise TypeError(f"float_weights must be a path, a mapping of tensors or a float nn.Module, got {type(float_weights)}")


def _low_rank(residual: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with scaling * B A the best rank-r approximation of `residual` (truncated SVD)."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = (s[:r] / scaling).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root


def _lora_layers_with_float_weight(peft_model: nn.Module, float_weights, adapter_name: str):
    """(name, QuantLoraLinear, float weight [out, in]) for every hf_quant LoRA linear layer holding `adapter_name`."""
    read = _float_weight_reader(float_weights)
    root = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    found = False
    for name, layer in root.named_modules():
        if not isinstance(layer, QuantLoraLinear) or adapter_name not in layer.lora_A:
            continue
        found = True
        base = layer.get_base_layer()
        try:
            w = read(f"{name}.weight").float()
        except KeyError:
            raise ValueError(f"float_weights has no tensor {name + '.weight'!r} for LoRA layer {name!r}") from None
        if base.source_is_conv1d:
            w = w.t()
        if tuple(w.shape) != (base.out_features, base.in_features):
            raise ValueError(f"{name}.weight: float shape {tuple(w.shape)} does not match the quantized layer "
                             f"{(base.out_features, base.in_features)}")
        yield name, layer, w
    if not found:
        raise ValueError(f"no hf_quant LoRA layer with adapter {adapter_name!r} found in the model")


def _relative_error(w: torch.Tensor, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    return float((w - q - scaling * (b @ a)).norm() / w.norm())


@torch.no_grad()
def lora_layer_errors(peft_model: nn.Module, float_weights, adapter_name: str = "default") -> dict[str, float]:
    """{layer name: ||W - (dequant(Q) + scaling B A)|| / ||W||} for every hf_quant LoRA linear layer (unmerged)."""
    errors = {}
    for name, layer, w in _lora_layers_with_float_weight(peft_model, float_weights, adapter_name):
        if layer.merged:
            raise ValueError(f"{name}: unmerge the adapters first")
        q = layer.get_base_layer().dequantize_weight(torch.float32)
        a, b = layer.lora_A[adapter_name].weight.float(), layer.lora_B[adapter_name].weight.float()
        errors[name] = _relative_error(w, q, a, b, layer.scaling[adapter_name])
    return errors


@torch.no_grad()
def init_lora_from_residual(peft_model: nn.Module, float_weights, adapter_name: str = "default",
                            iterations: int = 0) -> dict[str, tuple[float, float]]:
    """Quantization-aware LoRA initialisation: start each adapter from the quantization error, so that base + adapter
    is closer to the float weight W than the quantized base alone.

    iterations=0: codes untouched; scaling * B A = best rank-r approximation of W - dequant(Q) (the base checkpoint
      stays valid: the adapter alone carries the correction).
    iterations=n>0: LoftQ alternation: Q = quantize(W - scaling * B A) in the layer's own scheme, then B A from the
      new residual, up to n times while the error drops; the base codes change (save the base model together with
      the adapter).

    `float_weights`: the float model's safetensors file or folder, a state dict, or the float model itself (keys as
    in the transformers model, e.g. "model.layers.0.self_attn.q_proj.weight"). Returns {layer name: (relative
    Frobenius error of the base alone, of base + adapter)} for every layer it initialised; LoRA on MoE experts is
    left as PEFT initialised it, and named in a warning.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    report = {}
    for name, layer, w in _lora_layers_with_float_weight(peft_model, float_weights, adapter_name):
        if layer.merged:
            raise ValueError(f"{name}: unmerge the adapters before initialising them")
        base = layer.get_base_layer()
        r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
        q = base.dequantize_weight(torch.float32)
        before = float((w - q).norm() / w.norm())
        a, b = _low_rank(w - q, r, scaling)
        err = _relative_error(w, q, a, b, scaling)
        packed = None
        for _ in range(iterations):
            candidate = quantize_weight(w - scaling * (b @ a), base.scheme)
            q_c = dequantize(base.scheme, candidate, base.in_features)
            a_c, b_c = _low_rank(w - q_c, r, scaling)
            err_c = _relative_error(w, q_c, a_c, b_c, scaling)
            if err_c >= err:
                break
            packed, a, b, err = candidate, a_c, b_c, err_c
        if packed is not None:
            base.load_packed(packed)
        dtype = layer.lora_A[adapter_name].weight.dtype
        layer.lora_A[adapter_name].weight.data = a.to(dtype).contiguous()
        layer.lora_B[adapter_name].weight.data = b.to(dtype).contiguous()
        report[name] = (before, err)
    root = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    skipped = [n for n, m in root.named_modules() if isinstance(m, QuantLoraExperts) and adapter_name in m.lora_A]
    if skipped:
        warnings.warn(f"init_lora_from_residual: MoE expert adapters keep PEFT's initialisation: {skipped}")
    return report


# --- registration --------------------------------------------------------------------------------------------

class RefusedLora(nn.Module):
    """Stands for LoRA on a quantized embedding or on a head tied to one: not supported, refused by name (instead of
    PEFT's generic "target module is not supported")."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig | None = None, **kwargs: Any):
        name = getattr(base_layer, "tied_to", None)
        what = (f"a head tied to the quantized embedding {name!r}" if name is not None
                else f"a quantized embedding ({base_layer.extra_repr()})")
        raise ValueError(
            f"LoRA on {what} is not supported by hf_quant: its table is packed and shared by lookups (and the tied "
            "head). Leave it out of LoraConfig.target_modules (e.g. target_modules=['q_proj', 'v_proj']), or load "
            "the model with HfQuantConfig(quantize_embeddings=False) to train LoRA on the float embedding"
        )


LORA_LAYERS = {QuantLinear: QuantLoraLinear, QuantExpertWeight: QuantLoraExperts, QuantEmbedding: RefusedLora,
               QuantTiedHead: RefusedLora}


def register_lora_layers(config: LoraConfig) -> LoraConfig:
    """Map hf_quant's modules to their LoRA layers in one `LoraConfig` (done for every config after `register`)."""
    config._register_custom_module(dict(LORA_LAYERS))
    return config


def register() -> None:
    """Make every LoraConfig, including those PEFT reads back from saved adapters, know hf_quant's LoRA layers."""
    if getattr(LoraConfig.__post_init__, "_hf_quant", False):
        return
    post_init = LoraConfig.__post_init__

    def __post_init__(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        register_lora_layers(self)

    __post_init__._hf_quant = True
    LoraConfig.__post_init__ = __post_init__


register()  # (importing this module imports PEFT; hf_quant's after-import hook defers to this call then)

__all__ = [
    "LossyMergeWarning",
    "MergeStats",
    "QuantLoraExperts",
    "QuantLoraLinear",
    "init_lora_from_residual",
    "last_merge_report",
    "lora_layer_errors",
    "register",
    "register_lora_layers",
    "set_merge_target",
]
