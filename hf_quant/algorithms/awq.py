"""Activation-aware per-channel scaling (AWQ, Lin et al. 2023), folded into the preceding operation.

Input channels that carry large activations matter most. For a group of linears reading the same input X (after a
norm or a linear), AWQ scales their weight columns by s and divides the input by s, which leaves the float output
unchanged: X W^T = (X / s) (W s)^T. The division is folded into the preceding norm's weight (or the preceding
linear's rows), so inference costs nothing extra. s = mean|X|^alpha (per channel, normalised), and alpha is chosen on
a grid to minimise the group's output error after quantization, ||X W^T - (X / s) Q(W s)^T||^2.

Supported blocks: Llama-style (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, up -> down, and
v -> o when v's outputs are o's inputs, i.e. without grouped-query attention).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..formats import QuantScheme, dequantize_codes, quantize_params

_GRID = 20
# (preceding module, linears reading its output) inside a Llama-style block.
LLAMA_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


def scaling_groups(block: nn.Module, targets: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The (preceding module, linears) pairs of `block` AWQ can fold; raises for blocks it does not know."""
    names = dict(block.named_modules())
    if not all(p in names and all(l in names for l in ls) for p, ls in LLAMA_GROUPS if p.endswith("layernorm")):
        raise ValueError(
            f"AWQ scaling knows Llama-style blocks (input_layernorm, self_attn.q/k/v/o_proj, post_attention_layernorm, "
            f"mlp.gate/up/down_proj); {type(block).__name__} is not one. Use method='gptq' or 'mse'"
        )
    groups = []
    for prev, linears in LLAMA_GROUPS:
        if prev not in names or not all(l in names and l in targets for l in linears):
            continue
        if isinstance(names[prev], nn.Linear) and names[prev].out_features != names[linears[0]].in_features:
            continue  # grouped-query attention: v's outputs are repeated across heads before o
        if not isinstance(names[prev], nn.Linear) and getattr(names[prev], "weight", None) is None:
            continue
        groups.append((prev, linears))
    return groups


def _fake_quantize(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    p = quantize_params(weight, scheme)
    return dequantize_codes(scheme, p.codes, p.scale, p.zero, weight.shape[1])


@torch.no_grad()
def search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], schemes: list[QuantScheme]
) -> tuple[torch.Tensor, float]:
    """Per-input-channel scale s (and its alpha) minimising the quantized output error of `weights` on inputs `x`.

    The grid search quantizes with round-to-nearest (fast); alpha = 0 (s = 1, no scaling) is on the grid, so the
    result is never worse than no scaling on these inputs."""
    x = x.float()
    mean_abs = x.abs().mean(0).clamp_min(1e-5)
    reference = [x @ w.float().t() for w in weights]
    rtn = [dataclasses.replace(s, method="rtn") for s in schemes]
    best, best_alpha, best_scale = float("inf"), 0.0, torch.ones_like(mean_abs)
    for i in range(_GRID):
        alpha = i / _GRID
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref, scheme in zip(weights, reference, rtn):
            wq = _fake_quantize(w.float() * s, scheme) / s
            err += (x @ wq.t() - ref).pow(2).mean().item()
        if err < best:
            best, best_alpha, best_scale = err, alpha, s
    return best_scale, best_alpha


@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Module], scale: torch.Tensor) -> None:
    """Divide `prev`'s output channels by `scale` and multiply the `linears`' input columns by it."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(scale.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(scale.to(prev.bias.dtype))
    else:
        # A norm whose output is proportional to its elementwise weight (Llama's RMSNorm). Checked on a probe, since
        # some norms are not (Gemma's multiplies by 1 + weight): such a fold would change the model.
        probe = torch.randn(4, scale.numel(), dtype=prev.weight.dtype, device=prev.weight.device)
        before = prev(probe).float()
        saved = [p.detach().clone() for p in prev.parameters()]
        prev.weight.div_(scale.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(scale.to(prev.bias.dtype))
        if not torch.allclose(prev(probe).float() * scale, before, rtol=1e-4, atol=1e-5):
            for p, old in zip(prev.parameters(), saved):
                p.copy_(old)
            raise ValueError(f"AWQ cannot fold scales into {type(prev).__name__}: its output is not proportional to "
                             "its weight. Use method='gptq' or 'mse' for this model")
    for layer in linears:
        layer.weight.mul_(scale.view(1, -1).to(layer.weight.dtype))


__all__ = ["LLAMA_GROUPS", "fold_scale", "scaling_groups", "search_scale"]
