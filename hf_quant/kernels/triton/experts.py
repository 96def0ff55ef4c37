"""Fused MoE experts forward for transformers' experts interface (`use_experts_implementation` models: Mixtral,
Qwen3-MoE, ...): both projections of every routed (token, expert) pair in two grouped Triton launches, from the
packed `QuantExpertWeight`s, instead of the eager loop that dequantizes one expert at a time.

Registered as experts implementation "hf_quant_triton"; a model uses it after
`model.set_experts_implementation("hf_quant_triton")` (CUDA, triton installed).
"""

from __future__ import annotations

import torch

from . import TritonKernel

EXPERTS_IMPLEMENTATION = "hf_quant_triton"


def fused_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  gate_up_state: dict, down_state: dict, apply_gate) -> torch.Tensor:
    """sum_j w[t, j] * down_e(apply_gate(gate_up_e(x[t]))) with e = top_k_index[t, j], from Triton states prepared
    over all experts; `apply_gate` maps [S, 2 * intermediate] to [S, intermediate]."""
    tokens, top_k = top_k_index.shape
    h = TritonKernel.moe_linear(hidden_states, top_k_index, gate_up_state)  # [T, top_k, 2 * intermediate]
    h = apply_gate(h.reshape(tokens * top_k, -1))
    # each (token, slot) row now has its own input: route the rows themselves, one expert each
    y = TritonKernel.moe_linear(h, top_k_index.reshape(-1, 1), down_state).view(tokens, top_k, -1)
    return (y.float() * top_k_weights.unsqueeze(-1).float()).sum(1).to(hidden_states.dtype)


def triton_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    from ...nn import QuantExpertWeight

    # (transformers releases before 5.2x have no has_post_expert_norm)
    if self.has_bias or getattr(self, "has_post_expert_norm", False) or not self.has_gate:
        raise NotImplementedError(f"experts implementation {EXPERTS_IMPLEMENTATION!r} supports gated experts without "
                                  f"bias or post-expert norm; use set_experts_implementation('eager') for this model")
    states = []
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(self, name)
        if not isinstance(weight, QuantExpertWeight):
            raise TypeError(f"experts implementation {EXPERTS_IMPLEMENTATION!r} needs quantized experts; {name} is "
                            f"{type(weight).__name__}")
        selected = weight.kernel_name(hidden_states.device, hidden_states.dtype)
        if selected != TritonKernel.name:
            raise RuntimeError(f"experts implementation {EXPERTS_IMPLEMENTATION!r} needs the triton kernel, but "
                               f"{name} on {hidden_states.device}/{hidden_states.dtype} selects {selected!r}: "
                               "use a CUDA device with triton installed, or set_experts_implementation('eager')")
        # index None: one state over all experts, cached by the module like any layer's
        states.append(weight._kernel_state(hidden_states.device, hidden_states.dtype)[1])
    return fused_experts(hidden_states, top_k_index, top_k_weights, *states, self._apply_gate)


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, triton_experts_forward)
