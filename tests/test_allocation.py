"""Mixed precision under a bit budget (hf_quant.algorithms.allocation): exact knapsack, sensitivity ordering,
the budget met with true stored bits, and the allocation saved/reloaded as config overrides."""

import itertools
import json
import math

import pytest
import torch
from extreme_helpers import check_round_trip, tiny_llama_folder
from transformers import AutoModelForCausalLM

from hf_quant import HfQuantConfig
from hf_quant.algorithms import quantize_weight
from hf_quant.algorithms.allocation import allocate, solve_budget, stored_bits
from hf_quant.eval.storage import model_storage
from hf_quant.formats import QuantScheme, bits_per_weight

CANDIDATES = [{"bits": 2, "group_size": 32}, {"bits": 3, "group_size": 32}, {"bits": 4, "group_size": 32},
              {"bits": 8, "group_size": -1}]


def test_solve_budget_is_exact_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        n, k = 4, 3
        costs = torch.randint(1, 40, (n, k), generator=gen).mul(7).tolist()  # a common unit of 7: exact DP
        errors = torch.rand(n, k, generator=gen, dtype=torch.float64).tolist()
        budget = int(torch.randint(sum(min(c) for c in costs), sum(max(c) for c in costs) + 1, (1,), generator=gen))
        picks, exact = solve_budget(costs, errors, budget)
        assert exact
        assert sum(costs[j][s] for j, s in enumerate(picks)) <= budget
        best = min(
            sum(errors[j][s] for j, s in enumerate(combo))
            for combo in itertools.product(range(k), repeat=n)
            if sum(costs[j][s] for j, s in enumerate(combo)) <= budget
        )
        assert sum(errors[j][s] for j, s in enumerate(picks)) == pytest.approx(best, rel=1e-12), trial


def test_solve_budget_rejects_an_impossible_budget():
    with pytest.raises(ValueError, match="below the cheapest"):
        solve_budget([[10, 20], [10, 30]], [[1.0, 0.0], [1.0, 0.0]], 19)


def test_stored_bits_counts_every_tensor():
    s = QuantScheme(bits=3, group_size=64, double_quant=True)
    assert stored_bits(s, (96, 200)) == pytest.approx(bits_per_weight(s, (96, 200)) * 96 * 200)


def test_more_sensitive_layer_gets_more_bits(one_thread):
    torch.manual_seed(0)
    weights = {"a": torch.randn(32, 64), "b": torch.randn(32, 64)}
    target = (stored_bits(QuantScheme(bits=2, group_size=32), (32, 64))
              + stored_bits(QuantScheme(bits=4, group_size=32), (32, 64))) / (2 * 32 * 64)
    for hot, cold in (("a", "b"), ("b", "a")):
        importance = {hot: torch.full((64,), 100.0), cold: torch.ones(64)}
        result = allocate(weights, target, candidates=CANDIDATES[:3], importance=importance, sensitivity="activation")
        chosen = {c.name: c.scheme.bits for c in result.layers}
        assert chosen[hot] > chosen[cold], chosen
        assert result.bits_per_weight <= target


def test_allocation_beats_every_uniform_choice_within_budget(one_thread):
    torch.manual_seed(1)
    # Layers of different scales: a uniform width wastes bits on the easy ones.
    weights = {f"l{i}": torch.randn(48, 64) * (0.1 + i) for i in range(4)}
    result = allocate(weights, 3.0, candidates=CANDIDATES)
    assert result.bits_per_weight <= 3.0
    for cand in CANDIDATES:
        uniform = allocate(weights, 16, candidates=[cand])
        if uniform.bits_per_weight <= 3.0:
            assert result.total_error <= uniform.total_error


def test_infeasible_target_names_the_field(one_thread):
    with pytest.raises(ValueError, match="target_bits=1.5 is below"):
        allocate({"w": torch.randn(16, 64)}, 1.5, candidates=CANDIDATES[:1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_bits": 0.5}, "target_bits"),
        ({"target_bits": "2.5"}, "target_bits"),
        ({"target_bits": True}, "target_bits"),
        ({"allocation_candidates": []}, "allocation_candidates"),
        ({"allocation_candidates": [{"bits": 7}]}, r"allocation_candidates\[0\]"),
        ({"allocation_candidates": [{"bitz": 2}]}, "unknown setting"),
    ],
)
def test_config_validates_allocation_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HfQuantConfig(**kwargs)


def test_config_round_trips_allocation_fields():
    config = HfQuantConfig(target_bits=2.5, allocation_candidates=CANDIDATES)
    again = HfQuantConfig.from_dict(json.loads(config.to_json_string()))
    assert again == config and again.target_bits == 2.5


