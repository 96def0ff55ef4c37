"""GPTQ for fused MoE experts (transformers v5 experts modules: 3-D `gate_up_proj` / `down_proj` parameters).

Each expert is a pair of linears seeing only the tokens routed to it, so each gets its own Hessians: the inputs of
`gate_up_proj[e]` are the hidden states of the tokens whose top-k includes e, and the inputs of `down_proj[e]` are
act(gate) * up computed from them with the float weights. A hook on the experts module accumulates both while the
block runs on the calibration batches; on the first batch it also recomputes the module's output from these pieces
and refuses (naming the module) when they do not reproduce it, i.e. an experts module of another layout.

Experts that no calibration token reached have no statistics: they are quantized data-free (the `mse` search), and
how many were is logged. With `all_tokens` (HfQuantConfig.moe_calibrate_all_experts) every expert's statistics come
from every token instead, as if each token were routed to each expert (the module's output, and so the next block's
input, still follows the router). `seen` counts, per expert, the tokens its statistics came from; `routed` the tokens
the router sent it. Double-quantized scales are fitted per 3-D tensor, which per-expert GPTQ cannot honour:
refused with the fix.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..formats import QuantScheme
from ..nn import QuantExpertWeight

logger = logging.getLogger(__name__)


def _expert_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]):]]
    if any(v is None for v in values):
        raise ValueError(f"hf_quant: {type(module).__name__}.forward was not called with {names}; its experts cannot "
                         "be calibrated (set quantize_experts=False or use a data-free method)")
    return tuple(values)


def _weight(module: nn.Module, pname: str, e: int) -> torch.Tensor:
    """Expert e's float weight of parameter `pname` as [out, in]."""
    w = getattr(module, pname)[e].float()
    return w.t() if module.is_transposed else w


def _intermediate(module: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    gu = x @ _weight(module, "gate_up_proj", e).t()
    if module.has_gate:
        gate, up = gu.chunk(2, dim=-1)
        return module.act_fn(gate) * up
    return module.act_fn(gu)


class ExpertHessians:
    """Per-expert input Hessians of one experts module's `gate_up_proj` ("in") and `down_proj` ("mid")."""

    def __init__(self, name: str, module: nn.Module, all_tokens: bool = False):
        if not all(hasattr(module, p) for p in ("gate_up_proj", "down_proj", "act_fn")):
            raise ValueError(f"hf_quant: experts module {name} ({type(module).__name__}) lacks gate_up_proj / down_proj "
                             "/ act_fn; its experts cannot be calibrated (set quantize_experts=False or use a "
                             "data-free method)")
        self.name, self.module = name, module
        n = module.gate_up_proj.shape[0]
        self.sums = {"in": [None] * n, "mid": [None] * n}
        self.counts = [0] * n  # tokens in each expert's statistics
        self.routed = [0] * n  # tokens the router sent to each expert
        self.all_tokens = all_tokens
        self.checked = False
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        hidden, top_k_index, top_k_weights = _expert_inputs(module, args, kwargs)
        x = hidden.detach().reshape(-1, hidden.shape[-1]).float()
        index = top_k_index.reshape(x.shape[0], -1)
        rebuilt = torch.zeros_like(x) if not self.checked else None
        for e in range(len(self.counts)):
            hit = index == e
            rows = hit.any(-1)
            n_routed = int(rows.sum())
            self.routed[e] += n_routed
            if self.all_tokens:
                mid_all = _intermediate(module, x, e)
                for key, value in (("in", x), ("mid", mid_all)):
                    h = value.t() @ value
                    self.sums[key][e] = h if self.sums[key][e] is None else self.sums[key][e].add_(h)
                self.counts[e] += x.shape[0]
            if not n_routed:
                continue
            xe = x[rows]
            if not self.all_tokens:
                mid = _intermediate(module, xe, e)
                for key, value in (("in", xe), ("mid", mid)):
                    h = value.t() @ value
                    self.sums[key][e] = h if self.sums[key][e] is None else self.sums[key][e].add_(h)
                self.counts[e] += xe.shape[0]
            elif rebuilt is not None:
                mid = mid_all[rows]
            if rebuilt is not None:
                gate = (top_k_weights.reshape(index.shape).float() * hit).sum(-1)[rows]
                rebuilt[rows] += (mid @ _weight(module, "down_proj", e).t()) * gate.unsqueeze(-1)
        if rebuilt is not None:
            self.checked = True
            reference = output.detach().reshape(rebuilt.shape).float()
            error = float((rebuilt - reference).norm() / reference.norm().clamp_min(1e-30))
            # The module computes in its own dtype: a bfloat16 model's output alone differs by ~5e-3 from the float32
            # rebuild. A different layout (gate and up swapped, another activation) differs by order 1.
            if not error < max(1e-3, 8 * torch.finfo(output.dtype).eps):
                raise ValueError(
                    f"hf_quant: the experts of {self.name} ({type(module).__name__}) do not follow the gate_up -> act "
                    f"-> down layout GPTQ assumes (relative difference {error:.2e}); set quantize_experts=False or "
                    "use a data-free method"
                )

    def hessian(self, pname: str, e: int) -> torch.Tensor | None:
        """Mean X^T X of expert e's inputs to `pname`, or None when no calibration token reached it."""
        total = self.sums["mid" if pname == "down_proj" else "in"][e]
        return None if total is None else total / self.counts[e]

    def remove(self) -> None:
        self._handle.remove()


def quantize_experts_param(module: nn.Module, pname: str, scheme: QuantScheme, hessians: ExpertHessians | None,
                           gptq_kwargs: dict) -> QuantExpertWeight:
    """The packed QuantExpertWeight of `module.<pname>`: GPTQ per expert where `hessians` has statistics (and the
    scheme's method is gptq), data-free otherwise."""
    from . import data_free_scheme, quantize_weight
    from .gptq import gptq_weight

    param = getattr(module, pname)
    transposed = bool(module.is_transposed)
    e_count, out, in_features = QuantExpertWeight.logical_shape(tuple(param.shape), transposed)
    calibrated = scheme.method == "gptq" and hessians is not None
    if calibrated and scheme.double_quant:
        raise ValueError(f"method='gptq' on fused experts ({pname}) cannot use double_quant=True (its 8-bit scale "
                         f"codes span the whole 3-D tensor); add overrides={{{pname!r}: {{'double_quant': False}}}}")
    data_free = data_free_scheme(scheme)
    if not calibrated:
        weight = param.detach().float()
        packed = quantize_weight(weight.transpose(1, 2) if transposed else weight, data_free)
    else:
        parts, unseen = [], 0
        for e in range(e_count):
            w = _weight(module, pname, e)
            h = hessians.hessian(pname, e)
            if h is None:
                unseen += 1
                parts.append(quantize_weight(w, data_free))
            else:
                parts.append(gptq_weight(w, h, scheme, **gptq_kwargs))
        if unseen:
            logger.warning("hf_quant: %d of %d experts of %s.%s saw no calibration token; quantized data-free",
                           unseen, e_count, hessians.name, pname)
        packed = {k: torch.stack([p[k] for p in parts]).contiguous() for k in parts[0]}
    q = QuantExpertWeight(e_count, out, in_features, scheme, transposed, device=param.device, dtype=param.dtype)
    q.load_packed(packed)
    return q.requires_grad_(False)


__all__ = ["ExpertHessians", "quantize_experts_param"]
