"""One processor per calibration method, run by the block loop (loop.py) on every decoder block.

A processor sees a `BlockContext`. In `begin` (before the block runs on the calibration data) it declares the
statistics it needs (input Hessians, input samples, token weights) and may attach hooks of its own; `close` removes
them; in `end` (after the pass) it changes the float block (AWQ's folded scales) or chooses codes for some of the
block's weights (`ctx.packed`), which the loop then packs. Weights no processor coded are rounded data-free.
Model-level steps (a folded rotation, an attention implementation the method needs) go in `prepare` / `restore`.

A new calibration method is a new processor in `PROCESSORS`; the loop does not change.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..algorithms.awq import fold_scale, scaling_groups, search_scale
from ..algorithms.experts import ExpertHessians, quantize_experts_param
from ..algorithms.gptq import cross_validated_damp, gptq_weights
from ..formats import GPTQSettings, QuantScheme
from ..nn import float_weight_of
from .statistics import AttentionImportance, InputCollector, nbytes

logger = logging.getLogger(__name__)


@dataclass
class BlockContext:
    """One decoder block as the processors see it."""

    index: int
    prefix: str  # full name of the block, with a trailing dot
    block: nn.Module
    schemes: dict[str, QuantScheme]  # block-local name -> scheme of each linear to quantize
    modules: dict[str, nn.Module]  # block-local name -> that float linear
    experts: dict[str, dict[str, QuantScheme]]  # block-local experts module -> {3-D parameter: scheme}
    config: object
    rotations: dict[str, object]  # full module name -> its online input rotation
    # Requests (processors' `begin`):
    hessian_of: set[str] = field(default_factory=set)
    hessian_folds: bool = False  # also keep the halves' Hessians (InputCollector.fold_hessians)
    sample_of: set[str] = field(default_factory=set)
    token_weights: object = None  # callable giving the current batch's token weights [batch, tokens], or None
    needs_pass: bool = False  # a processor's own hooks need the calibration pass
    # Results:
    collector: InputCollector | None = None
    packed: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # local name -> canonical tensors
    quantized: int = 0  # weights a processor packed in place (fused experts)
    # full experts module name -> (tokens routed to each expert, tokens in each expert's statistics)
    expert_tokens: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)

    def names_with(self, method: str) -> set[str]:
        return {n for n, s in self.schemes.items() if s.method == method}


class BlockProcessor:
    def prepare(self, model: nn.Module, config, blocks_name: str, blocks: nn.ModuleList) -> None:
        """Once, before the loop."""

    def restore(self, model: nn.Module) -> None:
        """Once, after the loop (also when it fails)."""

    def begin(self, ctx: BlockContext) -> None:
        """Before the block's calibration pass: declare statistics, attach hooks."""

    def close(self, ctx: BlockContext) -> None:
        """After the pass (also when it fails): remove hooks."""

    def end(self, ctx: BlockContext) -> None:
        """After the pass: change the float block, or choose codes (ctx.packed)."""

    def held_bytes(self, ctx: BlockContext) -> int:
        """Statistics it holds after the pass beyond ctx.collector's (the report's calibration peak)."""
        return 0


class ResidualRotation(BlockProcessor):
    """rotation='residual': QuaRot's rotation of the residual stream, folded into the float weights before any block
    is calibrated (hf_quant.algorithms.rotation)."""

    def prepare(self, model, config, blocks_name, blocks):
        if config.rotation == "residual":
            from ..algorithms.rotation import fold_residual_rotation

            fold_residual_rotation(model, config.rotation_seed, blocks_name, blocks)


class AwqScales(BlockProcessor):
    """AWQ: activation-aware per-channel scales, searched on a sample of each group's inputs and folded into the
    preceding norm/linear; the scaled weights are then rounded data-free by the loop."""

    def begin(self, ctx):
        ctx.sample_of |= ctx.names_with("awq")

    def end(self, ctx):
        names = ctx.names_with("awq")
        if not names:
            return
        for prev, linears in scaling_groups(ctx.block, names):
            layers = [ctx.block.get_submodule(n) for n in linears]
            scale, _ = search_scale(ctx.collector.sample(linears[0]), [float_weight_of(m) for m in layers],
                                    [ctx.schemes[n] for n in linears])
            fold_scale(ctx.block.get_submodule(prev), layers, scale)


class TokenWeighting(BlockProcessor):
    """RSQ (token_weighting='attention'): each token's row of the Hessians weighted by the attention it receives in
    the block; calibration runs with eager attention, the only implementation returning attention probabilities."""

    def __init__(self):
        self._importance: AttentionImportance | None = None
        self._attn_implementation = None

    def prepare(self, model, config, blocks_name, blocks):
        if config.token_weighting is not None:
            self._attn_implementation = model.config._attn_implementation
            model.set_attn_implementation("eager")

    def restore(self, model):
        if self._attn_implementation is not None and model.config._attn_implementation != self._attn_implementation:
            model.set_attn_implementation(self._attn_implementation)

    def begin(self, ctx):
        if ctx.config.token_weighting is not None:
            self._importance = AttentionImportance(ctx.block)
            ctx.token_weights = self._importance.take

    def close(self, ctx):
        if self._importance is not None:
            self._importance.remove()
            self._importance = None