def test_quantize_on_load_meets_budget_and_reloads(tmp_path, one_thread):
    tiny_llama_folder(tmp_path / "float")
    # A user override keeps its layers fixed (and counted); the rest are allocated.
    config = HfQuantConfig(target_bits=4.0, group_size=32, allocation_candidates=CANDIDATES,
                           overrides={r"layers\.0\.mlp\.down_proj": {"bits": 8, "group_size": -1}})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
    storage = model_storage(model)
    assert storage.bits_per_weight <= 4.0
    assert storage.bits_per_weight > 3.9  # the budget is used, not left on the table
    saved = model.config.quantization_config
    assert len(saved.overrides) == 1 + 13  # the user's, then one per allocated layer
    assert next(iter(saved.overrides)) == r"layers\.0\.mlp\.down_proj"
    assert model.model.layers[0].mlp.down_proj.scheme.bits == 8
    assert len({m.scheme for m in storage_modules(model)}) > 1  # really mixed

    check_round_trip(model, tmp_path / "quant")


def storage_modules(model):
    from hf_quant.nn import PackedWeight

    return [m for m in model.modules() if isinstance(m, PackedWeight)]


def test_allocation_is_within_one_layer_of_the_target(one_thread):
    torch.manual_seed(2)
    weights = {f"l{i}": torch.randn(64, 128) for i in range(6)}
    for target in (3.25, 4.1, 5.0):
        result = allocate(weights, target, candidates=CANDIDATES)
        assert result.bits_per_weight <= target
        # The unused budget is less than one step between the candidates of a single layer.
        costs = sorted({stored_bits(QuantScheme(**{"bits": 4, **c}), (64, 128)) for c in CANDIDATES})
        step = max(b - a for a, b in zip(costs, costs[1:]))
        assert (target * result.n_weights - result.total_bits) < step + math.ulp(1.0)


def test_cli_flags_reach_the_config():
    from hf_quant.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["quantize", "--out", "x", "--target-bits", "2.5", "--lowrank-rank", "4"])
    config = _config_from_args(args)
    assert config.target_bits == 2.5 and config.lowrank_rank == 4
    args = build_parser().parse_args(["quantize", "--out", "x", "--format", "ternary", "--planes", "2"])
    assert _config_from_args(args).default_scheme.planes == 2


@pytest.mark.parametrize("sensitivity", ["fisher", "gptq_fisher", "fisher+evolve"])
def test_cli_data_aware_sensitivity(tmp_path, sensitivity):
    """--sensitivity fisher (or gptq_fisher) measures the float model on calibration text, then allocates under
    --target-bits (and --evolve refines that allocation on calibration loss)."""
    sensitivity, _, evolve = sensitivity.partition("+")
    import json

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_quant.assets import smollm2_path
    from hf_quant.cli import main

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "float")
    tok.save_pretrained(tmp_path / "float")
    (tmp_path / "cal.txt").write_text("Calibration text about quantization and rounding errors. " * 200)
    rc = main(["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q"), "--target-bits", "3.0",
               "--sensitivity", sensitivity, "--calibration", str(tmp_path / "cal.txt"), "--n-samples", "2",
               "--seq-len", "32", "--group-size", "32", "--eval-tokens", "0", "--json", str(tmp_path / "r.json"),
               *(["--method", "gptq"] if sensitivity == "gptq_fisher" else []), *(["--evolve", "2"] if evolve else [])])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["bits_per_weight"] <= 3.0
    assert report["config"]["target_bits"] == 3.0 and report["config"]["overrides"]  # the allocation is recorded
    with pytest.raises(SystemExit, match="--target-bits"):
        main(["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q2"), "--sensitivity", sensitivity])
    if evolve:  # evolution scores data-free codes: refused for a GPTQ config, with the fix
        with pytest.raises(SystemExit, match="--evolve"):
            main(["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q4"), "--sensitivity", sensitivity,
                  "--target-bits", "3.0", "--evolve", "2", "--method", "gptq"])
    if sensitivity == "gptq_fisher":  # GPTQ codes scored, data-free codes stored: refused with the fix
        with pytest.raises(SystemExit, match="--method gptq"):
            main(["quantize", str(tmp_path / "float"), "--out", str(tmp_path / "q3"), "--sensitivity", sensitivity,
                  "--target-bits", "3.0"])


def test_allocated_layers_keep_the_configs_method(one_thread):
    """The allocation picks formats from data-free errors; a GPTQ config must still calibrate those layers."""
    from hf_quant.algorithms.allocation import config_with_allocation

    torch.manual_seed(0)
    weights = {"model.layers.0.mlp.up_proj": torch.randn(32, 64), "model.layers.0.mlp.down_proj": torch.randn(32, 64)}
    result = allocate(weights, 3.0, candidates=CANDIDATES[:3])
    config = config_with_allocation(HfQuantConfig(method="gptq", bits=4, group_size=32), result)
    assert config.overrides and all(settings["method"] == "gptq" for settings in config.overrides.values())
    for name in weights:
        assert config.scheme_for(name).method == "gptq"


