"""Mixed precision under a bit budget: one scheme per layer, chosen by an exact multiple-choice knapsack.

For every layer j and candidate scheme s we know
  cost[j, s]   the true stored bits of layer j under s (codes, scales, zero-points, second-level metadata and any
               extra tensor the format declares: exactly what `tensor_specs` stores), and
  error[j, s]  a sensitivity-weighted reconstruction error of layer j quantized with s:
                 "weight"      sum (W - Q(W))^2                       data-free
                 "activation"  sum_j E[x_j^2] * sum_i (W - Q(W))_ij^2  diagonal of the layer Hessian X^T X
                 "fisher"      sum F_ij (W - Q(W))_ij^2               empirical Fisher (squared loss gradients)
                 "gptq"        tr((W - Q(W)) H (W - Q(W))^T)          Q by GPTQ against the layer Hessian H = X^T X / n:
                                                                      the error of the codes a GPTQ config will store
                 "gptq_fisher" sum F_ij (W - Q(W))_ij^2               the same GPTQ codes, scored by the Fisher
("gptq" is each layer's own output error, which does not say how much that error costs the loss; the Fisher does.
On SmolLM2 at 2.5 bits with GPTQ, "gptq_fisher" allocated best, then "fisher" on data-free codes, then "gptq":
BENCHMARKS.md)
and pick s_j minimising sum_j error[j, s_j] subject to sum_j cost[j, s_j] <= target_bits * n_weights.

The dynamic programme runs over the budget in units of the greatest common divisor of all costs, so it is exact
(not a Lagrangian approximation): the chosen allocation never exceeds the budget and no other allocation within
it has a lower total error. Only when the budget spans more than `MAX_CELLS` units are costs rounded up to a
coarser unit (still never over budget; `AllocationResult.exact` says which).
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..formats import QuantScheme, dequantize, stored_bits

SENSITIVITIES = ("weight", "activation", "fisher", "gptq", "gptq_fisher")
GPTQ_SENSITIVITIES = ("gptq", "gptq_fisher")  # their candidates are quantized by GPTQ
MAX_CELLS = 1 << 22
# Default candidate settings (merged into the config's own settings): double-quantized scales keep the overhead
# low, and group 64 variants give the allocator steps between whole bit widths.
DEFAULT_CANDIDATES: tuple[dict, ...] = (
    {"bits": 2, "group_size": 128, "double_quant": True},
    {"bits": 2, "group_size": 64, "double_quant": True},
    {"bits": 3, "group_size": 128, "double_quant": True},
    {"bits": 3, "group_size": 64, "double_quant": True},
    {"bits": 4, "group_size": 128, "double_quant": True},
    {"bits": 5, "group_size": 128, "double_quant": True},
    {"bits": 6, "group_size": 128, "double_quant": True},
    {"bits": 8, "group_size": 128, "double_quant": True},
)


@dataclass
class LayerChoice:
    name: str
    shape: tuple[int, ...]
    settings: dict | None  # the chosen candidate (None: fixed by the user's config, not allocated)
    scheme: QuantScheme
    bits: int
    error: float


@dataclass
class AllocationResult:
    target_bits: float
    sensitivity: str
    candidates: list[dict]
    layers: list[LayerChoice] = field(default_factory=list)
    exact: bool = True

    @property
    def n_weights(self) -> int:
        return sum(math.prod(layer.shape) for layer in self.layers)

    @property
    def total_bits(self) -> int:
        return sum(layer.bits for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / max(self.n_weights, 1)

    @property
    def total_error(self) -> float:
        return sum(layer.error for layer in self.layers)

    def overrides(self) -> dict[str, dict]:
        """One anchored regex per allocated layer -> its settings, for `HfQuantConfig(overrides=...)`."""
        # The full scheme, not just the candidate's settings: the override then means the same whatever the
        # config's other fields are.
        return {f"^{re.escape(c.name)}$": c.scheme.to_dict() for c in self.layers if c.settings is not None}

    def summary(self) -> str:
        """The allocation as text: the budget, then how many layers (and weights) took each candidate, by layer
        type."""
        lines = [
            f"bit allocation ({self.sensitivity} sensitivity{'' if self.exact else ', coarse DP units'}): "
            f"target {self.target_bits:.4g} bits/weight, achieved {self.bits_per_weight:.4f} "
            f"({self.total_bits:,} bits for {self.n_weights:,} weights)"
        ]
        by_kind: dict[str, Counter] = {}
        for c in self.layers:
            kind = c.name.rsplit(".", 1)[-1]
            by_kind.setdefault(kind, Counter())[scheme_label(c.scheme)] += 1
        for kind, counts in sorted(by_kind.items()):
            lines.append(f"  {kind:<12} " + ", ".join(f"{lab} x{n}" for lab, n in sorted(counts.items())))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "target_bits": self.target_bits,
            "bits_per_weight": self.bits_per_weight,
            "sensitivity": self.sensitivity,
            "exact": self.exact,
            "layers": [
                {"name": c.name, "scheme": scheme_label(c.scheme), "bits_per_weight": c.bits / math.prod(c.shape),
                 "error": c.error, "allocated": c.settings is not None}
                for c in self.layers
            ],
        }


def scheme_label(s: QuantScheme) -> str:
    return s.describe()  # names every non-default field, extension fields (planes, lowrank_rank, ...) included


# --- the knapsack -----------------------------------------------------------------------------------------------


def solve_budget(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int) -> tuple[list[int], bool]:
    """Exact multiple-choice knapsack: one option per item, total cost <= budget, minimum total error.

    Returns (chosen option per item, exact). Raises ValueError when even the cheapest options exceed the budget.
    """
    n = len(costs)
    if n == 0:
        return [], True
    cheapest = sum(min(c) for c in costs)
    if cheapest > budget:
        raise ValueError(f"budget of {budget} bits is below the cheapest allocation ({cheapest} bits)")
    unit = 0
    for row in costs:
        for c in row:
            unit = math.gcd(unit, int(c))
    unit = max(unit, 1)
    exact = budget // unit <= MAX_CELLS
    if not exact:  # round costs up to a coarser unit: never over budget, possibly not optimal
        unit = -(-budget // MAX_CELLS)
    cap = budget // unit
    units = [[-(-int(c) // unit) for c in row] for row in costs]
    dp = np.zeros(cap + 1)  # minimum error of the items so far within a capacity of c units
    choice = np.zeros((n, cap + 1), dtype=np.int16)
    for j in range(n):
        new = np.full(cap + 1, np.inf)
        for s, (u, e) in enumerate(zip(units[j], errors[j])):
            if u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = dp[: cap + 1 - u] + float(e)
            better = cand < new
            new[better] = cand[better]
            choice[j, better] = s
        dp = new
    if not np.isfinite(dp[cap]):  # only possible after rounding costs up
        raise ValueError(f"budget of {budget} bits is too tight for the coarse DP unit ({unit} bits)")
    picks, c = [0] * n, cap
    for j in range(n - 1, -1, -1):
        s = int(choice[j, c])
        picks[j] = s
        c -= units[j][s]
    return picks, exact


# --- sensitivity-weighted errors --------------------------------------------------------------------------------


def weighted_error(weight: torch.Tensor, dequantized: torch.Tensor, importance: torch.Tensor | None) -> float:
    """sum importance * (W - Q(W))^2; `importance` broadcasts to [out, in] ([in]: input second moments)."""
    diff2 = (weight.float() - dequantized.float()).pow(2)
    if importance is not None:
        diff2 = diff2 * importance.float()
    return float(diff2.sum(dtype=torch.float64))


def hessian_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H E^T) with E = W - Q(W): the mean squared output error over the inputs H was measured on."""
    e = (weight.float() - dequantized.float()).double()
    return float(((e @ hessian.double()) * e).sum())


