"""The fused-experts forward for transformers' experts interface (`use_experts_implementation` models: Mixtral,
Qwen3-MoE, ...): runs packed `QuantExpertWeight`s through the Triton grouped kernel (kernels/triton/experts.py)."""

from __future__ import annotations

import torch

from ..kernels.triton import TritonKernel
from ..kernels.triton.experts import fused_experts
from ..nn import QuantExpertWeight

EXPERTS_IMPLEMENTATION = "hf_quant_triton"


def triton_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
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
    """Add the "hf_quant_triton" experts implementation to transformers' registry (its public extension point,
    `ALL_EXPERTS_FUNCTIONS.register`); a model uses it after `model.set_experts_implementation("hf_quant_triton")`
    (CUDA, triton installed). Idempotent."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, triton_experts_forward)
