"""Randomised Hadamard rotations of a linear layer's input (QuIP#/QuaRot-style incoherence processing).

A linear y = x W^T is computed as y = (x R) (W R)^T with R orthogonal, so the layer is unchanged at full precision,
but W R spreads every weight outlier over a whole block of columns and is much easier to quantize. Here
R = diag(signs) * blockdiag(H_b) / sqrt(b): random signs (from a recorded seed) and a Walsh-Hadamard matrix of size
b, the largest power of two dividing in_features (at most `MAX_BLOCK`). x R is applied online inside `QuantLinear`
with a fast Walsh-Hadamard transform (O(n log b) per token, no matrix stored); the rotated weight W R is what is
quantized and stored. The checkpoint's config records `rotation` and `rotation_seed`, from which R is rebuilt.

GPTQ sees the rotated layer's Hessian R^T H R.

`fold_residual_rotation` (rotation="residual") is QuaRot's folded form for Llama-style decoders instead: the residual
stream itself is rotated, h -> h R, with nothing computed online. RMSNorm commutes with an orthogonal R once its gain
is folded into the linears that read its output, so: the embedding rows become E R; each RMSNorm gain g is folded
into its readers (q/k/v, gate/up, lm_head: W diag(g), then W R) and set to 1; the linears writing into the stream
(o_proj, down_proj) become R^T W (bias b R). The model is exactly the same function (checked on a probe input), and
the checkpoint simply stores the rotated weights; a tied lm_head is untied first.
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


# Llama-style blocks: each RMSNorm and the linears reading its output; the linears writing into the residual stream.
RESIDUAL_READERS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


@torch.no_grad()
def fold_residual_rotation(model: torch.nn.Module, seed: int, blocks_name: str, blocks) -> None:
    """Rotate `model`'s residual stream in place (see the module docstring); raises, naming the part, for
    architectures where the fold would not be exact."""
    decoder = model.get_submodule(blocks_name.rsplit(".", 1)[0]) if "." in blocks_name else model
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    final_norm = getattr(decoder, "norm", None)
    hidden = embed.weight.shape[1]
    unsupported = f"rotation='residual' folds Llama-style decoders (RMSNorm gains, {RESIDUAL_WRITERS} writing the " \
                  f"residual stream); {type(model).__name__}"
    if final_norm is None or head is None:
        raise ValueError(f"{unsupported} has no final `norm` or no output embedding; use rotation='hadamard'")
    for index, block in enumerate(blocks):
        names = dict(block.named_modules())
        missing = [n for n, readers in RESIDUAL_READERS for n in (n, *readers) if n not in names]
        missing += [n for n in RESIDUAL_WRITERS if n not in names]
        if missing:
            raise ValueError(f"{unsupported}: block {index} lacks {missing}; use rotation='hadamard'")
    norms = [final_norm] + [block.get_submodule(n) for block in blocks for n, _ in RESIDUAL_READERS]
    for norm in norms:
        if getattr(norm, "bias", None) is not None or getattr(norm, "weight", None) is None or \
                norm.weight.shape != (hidden,):
            raise ValueError(f"{unsupported}: {type(norm).__name__} is not a gain-only RMSNorm of width {hidden}; "
                             "use rotation='hadamard'")
    probe = torch.randint(0, embed.weight.shape[0], (1, 16), generator=torch.Generator().manual_seed(seed))
    probe = probe.to(embed.weight.device)
    before = model(probe).logits.float()

    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        getattr(model, "all_tied_weights_keys", {}).pop("lm_head.weight", None)
        for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
    rotation = HadamardRotation(hidden, seed)

    def set_weight(module, value):
        module.weight.data = value.to(module.weight.dtype)

    def read(linear, gain):  # W -> W diag(g) R
        set_weight(linear, rotation.rotate_weight(linear.weight.float() * gain))

    def write(linear):  # W -> R^T W, b -> b R
        set_weight(linear, rotation.rotate_weight(linear.weight.float().t()).t())
        if linear.bias is not None:
            linear.bias.data = rotation(linear.bias.float()).to(linear.bias.dtype)

    set_weight(embed, rotation(embed.weight.float()))
    for block in blocks:
        for norm_name, readers in RESIDUAL_READERS:
            norm = block.get_submodule(norm_name)
            gain = norm.weight.float().clone()
            for name in readers:
                read(block.get_submodule(name), gain)
            norm.weight.data.fill_(1.0)
        for name in RESIDUAL_WRITERS:
            write(block.get_submodule(name))
    read(head, final_norm.weight.float().clone())
    final_norm.weight.data.fill_(1.0)

    after = model(probe).logits.float()
    error = float((after - before).norm() / before.norm().clamp_min(1e-30))
    if not error < 1e-3:
        raise ValueError(f"{unsupported}: the folded model's logits differ from the original's (relative error "
                         f"{error:.2e}; its norms are not plain gain-only RMSNorms?); use rotation='hadamard'")


__all__ = ["HadamardRotation", "fold_residual_rotation", "fwht", "hadamard_block"]