@dataclass
class LayerTable:
    """Cost and error of every candidate for every layer, measured once and solvable for any target."""

    candidates: list[dict]
    schemes: list[QuantScheme]
    names: list[str]
    shapes: list[tuple[int, ...]]
    costs: list[list[int]]
    errors: dict[str, list[list[float]]]  # sensitivity -> [layer][candidate]
    fixed: dict[str, tuple[QuantScheme, tuple[int, ...]]]

    def choose(self, target_bits: float, sensitivity: str = "weight") -> AllocationResult:
        """The exact minimum-error allocation with at most `target_bits` true bits per weight on average."""
        if sensitivity not in self.errors:
            raise ValueError(f"sensitivity {sensitivity!r} was not measured; measured: {sorted(self.errors)}")
        errors = self.errors[sensitivity]
        budget = self.budget(target_bits)
        try:
            picks, exact = solve_budget(self.costs, errors, budget)
        except ValueError as e:
            fixed_bits = sum(stored_bits(sc, shp) for sc, shp in self.fixed.values())
            cheapest = (sum(min(c) for c in self.costs) + fixed_bits) / max(self.n_weights, 1)
            raise ValueError(
                f"target_bits={target_bits} is below what the candidates can reach ({cheapest:.4f} bits per weight "
                f"at the cheapest): raise target_bits or add cheaper candidates ({e})"
            ) from None
        return self.result(target_bits, sensitivity, picks, exact)

    @property
    def n_weights(self) -> int:
        return sum(math.prod(sh) for sh in self.shapes) + sum(math.prod(shp) for _, shp in self.fixed.values())

    def budget(self, target_bits: float) -> int:
        """The bits the allocated layers may take: target_bits per weight over every weight, in exact arithmetic
        (2.5 means 5/2, not the nearest double), floored, less the fixed layers' bits."""
        fixed_bits = sum(stored_bits(sc, shp) for sc, shp in self.fixed.values())
        return math.floor(Fraction(str(target_bits)) * self.n_weights) - fixed_bits

    def result(self, target_bits: float, sensitivity: str, picks: Sequence[int], exact: bool = True) -> AllocationResult:
        """The allocation choosing candidate picks[j] for layer j (errors reported under `sensitivity`)."""
        errors = self.errors[sensitivity]
        result = AllocationResult(float(target_bits), sensitivity, self.candidates, exact=exact)
        for j, name in enumerate(self.names):
            k = picks[j]
            result.layers.append(LayerChoice(name, self.shapes[j], self.candidates[k], self.schemes[k],
                                             self.costs[j][k], errors[j][k]))
        for name, (scheme, shp) in self.fixed.items():
            result.layers.append(LayerChoice(name, tuple(shp), None, scheme, stored_bits(scheme, shp), float("nan")))
        return result


