"""Fused MoE experts forward for transformers' experts interface (`use_experts_implementation` models: Mixtral,
Qwen3-MoE, ...): both projections of every routed (token, expert) pair in two grouped Triton launches, from the
packed `QuantExpertWeight`s, instead of the eager loop that dequantizes one expert at a time.

The transformers-facing forward that calls it is registered by `hf_quant.integrations.moe` (experts
implementation "hf_quant_triton").
"""

from __future__ import annotations

import torch

from . import TritonKernel


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
