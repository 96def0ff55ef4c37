"""Compute kernels: custom ops (`ops`), the registry, and the implementations registered with it."""

from . import cpu, ops, reference, ternary, triton, vq  # noqa: F401  (importing registers the kernels; triton's lazily)
from .registry import Kernel, available_kernels, register_kernel, select_kernel

__all__ = ["Kernel", "available_kernels", "register_kernel", "select_kernel"]
