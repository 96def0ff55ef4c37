"""Evolutionary refinement of a bit allocation on calibration loss (EvoPress style).

The knapsack (allocation.py) minimises a sum of per-layer proxy errors; the loss of the quantized model is not such a
sum. Starting from the knapsack's allocation, a (1 + lambda) search mutates it by level switches that keep it within
the same bit budget (one layer to its next more expensive candidate, others to cheaper ones until the budget holds
again), scores each offspring by the language-model loss on calibration sequences with the candidates' dequantized
weights swapped into the float model, and keeps the best. Every score uses the same sequences, so the loss never
rises from the knapsack's (take them from text the evaluation does not read).

Data-free codes only (the candidates are quantized with the config's data-free rounding, as the table was): the
dequantized weight of each (layer, candidate) pair is computed once, when first needed, and cached, so memory grows
to at most one float copy of the allocated weights per candidate (fine for small models; a larger model would keep
packed codes instead).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..formats import dequantize
from .allocation import AllocationResult, LayerTable


@torch.no_grad()
def evolve_allocation(model: nn.Module, table: LayerTable, start: AllocationResult, batches: Sequence[torch.Tensor],
                      generations: int = 40, offspring: int = 6, max_switches: int = 3, seed: int = 0,
                      progress: Callable[[str], None] | None = None) -> AllocationResult:
    """A refinement of `start` (an allocation of `table`'s layers) within its budget, by calibration loss of the
    float causal LM `model` (its allocated nn.Linear weights are swapped and restored; `batches` of token ids)."""
    from . import data_free_scheme, quantize_weight

    if generations < 0 or offspring < 1 or max_switches < 1:
        raise ValueError(f"generations must be >= 0, offspring and max_switches >= 1; got {generations}, "
                         f"{offspring}, {max_switches}")
    if not batches:
        raise ValueError("evolve_allocation needs calibration batches (see allocation.calibration_batches)")
    modules = dict(model.named_modules())
    layers = []
    for name in table.names:
        module = modules.get(name)
        if type(module) is not nn.Linear:
            raise TypeError(f"evolve_allocation swaps nn.Linear weights; {name} is {type(module).__name__}")
        layers.append(module)
    index = {c: k for k, c in enumerate(map(_key, table.candidates))}
    picks = []
    for layer in start.layers:
        if layer.settings is not None:
            picks.append(index[_key(layer.settings)])
    if len(picks) != len(table.names):
        raise ValueError("`start` does not allocate the table's layers (use table.choose(...) of this table)")
    budget = table.budget(start.target_bits)
    # Each layer's candidates by stored bits: a switch moves one step along this ladder.
    ladders = [sorted(range(len(costs)), key=lambda k, c=costs: (c[k], k)) for costs in table.costs]
    originals = [layer.weight.data for layer in layers]
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def weight(j: int, k: int) -> torch.Tensor:
        if (j, k) not in cache:
            w = originals[j]
            scheme = table.schemes[k]
            rounding = data_free_scheme(scheme)
            cache[j, k] = dequantize(scheme, quantize_weight(w, rounding), w.shape[1]).to(w.dtype)
        return cache[j, k]

    def loss(assignment: list[int]) -> float:
        for j, k in enumerate(assignment):
            layers[j].weight.data = weight(j, k)
        total = 0.0
        for ids in batches:
            total += float(model(input_ids=ids, labels=ids).loss)
        return total / len(batches)

    def cost(assignment: list[int]) -> int:
        return sum(table.costs[j][k] for j, k in enumerate(assignment))

    rng = random.Random(seed)

    def mutate(parent: list[int]) -> list[int] | None:
        child = list(parent)
        for _ in range(rng.randint(1, max_switches)):
            up = [j for j in range(len(child)) if ladders[j].index(child[j]) + 1 < len(ladders[j])]
            if not up:
                return None
            j = rng.choice(up)
            child[j] = ladders[j][ladders[j].index(child[j]) + 1]
            down = [i for i in range(len(child)) if i != j and ladders[i].index(child[i]) > 0]
            while cost(child) > budget and down:
                i = rng.choice(down)
                child[i] = ladders[i][ladders[i].index(child[i]) - 1]
                down = [i for i in down if ladders[i].index(child[i]) > 0]
            if cost(child) > budget:
                return None
        return child if child != parent else None

    best = list(picks)
    try:
        best_loss = loss(best)
        for g in range(generations):
            children = [c for c in (mutate(best) for _ in range(offspring)) if c is not None]
            scored = [(loss(c), c) for c in children]
            if scored:
                child_loss, child = min(scored, key=lambda t: t[0])
                if child_loss < best_loss:
                    best, best_loss = child, child_loss
            if progress is not None:
                progress(f"generation {g + 1}/{generations}: calibration loss {best_loss:.4f}")
    finally:
        for layer, w in zip(layers, originals):
            layer.weight.data = w
    result = table.result(start.target_bits, start.sensitivity, best, start.exact)
    result.sensitivity = f"{start.sensitivity} + evolution"
    return result


def _key(settings: dict) -> tuple:
    return tuple(sorted(settings.items()))