class Gptq(BlockProcessor):
    """GPTQ: the linears reading one input share its Hessian (rotated for an online rotation) and are coded by their
    format's GPTQ rounding (hf_quant.algorithms.gptq), stacked into one pass where the format allows it."""

    def begin(self, ctx):
        ctx.hessian_of |= ctx.names_with("gptq")
        ctx.hessian_folds |= ctx.config.damp == "cv" and bool(ctx.names_with("gptq"))

    def end(self, ctx):
        config = ctx.config
        cv = config.damp == "cv"
        settings = GPTQSettings(damp=0.01 if cv else config.damp, act_order=config.act_order,
                                static_groups=config.static_groups, refit_scales=config.refit_scales)
        groups: dict[str, list[str]] = {}
        for n in ctx.names_with("gptq"):
            groups.setdefault(ctx.collector.leader[n], []).append(n)
        for leader, names in groups.items():
            rotation = ctx.rotations.get(ctx.prefix + leader)
            folds = ctx.collector.fold_hessians(leader) if cv else None
            hessian = ctx.collector.hessian(leader)
            ctx.collector.release(leader)  # held by `hessian` until this group is solved, no longer
            if rotation is not None:  # every member shares in_features, hence the rotation
                hessian = rotation.rotate_hessian(hessian)
                folds = folds and tuple(rotation.rotate_hessian(h) for h in folds)
            by_scheme: dict[QuantScheme, list[str]] = {}
            for name in names:
                by_scheme.setdefault(ctx.schemes[name], []).append(name)
            for scheme, members in by_scheme.items():
                weights = [float_weight_of(ctx.modules[m]).float() for m in members]
                if rotation is not None:
                    weights = [rotation.rotate_weight(w) for w in weights]
                chosen = settings
                if cv:
                    damp, errors = cross_validated_damp(weights, folds, scheme, settings)
                    chosen = dataclasses.replace(settings, damp=damp)
                    logger.info("%s%s: damp %g (cross-validated errors %s)", ctx.prefix, "/".join(members), damp,
                                ", ".join(f"{e:.4g}" for e in errors))
                ctx.packed.update(zip(members, gptq_weights(weights, hessian, scheme, chosen)))
                del weights
            del hessian, folds


class FusedExperts(BlockProcessor):
    """Fused MoE expert tensors: GPTQ per expert on the tokens routed to it, or on every token with
    moe_calibrate_all_experts (statistics from the experts' own hooks), data-free for experts no token reached and
    for data-free schemes; packed in place, so the loop's pass to
    the next block already runs them quantized."""

    def __init__(self):
        self._stats: dict[str, ExpertHessians] = {}

    def begin(self, ctx):
        calibrated = [n for n, ps in ctx.experts.items() if any(s.method == "gptq" for s in ps.values())]
        if ctx.config.damp == "cv" and calibrated:
            raise ValueError(f"damp='cv' is not implemented for fused MoE expert tensors ({ctx.prefix}{calibrated[0]}): "
                             "their Hessians are per expert; give damp a number")
        all_tokens = ctx.config.moe_calibrate_all_experts
        self._stats = {n: ExpertHessians(ctx.prefix + n, ctx.block.get_submodule(n), all_tokens)
                       for n, ps in ctx.experts.items() if any(s.method == "gptq" for s in ps.values())}
        ctx.needs_pass |= bool(self._stats)

    def close(self, ctx):
        for stats in self._stats.values():
            stats.remove()

    def held_bytes(self, ctx):
        # per expert X^T X of its inputs and intermediates: 128 experts of Qwen3-30B-A3B hold 2.4 GiB per block
        return sum(nbytes(h for sums in stats.sums.values() for h in sums if h is not None)
                   for stats in self._stats.values())

    def end(self, ctx):
        config = ctx.config
        gptq_kwargs = dict(damp=config.damp, act_order=config.act_order, static_groups=config.static_groups)
        for n, stats in self._stats.items():
            ctx.expert_tokens[ctx.prefix + n] = (list(stats.routed), list(stats.counts))
        for n, schemes in ctx.experts.items():
            module = ctx.block.get_submodule(n)
            for pname, scheme in schemes.items():
                q = quantize_experts_param(module, pname, scheme, self._stats.get(n), gptq_kwargs)
                del module._parameters[pname]
                module.add_module(pname, q)
                ctx.quantized += 1
        self._stats = {}


# In order: AWQ folds its scales into the float block before GPTQ reads any weight of it.
PROCESSORS = (ResidualRotation, AwqScales, TokenWeighting, Gptq, FusedExperts)
