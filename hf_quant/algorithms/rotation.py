"""Randomised Hadamard rotations of a linear layer's input (QuIP#/QuaRot-style incoherence processing).

A linear y = x W^T is computed as y = (x R) (W R)^T with R orthogonal, so the layer is unchanged at full precision,
but W R spreads every weight outlier over a whole block of columns and is much easier to quantize. Here
R = diag(signs) * blockdiag(H_b) / sqrt(b): random signs (from a recorded seed) and a Walsh-Hadamard matrix of size
b, the largest power of two dividing in_features (at most `MAX_BLOCK`). x R is applied online inside `QuantLinear`
with a fast Walsh-Hadamard transform (O(n log b) per token, no matrix stored); the rotated weight W R is what is
quantized and stored. The checkpoint's config records `rotation` and `rotation_seed`, from which R is rebuilt.

GPTQ sees the rotated layer's Hessian R^T H R.
"""

from __future__ import annotations

import math

import torch

MAX_BLOCK = 4096
MIN_BLOCK = 16


def hadamard_block(in_features: int) -> int:
    return min(in_features & -in_features, MAX_BLOCK)


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., n] times blockdiag(H_block) / sqrt(block) (Sylvester order), along the last dimension."""
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    h = 1
    while h < block:
        y = y.view(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[:, :, :, 0, :], y[:, :, :, 1, :]
        y = torch.stack((a + b, a - b), dim=3)
        h *= 2
    return (y.reshape(shape) / math.sqrt(block)).to(x.dtype)


class HadamardRotation:
    """x -> x R for inputs of width `in_features` (R as in the module docstring), and its inverse."""

    def __init__(self, in_features: int, seed: int):
        self.in_features = in_features
        self.block = hadamard_block(in_features)
        if self.block < MIN_BLOCK:
            raise ValueError(
                f"rotation='hadamard' needs in_features divisible by {MIN_BLOCK}; a layer has {in_features}. Keep it "
                "in float (modules_to_not_convert) or use rotation=None"
            )
        g = torch.Generator().manual_seed(seed * 1_000_003 + in_features)
        # Explicitly on the CPU: pre-quantized models are built under a meta-device context.
        self.signs = torch.randint(0, 2, (in_features,), generator=g, device="cpu").float() * 2 - 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fwht(x * self.signs.to(x.device, x.dtype), self.block)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """x -> x R^T (H is symmetric and orthogonal once normalised)."""
        return fwht(x, self.block) * self.signs.to(x.device, x.dtype)

    def rotate_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W [out, in] -> W R, so that (x R) (W R)^T = x W^T."""
        return self(weight.float())

    def rotate_hessian(self, hessian: torch.Tensor) -> torch.Tensor:
        """H -> R^T H R, the Hessian of the rotated inputs x R."""
        return self(self(hessian.float()).t().contiguous())


__all__ = ["HadamardRotation", "fwht", "hadamard_block"]
