"""Kernel registry: each kernel declares what it supports; the fastest eligible one is chosen.

A kernel turns the canonical stored tensors of one weight matrix into its own in-memory layout (`prepare`)
and computes x @ W^T from it (`linear`). The reference kernel supports everything and is the fallback.
Set HF_QUANT_KERNEL=<name> to force one kernel (an error, not a fallback, if it does not support a layer).
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch

from ..formats.scheme import QuantScheme


class Kernel:
    name: ClassVar[str]
    priority: ClassVar[int]  # higher is preferred among eligible kernels
    # Input dtype -> dtype the kernel computes in, where they differ (declared precision; see each kernel).
    compute_dtypes: ClassVar[dict] = {}

    @classmethod
    def compute_dtype(cls, dtype: torch.dtype) -> torch.dtype:
        return cls.compute_dtypes.get(dtype, dtype)

    @classmethod
    def unsupported_reason(
        cls, scheme: QuantScheme, shape: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> str | None:
        """None when this kernel can run a weight of `shape` (out, in) in `scheme` on `device` in `dtype`."""
        raise NotImplementedError

    @classmethod
    def prepare(cls, scheme: QuantScheme, tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype) -> dict:
        """Repack one matrix's canonical tensors into this kernel's layout (done once, cached by the module)."""
        raise NotImplementedError

    @classmethod
    def linear(cls, x: torch.Tensor, state: dict) -> torch.Tensor:
        """x [M, in] -> [M, out] (no bias)."""
        raise NotImplementedError


_KERNELS: dict[str, type[Kernel]] = {}


def register_kernel(cls: type[Kernel]) -> type[Kernel]:
    if cls.name in _KERNELS:
        raise ValueError(f"kernel {cls.name!r} is already registered")
    _KERNELS[cls.name] = cls
    return cls


def available_kernels() -> dict[str, type[Kernel]]:
    return dict(_KERNELS)


def select_kernel(
    scheme: QuantScheme, shape: tuple[int, int], device: torch.device, dtype: torch.dtype, prefer: str | None = None
) -> type[Kernel]:
    prefer = prefer or os.environ.get("HF_QUANT_KERNEL") or None
    if prefer is not None:
        if prefer not in _KERNELS:
            raise ValueError(f"HF_QUANT_KERNEL={prefer!r} is not a kernel; available: {sorted(_KERNELS)}")
        reason = _KERNELS[prefer].unsupported_reason(scheme, shape, device, dtype)
        if reason is not None:
            raise ValueError(f"kernel {prefer!r} cannot run {scheme} {shape} on {device}/{dtype}: {reason}")
        return _KERNELS[prefer]
    eligible = [k for k in _KERNELS.values() if k.unsupported_reason(scheme, shape, device, dtype) is None]
    if not eligible:
        raise RuntimeError(f"no kernel supports {scheme} {shape} on {device}/{dtype}")
    return max(eligible, key=lambda k: k.priority)
