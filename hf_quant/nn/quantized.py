"""Modules holding packed weights: `QuantLinear` (replaces nn.Linear and GPT-2's Conv1D) and
`QuantExpertWeight` (replaces a fused MoE expert parameter [experts, out, in])."""

from __future__ import annotations

import torch
from torch import nn

from ..formats import QuantScheme, dequantize, dequantize_expert, expert_tensors, quantize, tensor_specs
from ..formats.format import active_terms
from ..kernels import select_kernel


class PackedWeight(nn.Module):
    """Shared machinery: the canonical tensors as buffers, their dtype protected from float casts, and a cache
    of the selected kernel's repacked layout per (device, compute dtype)."""

    def __init__(self, scheme: QuantScheme, shape: tuple[int, ...], device=None):
        super().__init__()
        self.scheme = scheme
        self.quantized_shape = tuple(shape)  # logical [*lead, out, in]
        specs = tensor_specs(scheme, self.quantized_shape)
        for name, (shp, dtype) in specs.items():
            self.register_buffer(name, torch.empty(shp, dtype=dtype, device=device))
        self._packed_names = tuple(specs)  # fixed by (scheme, shape); read on every forward
        self._kernel_cache: dict = {}

    @property
    def packed_names(self) -> list[str]:
        return list(self._packed_names)

    def packed_tensors(self, index: int | None = None) -> dict[str, torch.Tensor]:
        """The canonical tensors (of one expert when `index` is given; see `experts_sliceable`)."""
        tensors = {name: getattr(self, name) for name in self._packed_names}
        return tensors if index is None else expert_tensors(self.scheme, tensors, index, self.quantized_shape)

    @property
    def experts_sliceable(self) -> bool:
        """Whether one expert's tensors are a slice of the canonical ones (the format decides: not so when
        double-quant blocks of 64 consecutive scales, counted across experts, straddle two experts)."""
        return self.scheme.codec.sliceable(self.scheme, self.quantized_shape)

    def load_packed(self, tensors: dict[str, torch.Tensor]) -> None:
        specs = tensor_specs(self.scheme, self.quantized_shape)
        if set(tensors) != set(specs):
            raise ValueError(f"expected tensors {sorted(specs)}, got {sorted(tensors)}")
        for name, (shp, dtype) in specs.items():
            t = tensors[name]
            if tuple(t.shape) != shp or t.dtype != dtype:
                raise ValueError(f"{name}: expected {dtype} {shp}, got {t.dtype} {tuple(t.shape)}")
            setattr(self, name, t)
        self._kernel_cache.clear()

    def _apply(self, fn, recurse=True):
        # Packed tensors only follow device moves: `model.half()` / `.to(dtype)` must not re-round stored scales.
        saved = {name: self._buffers[name] for name in self.packed_names if self._buffers.get(name) is not None}
        for name in saved:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in saved.items():
                device = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device
                self._buffers[name] = t if t.device == device else t.to(device)
        self._kernel_cache.clear()
        return self

    def _kernel_state(self, device: torch.device, dtype: torch.dtype, index: int | None = None):
        # A cached layout stays valid while each packed tensor is the same object (accelerate's offload hooks swap
        # buffer objects in and out) and unedited (in-place edits, e.g. load_state_dict, bump `_version`; tensors
        # made under inference mode have no counter). Checked on every forward, so kept to identity and versions.
        key = (device, dtype, index)
        hit = self._kernel_cache.get(key)
        if hit is not None and torch.compiler.is_compiling():
            # dynamo cannot trace the identity/version checks: a compiled graph uses the layout an eager call
            # prepared (and is re-traced by dynamo's own guards when the module's tensors are replaced)
            return hit[2], hit[3]
        tensors = [self._buffers[n] for n in self._packed_names]
        if hit is not None and _same_tensors(hit[0], tensors) and hit[1] == _versions(hit[0]):
            return hit[2], hit[3]
        shape = self.quantized_shape[-2:]
        kernel = select_kernel(self.scheme, shape, device, dtype)
        state = kernel.prepare(self.scheme, self.packed_tensors(index), shape, dtype)
        self._kernel_cache = {k: v for k, v in self._kernel_cache.items() if _same_tensors(v[0], tensors)}
        if not _packed_tensors_offloaded(self):
            self._kernel_cache[key] = (tensors, _versions(tensors), kernel, state)
        return kernel, state

    def packed_linear(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x [M, in] @ W^T (of expert `index` when given) with the selected kernel; differentiable in x."""
        kernel, state = self._kernel_state(x.device, x.dtype, index)
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedLinearInputGrad.apply(x, self, index, kernel, state)
        return self._kernel_linear(x, index, kernel, state)

    def _kernel_linear(self, x: torch.Tensor, index, kernel, state) -> torch.Tensor:
        """The kernel's product plus the additive terms (e.g. low-rank factors) the format stores beside the codes."""
        y = kernel.linear(x, state)
        for term in active_terms(self.scheme):
            y = y + term.linear(x, self._term_tensors(term, index))
        return y

    def _term_tensors(self, term, index: int | None) -> dict[str, torch.Tensor]:
        names = term.specs(self.scheme, self.quantized_shape)
        return {n: getattr(self, n) if index is None else getattr(self, n)[index] for n in names}

    def dequantize_weight(self, dtype: torch.dtype = torch.float32, index: int | None = None) -> torch.Tensor:
        """The float weight [*lead, out, in] (one expert's [out, in] when `index` is given)."""
        if index is not None:
            return dequantize_expert(self.scheme, self.packed_tensors(), index, self.quantized_shape, dtype)
        return dequantize(self.scheme, self.packed_tensors(), self.quantized_shape[-1], dtype)

    def kernel_name(self, device=None, dtype=torch.float32) -> str:
        device = torch.device(device) if device is not None else self._buffers["qweight"].device
        return select_kernel(self.scheme, self.quantized_shape[-2:], device, dtype).name

    def _scheme_repr(self) -> str:
        s = self.scheme
        g = "channel" if s.group_size == -1 else f"g{s.group_size}"
        rank = f", lowrank_rank={s.lowrank_rank}" if s.lowrank_rank else ""
        return f"{s.label}, {g}, {s.method}{', double_quant' if s.double_quant else ''}{rank}"


class _PackedLinearInputGrad(torch.autograd.Function):
    """Training through a frozen packed weight (e.g. LoRA): the forward runs the selected kernel; the backward
    dequantizes W from the canonical tensors on the fly for grad_x = grad_y @ W, so no float copy of W is kept
    between forward and backward. Packed weights get no gradient. (The fused CPU kernels' tile layouts cannot be
    multiplied by W^T, hence the module-level function rather than autograd on each kernel op.)"""

    @staticmethod
    def forward(ctx, x, owner, index, kernel, state):
        ctx.owner, ctx.index = owner, index
        return owner._kernel_linear(x, index, kernel, state)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.owner.dequantize_weight(grad.dtype, ctx.index)
        return grad @ weight, None, None, None, None


def _same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    for x, y in zip(a, b):
        if x is not y:
            return False
    return True


def _versions(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(0 if t.is_inference() else t._version for t in tensors)


def _packed_tensors_offloaded(module: nn.Module) -> bool:
    """Whether accelerate offloads this module's buffers (device_map "cpu"/"disk" with `offload_buffers=True`): they
    are then brought in for each forward and dropped after it, and a cached repacked copy would keep them resident."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", [hook])  # a SequentialHook holds several
    return any(getattr(h, "offload", False) and getattr(h, "offload_buffers", False) for h in hooks)


class QuantLinear(PackedWeight):
    """A linear layer y = x W^T + b with W stored packed."""

    source_is_conv1d = False  # replaced a GPT-2 Conv1D (dequantize() gives a Conv1D back)
    # Input rotation x -> x R (hf_quant.algorithms.rotation) when the stored weight is W R; None: no rotation.
    input_rotation = None

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme, device=None, dtype=None):
        super().__init__(scheme, (out_features, in_features), device=device)
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_float(cls, module: nn.Module, scheme: QuantScheme) -> "QuantLinear":
        """Quantize an nn.Linear (or GPT-2 Conv1D) module."""
        from transformers.pytorch_utils import Conv1D

        if isinstance(module, PackedWeight):  # it has no float `weight` to read
            raise ValueError(f"{type(module).__name__} ({module._scheme_repr()}) is already quantized; pass the float "
                             "nn.Linear, or `module.to_float(dtype)` to quantize it again with another scheme")
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise TypeError(f"QuantLinear.from_float quantizes an nn.Linear or a GPT-2 Conv1D, "
                            f"got {type(module).__name__}")
        weight = float_weight_of(module)
        q = cls(weight.shape[1], weight.shape[0], module.bias is not None, scheme, device=weight.device,
                dtype=weight.dtype)
        q.load_packed(quantize(weight, scheme))
        q.source_is_conv1d = isinstance(module, Conv1D)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        y = self.packed_linear(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def to_float(self, dtype: torch.dtype) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        weight = self.dequantize_weight(dtype)
        if self.input_rotation is not None:  # stored W R: the float layer gets W back
            weight = self.input_rotation.inverse(weight.float()).to(dtype)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self._scheme_repr()}"


class QuantExpertWeight(PackedWeight):
    """A fused MoE expert parameter, stored packed as [experts, out, in] (the reduction dimension last).

    Indexing returns one expert's float weight in the parameter's original orientation, so the model's own
    (eager) experts forward runs unchanged: `F.linear(x, self.gate_up_proj[e])`, or `x @ self.gate_up_proj[e]`
    for experts stored transposed ([experts, in, out])."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, scheme: QuantScheme,
                 transposed: bool, device=None, dtype=torch.float32):
        super().__init__(scheme, (num_experts, out_features, in_features), device=device)
        self.transposed = transposed
        self.compute_dtype = dtype

    @staticmethod
    def logical_shape(param_shape: tuple[int, int, int], transposed: bool) -> tuple[int, int, int]:
        e, a, b = param_shape
        return (e, b, a) if transposed else (e, a, b)

    @property
    def shape(self) -> torch.Size:
        e, out, inp = self.quantized_shape
        return torch.Size((e, inp, out) if self.transposed else (e, out, inp))

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self._buffers["qweight"].device

    def __len__(self) -> int:
        return self.quantized_shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        index = int(index)
        w = self.dequantize_weight(self.compute_dtype, index)
        return w.t() if self.transposed else w

    def linear(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """x [..., in] @ W_index^T with the fused kernel (no float copy of the expert)."""
        if not self.experts_sliceable:
            return nn.functional.linear(x, self.dequantize_weight(x.dtype, int(index)))
        return self.packed_linear(x.reshape(-1, self.quantized_shape[-1]), int(index)).reshape(*x.shape[:-1], -1)

    def to_float(self, dtype: torch.dtype) -> nn.Parameter:
        w = self.dequantize_weight(dtype)
        return nn.Parameter(w.transpose(1, 2).contiguous() if self.transposed else w, requires_grad=False)

    def extra_repr(self) -> str:
        e, out, inp = self.quantized_shape
        return f"experts={e}, out_features={out}, in_features={inp}, transposed={self.transposed}, {self._scheme_repr()}"


def float_weight_of(module: nn.Module) -> torch.Tensor:
    """[out, in] weight of an nn.Linear or a GPT-2 Conv1D (whose parameter is stored [in, out])."""
    from transformers.pytorch_utils import Conv1D

    w = module.weight.detach()
    return w.t() if isinstance(module, Conv1D) else w


__all__ = ["PackedWeight", "QuantExpertWeight", "QuantLinear", "float_weight_of"]