def test_gptq_sensitivity_measures_the_codes_gptq_stores(one_thread):
    """sensitivity="gptq" (and "gptq_fisher"): each candidate is quantized by GPTQ against the layer's Hessian and
    scored by the output error tr(E H E^T), which is that of `gptq_weight`'s codes exactly, and below data-free
    rounding's in the same metric where inputs are correlated. With such inputs on one layer only, that layer gets
    the bits."""
    from hf_quant.algorithms.allocation import hessian_error, measure_layers, weighted_error
    from hf_quant.algorithms.gptq import gptq_weight
    from hf_quant.formats import dequantize

    gen = torch.Generator().manual_seed(2)
    weights = {"a": torch.randn(32, 64, generator=gen), "b": torch.randn(32, 64, generator=gen)}
    x = torch.randn(512, 8, generator=gen) @ torch.randn(8, 64, generator=gen) + 0.05 * torch.randn(512, 64,
                                                                                                    generator=gen)
    loud = x.T @ x / 512
    hessians = {"a": loud, "b": 1e-3 * torch.eye(64)}
    fisher = {name: torch.rand(32, 64, generator=gen) for name in weights}
    table = measure_layers(weights, HfQuantConfig(), CANDIDATES[:3],
                           {"gptq": hessians, "weight": None,
                            "gptq_fisher": {n: (hessians[n], fisher[n]) for n in weights}})
    for j, name in enumerate(table.names):
        for k, scheme in enumerate(table.schemes):
            gptq = dequantize(scheme, gptq_weight(weights[name], hessians[name],
                                                  QuantScheme(**{**scheme.to_dict(), "method": "gptq"})), 64)
            assert table.errors["gptq"][j][k] == pytest.approx(hessian_error(weights[name], gptq, hessians[name]))
            # "gptq_fisher": the same GPTQ codes, scored by the Fisher
            assert table.errors["gptq_fisher"][j][k] == pytest.approx(weighted_error(weights[name], gptq, fisher[name]))
            rounded = dequantize(scheme, quantize_weight(weights[name], scheme), 64)
            data_free = hessian_error(weights[name], rounded, hessians[name])
            if name == "a":  # error feedback pays with correlated inputs
                assert table.errors["gptq"][j][k] < 0.9 * data_free
            else:  # an isotropic Hessian leaves GPTQ nothing to feed back: the same codes
                assert table.errors["gptq"][j][k] == pytest.approx(data_free)
    target = (stored_bits(QuantScheme(bits=2, group_size=32), (32, 64))
              + stored_bits(QuantScheme(bits=4, group_size=32), (32, 64))) / (2 * 32 * 64)
    chosen = {c.name: c.scheme.bits for c in table.choose(target, "gptq").layers}
    assert chosen["a"] > chosen["b"], chosen


def test_measure_model_collects_each_statistic_once(tmp_path, one_thread, monkeypatch):
    """gptq, gptq_fisher and fisher together: one pass for the Hessians and one for the Fisher, and the shared
    Hessians score as each layer's own would."""
    from hf_quant.algorithms import allocation

    calls = []
    for name in ("hessian_importance", "fisher_importance"):
        real = getattr(allocation, name)
        monkeypatch.setattr(allocation, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_folder(tmp_path / "f")).eval()
    batches = [torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))]
    config = HfQuantConfig(method="gptq")
    table = allocation.measure_model(model, config, ("gptq", "gptq_fisher", "fisher"), batches,
                                     candidates=CANDIDATES[:2])
    assert sorted(calls) == ["fisher_importance", "hessian_importance"]
    for name in table.names[:3]:
        plain = allocation.measure_layers(
            {name: dict(model.named_modules())[name].weight.detach()}, config, CANDIDATES[:2],
            {"gptq": {name: allocation.hessian_importance(model, batches, [name])[name]}})
        assert table.errors["gptq"][table.names.index(name)] == pytest.approx(plain.errors["gptq"][0])


def test_evolution_refines_within_the_budget_and_restores_the_model(tmp_path, one_thread):
    """evolve_allocation keeps the budget, never ends above the knapsack's calibration loss, leaves the float
    model's weights as they were, and names what it cannot swap."""
    from hf_quant.algorithms.allocation import measure_model
    from hf_quant.algorithms.evolution import evolve_allocation
    from hf_quant.formats import dequantize

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_folder(tmp_path / "f")).eval()
    batches = [torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    table = measure_model(model, HfQuantConfig(), ("weight",), candidates=CANDIDATES[:3])
    start = table.choose(3.0, "weight")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def loss(result):  # the model with every allocated layer at its chosen candidate, dequantized
        modules = dict(model.named_modules())
        saved = {c.name: modules[c.name].weight.data for c in result.layers}
        for c in result.layers:
            w = saved[c.name]
            modules[c.name].weight.data = dequantize(c.scheme, quantize_weight(w, c.scheme), w.shape[1])
        value = sum(float(model(input_ids=ids, labels=ids).loss) for ids in batches) / len(batches)
        for name, w in saved.items():
            modules[name].weight.data = w
        return value

    evolved = evolve_allocation(model, table, start, batches, generations=6, offspring=4, seed=1)
    assert evolved.bits_per_weight <= 3.0
    assert loss(evolved) <= loss(start) + 1e-6
    assert evolved.sensitivity == "weight + evolution" and len(evolved.layers) == len(start.layers)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="calibration batches"):
        evolve_allocation(model, table, start, [])