def measure_layers(
    layers: Mapping[str, torch.Tensor] | Callable[[], Iterable[tuple[str, torch.Tensor]]],
    config=None,
    candidates: Sequence[Mapping] | None = None,
    importances: Mapping[str, Mapping[str, torch.Tensor] | None] | None = None,
    fixed: Mapping[str, tuple[QuantScheme, tuple[int, ...]]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> LayerTable:
    """Quantize every layer with every candidate once; record true stored bits and sensitivity-weighted errors.

    layers: name -> float weight [out, in] (or a callable yielding (name, weight) pairs, so weights can be read
        one at a time from disk).
    config: the HfQuantConfig whose fields every candidate inherits, as an override would (default HfQuantConfig()).
    candidates: settings dicts, each a valid override (default: the config's `allocation_candidates`, else
        `DEFAULT_CANDIDATES`).
    importances: sensitivity name -> (layer name -> per-weight importance, [in] or [out, in]; None for "weight";
        the Hessian [in, in] for "gptq", whose candidates are quantized by GPTQ against it; the pair (Hessian,
        Fisher [out, in]) for "gptq_fisher"). Default {"weight": None} (data-free).
    fixed: layers quantized with a scheme not up to the allocator (name -> (scheme, shape)); their bits count.
    """
    from ..config import HfQuantConfig
    from . import data_free_scheme, quantize_weight
    from .gptq import gptq_weight

    importances = {"weight": None} if importances is None else dict(importances)
    for sens, imp in importances.items():
        if sens not in SENSITIVITIES:
            raise ValueError(f"sensitivity must be one of {list(SENSITIVITIES)}, got {sens!r}")
        if sens != "weight" and imp is None:
            raise ValueError(f"sensitivity={sens!r} needs calibration statistics (per-layer importance)")
    config = HfQuantConfig() if config is None else config
    if candidates is None:
        candidates = config.allocation_candidates or DEFAULT_CANDIDATES
    candidates = [dict(c) for c in candidates]
    if not candidates:
        raise ValueError("candidates must list at least one scheme")
    schemes = [config.scheme_with(c) for c in candidates]
    table = LayerTable(candidates, schemes, [], [], [], {sens: [] for sens in importances}, dict(fixed or {}))
    items = layers.items() if isinstance(layers, Mapping) else layers()
    for name, weight in items:
        if weight.dim() != 2:
            raise ValueError(f"allocation handles 2-D weights; {name} has shape {tuple(weight.shape)}")
        rows = {sens: [] for sens in importances}
        for scheme in schemes:
            data_free = [sens for sens in importances if sens not in GPTQ_SENSITIVITIES]
            if data_free:
                rounding = data_free_scheme(scheme)
                deq = dequantize(scheme, quantize_weight(weight, rounding), weight.shape[1])
            for sens in data_free:
                imp = importances[sens]
                rows[sens].append(weighted_error(weight, deq, None if imp is None else imp[name]))
            calibrated = [sens for sens in importances if sens in GPTQ_SENSITIVITIES]
            if calibrated:
                imp = importances[calibrated[0]][name]
                h = imp[0] if calibrated[0] == "gptq_fisher" else imp
                codes = gptq_weight(weight, h, dataclasses.replace(scheme, method="gptq"))  # once for both
                deq_gptq = dequantize(scheme, codes, weight.shape[1])
            if "gptq" in importances:
                rows["gptq"].append(hessian_error(weight, deq_gptq, importances["gptq"][name]))
            if "gptq_fisher" in importances:
                rows["gptq_fisher"].append(weighted_error(weight, deq_gptq, importances["gptq_fisher"][name][1]))
        table.names.append(name)
        table.shapes.append(tuple(weight.shape))
        table.costs.append([stored_bits(scheme, weight.shape) for scheme in schemes])
        for sens, row in rows.items():
            table.errors[sens].append(row)
        if progress is not None:
            progress(name)
    return table


def allocate(
    layers: Mapping[str, torch.Tensor] | Callable[[], Iterable[tuple[str, torch.Tensor]]],
    target_bits: float,
    config=None,
    candidates: Sequence[Mapping] | None = None,
    importance: Mapping[str, torch.Tensor] | None = None,
    sensitivity: str = "weight",
    fixed: Mapping[str, tuple[QuantScheme, tuple[int, ...]]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> AllocationResult:
    """Choose a candidate scheme per layer so the average true bits per weight is at most `target_bits`
    (`measure_layers` then `LayerTable.choose`; `importance` is the one for `sensitivity`)."""
    table = measure_layers(layers, config, candidates, {sensitivity: importance}, fixed, progress)
    return table.choose(target_bits, sensitivity)


# --- calibration statistics (data-aware sensitivities) ----------------------------------------------------------


def calibration_batches(tokenizer, text: str, n_sequences: int = 8, seq_len: int = 512, skip_tokens: int = 0):
    """`n_sequences` consecutive token windows of `text` after its first `skip_tokens` tokens (keep evaluation
    text out of calibration by skipping it), each a [1, seq_len] LongTensor."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0][skip_tokens:]
    if ids.numel() < n_sequences * seq_len:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens after skipping {skip_tokens}; need n_sequences * seq_len = "
            f"{n_sequences * seq_len}: use a longer text or fewer/shorter sequences"
        )
    return [ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0) for i in range(n_sequences)]


@torch.no_grad()
def activation_importance(model: torch.nn.Module, batches, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """E[x_j^2] over calibration tokens for the input of each named linear layer (the diagonal of X^T X / n)."""
    return _input_moments(model, batches, names, lambda x: x.pow(2).sum(0))


def hessian_importance(model: torch.nn.Module, batches, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """X^T X / n over calibration tokens for the input of each named linear layer ([in, in], float32), measured on
    the float model (GPTQ proper measures each layer's inputs after the earlier layers are quantized)."""
    return _input_moments(model, batches, names, lambda x: x.T @ x)


def _input_moments(model: torch.nn.Module, batches, names: Iterable[str], moment) -> dict[str, torch.Tensor]:
    """Mean over calibration tokens of moment(x) for the [tokens, in] input x of each named module."""
    names = set(names)
    sums: dict[str, torch.Tensor] = {}
    counts: Counter = Counter()
    hooks = []

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + moment(x)
            counts[name] += x.shape[0]
        return fn

    for name, module in model.named_modules():
        if name in names:
            hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}


def fisher_importance(model: torch.nn.Module, batches, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal: the mean over calibration sequences of the squared gradient of the language-model
    loss with respect to each named layer's weight (one backward pass per sequence)."""
    modules = dict(model.named_modules())
    params = {name: modules[name].weight for name in names}
    was = {name: p.requires_grad for name, p in params.items()}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        for ids in batches:
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            for name, p in params.items():
                fisher[name] += p.grad.float().pow(2)
    finally:
        model.zero_grad(set_to_none=True)
        for name, p in params.items():
            p.requires_grad_(was[name])
    n = max(len(batches), 1)
    return {name: f / n for name, f in fisher.items()}


# --- models and configs -----------------------------------------------------------------------------------------


def plan_layers(model: torch.nn.Module, config, modules_to_not_convert: Sequence[str]):
    """(names the allocator chooses for, {name: (scheme, shape)} of layers fixed by the config) for a model whose
    quantizable modules are still float (possibly on the meta device). A layer matched by one of the config's
    overrides is fixed: the user chose its scheme (or kept it in float, then it is neither). Fused expert tensors
    are fixed at the config's scheme."""
    from ..model import find_targets

    free, fixed = [], {}
    for t in find_targets(model, config, list(modules_to_not_convert)):
        if not t.experts and not any(re.search(pattern, t.name) for pattern in config.overrides):
            free.append(t.name)
        else:
            fixed[t.name] = (t.scheme, t.shape)
    return free, fixed


def config_with_allocation(config, result: AllocationResult):
    """A copy of `config` whose overrides hold the allocation after the user's own (which keep precedence)."""
    from ..config import HfQuantConfig

    fields = config.to_dict()
    fields.pop("quant_method")
    overrides = [list(pair) for pair in fields["overrides"]]
    # The allocation chooses how each layer is stored; how its codes are computed stays the config's method (the
    # errors were measured data-free, but a GPTQ config must calibrate the allocated layers, not round them).
    overrides += [[pattern, {**settings, "method": config.method}]
                  for pattern, settings in result.overrides().items()]
    fields["overrides"] = overrides
    fields["target_bits"] = result.target_bits
    return HfQuantConfig(**fields)


def measure_model(
    model: torch.nn.Module,
    config,
    sensitivities: Sequence[str] = ("weight",),
    batches=None,
    candidates: Sequence[Mapping] | None = None,
    modules_to_not_convert: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> LayerTable:
    """`measure_layers` over the linear layers of a float `model` (data-aware sensitivities use `batches`, e.g.
    from `calibration_batches`). Layers the config fixes (overrides) or keeps in float are respected."""
    from ..nn.quantized import float_weight_of

    from ..model import modules_kept_float

    skip = modules_kept_float(model, config) if modules_to_not_convert is None else modules_to_not_convert
    free, fixed = plan_layers(model, config, skip)
    for sens in sensitivities:
        if sens not in SENSITIVITIES:
            raise ValueError(f"sensitivity must be one of {list(SENSITIVITIES)}, got {sens!r}")
        if sens != "weight" and batches is None:
            raise ValueError(f"sensitivity={sens!r} needs calibration batches (see calibration_batches)")
    # Each statistic is collected once, however many sensitivities share it (gptq and gptq_fisher both need the
    # Hessians; fisher and gptq_fisher the Fisher).
    collected: dict[str, dict] = {}

    def statistic(kind: str) -> dict:
        if kind not in collected:
            collect = {"activation": activation_importance, "fisher": fisher_importance, "hessian": hessian_importance}
            collected[kind] = collect[kind](model, batches, free)
        return collected[kind]

    importances = {}
    for sens in sensitivities:
        if sens == "weight":
            importances[sens] = None
        elif sens == "gptq_fisher":
            hessians, fisher = statistic("hessian"), statistic("fisher")
            importances[sens] = {name: (hessians[name], fisher[name]) for name in free}
        else:
            importances[sens] = statistic({"gptq": "hessian"}.get(sens, sens))
    modules = dict(model.named_modules())
    weights = {name: float_weight_of(modules[name]) for name in free}
    return measure_layers(weights, config, candidates, importances, fixed, progress)


def allocate_model(model: torch.nn.Module, config, target_bits: float, sensitivity: str = "weight", batches=None,
                   candidates: Sequence[Mapping] | None = None, modules_to_not_convert: Sequence[str] | None = None,
                   progress: Callable[[str], None] | None = None) -> AllocationResult:
    """`measure_model` for one sensitivity, then the allocation for `target_bits`."""
    table = measure_model(model, config, (sensitivity,), batches, candidates, modules_to_not_convert, progress)
    return table.choose(target_bits, sensitivity)


def allocate_from_checkpoint(model: torch.nn.Module, config, checkpoint_files: Sequence[str],
                             modules_to_not_convert: Sequence[str]) -> AllocationResult:
    """Data-free allocation for quantize-on-load: weights are read one at a time from the float checkpoint's
    safetensors files (the model itself is still on the meta device)."""
    from safetensors import safe_open
    from transformers.pytorch_utils import Conv1D

    from ..model.checkpoint import _key_candidates

    if not checkpoint_files:
        raise ValueError("target_bits needs the float checkpoint's safetensors files to measure each layer")
    free, fixed = plan_layers(model, config, modules_to_not_convert)
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    where: dict[str, str] = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"target_bits reads weights from safetensors checkpoints only; got {path}")
        with safe_open(path, framework="pt") as f:
            where.update({key: path for key in f.keys()})

    keys = {name: next((k for k in _key_candidates(f"{name}.weight", prefix) if k in where), None) for name in free}
    for name in [n for n, k in keys.items() if k is None]:
        # No tensor of its own (e.g. an lm_head tied to the embedding): quantized later with the config's scheme,
        # so its bits count as fixed.
        free.remove(name)
        fixed[name] = (config.scheme_for(name), tuple(modules[name].weight.shape))

    def weights():
        for name in free:
            key = keys[name]
            with safe_open(where[key], framework="pt") as f:
                w = f.get_tensor(key).float()
            yield name, (w.t() if isinstance(modules[name], Conv1D) else w)

    with torch.device("cpu"):  # transformers builds the model under a meta-device context
        return allocate(weights, config.target_bits, config, None, None, "weight", fixed)


__all__ = [
    "AllocationResult",
    "LayerTable",
    "measure_layers",
    "measure_model",
    "activation_importance",
    "allocate_from_checkpoint",
    "allocate_model",
    "calibration_batches",
    "config_with_allocation",
    "fisher_importance",
    "plan_layers",
    "DEFAULT_CANDIDATES",
    "LayerChoice",
    "SENSITIVITIES",
    "allocate",
    "solve_budget",
    "stored_bits",
    "weighted_error",
]
