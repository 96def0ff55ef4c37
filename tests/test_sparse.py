"""Sparse outliers (formats/sparse.py): layout and true bits, the sparse add exact against a
dense scatter, outliers reproduced, the forward against the reference, save/reload/generate."""

import dataclasses

import pytest
import torch
from extreme_helpers import check_round_trip, tiny_llama_folder
from transformers import AutoModelForCausalLM

from hf_quant import HfQuantConfig
from hf_quant.algorithms import quantize_weight
from hf_quant.formats import QuantScheme, bits_per_weight, dequantize, tensor_specs
from hf_quant.formats.sparse import SPARSE_OUTLIERS
from hf_quant.nn import QuantLinear


def outlier_weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    idx = torch.randint(0, inp, (out, 2), generator=g)
    return w.scatter(-1, idx, torch.randn(out, 2, generator=g).sign() * 0.5)  # two large weights per row


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_specs_and_true_bits():
    s = QuantScheme(bits=3, group_size=64, outliers_per_row=4)
    specs = tensor_specs(s, (97, 200))
    assert specs["outlier_cols"] == ((97, 4), torch.int16)
    assert specs["outlier_values"] == ((97, 4), torch.float16)
    base = dataclasses.replace(s, outliers_per_row=0)
    assert bits_per_weight(s, (97, 200)) == pytest.approx(bits_per_weight(base, (97, 200)) + 32 * 4 / 200)
    assert "outliers_per_row" not in base.to_dict()


def test_sparse_add_is_exact():
    """The term's forward equals x @ S^T with S the dense scatter, exactly for exactly representable values."""
    torch.manual_seed(0)
    cols = torch.stack([torch.randperm(203)[:5].sort().values for _ in range(31)]).to(torch.int16)
    values = (torch.randint(-8, 9, (31, 5)).float() / 4).half()
    tensors = {"outlier_cols": cols, "outlier_values": values}
    scheme = QuantScheme(outliers_per_row=5)
    dense = SPARSE_OUTLIERS.dense(scheme, tensors, 203)
    assert int((dense != 0).sum()) == int((values != 0).sum())
    x = torch.randint(-4, 5, (7, 203)).float()
    assert torch.equal(SPARSE_OUTLIERS.linear(x, tensors), x @ dense.t())


def test_sparse_add_in_slices_for_long_inputs(monkeypatch):
    """Past GATHER_ELEMENTS the gather runs in slices of k: the same exact result, with a bounded block."""
    import hf_quant.formats.sparse as sparse

    torch.manual_seed(1)
    cols = torch.stack([torch.randperm(203)[:7].sort().values for _ in range(31)]).to(torch.int16)
    values = (torch.randint(-8, 9, (31, 7)).float() / 4).half()
    tensors = {"outlier_cols": cols, "outlier_values": values}
    x = torch.randint(-4, 5, (40, 203)).float()
    whole = SPARSE_OUTLIERS.linear(x, tensors)
    monkeypatch.setattr(sparse, "GATHER_ELEMENTS", 40 * 31 * 3)  # slices of 3, 3 and 1
    assert torch.equal(SPARSE_OUTLIERS.linear(x, tensors), whole)
    assert torch.equal(whole, x @ SPARSE_OUTLIERS.dense(QuantScheme(outliers_per_row=7), tensors, 203).t())


def test_outliers_are_kept_and_help(one_thread):
    w = outlier_weight(64, 192)
    plain = QuantScheme(bits=3, group_size=64)
    s = dataclasses.replace(plain, outliers_per_row=2)
    t = quantize_weight(w, s)
    rows = torch.arange(64).unsqueeze(1)
    big = w.abs().topk(2, -1).indices
    assert torch.equal(t["outlier_cols"].long().sort(-1).values, big.sort(-1).values)
    deq = dequantize(s, t, 192)
    assert torch.allclose(deq[rows, big], w[rows, big], atol=1e-3)  # float16 residual of a 0.5 weight
    e0 = rel_err(dequantize(plain, quantize_weight(w, plain), 192), w)
    assert rel_err(deq, w) < 0.5 * e0


@pytest.mark.parametrize("tokens", [1, 29])
@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, group_size=32, outliers_per_row=3),
                                    QuantScheme(bits=2, group_size=64, outliers_per_row=1, lowrank_rank=2),
                                    QuantScheme(format="ternary", bits=2, group_size=64, outliers_per_row=2)])
def test_forward_matches_reference(scheme, tokens, one_thread):
    lin = torch.nn.Linear(203, 45)
    with torch.no_grad():
        lin.weight.copy_(outlier_weight(45, 203, seed=tokens))
    q = QuantLinear.from_float(lin, scheme)
    x = torch.randn(tokens, 203)
    ref = x @ q.dequantize_weight().t() + q.bias
    assert rel_err(q(x), ref) < 2e-2
    no_term = x @ dequantize(dataclasses.replace(scheme, outliers_per_row=0), q.packed_tensors(), 203).t() + q.bias
    assert rel_err(no_term, ref) > 5e-2


def test_bad_settings():
    with pytest.raises(ValueError, match="outliers_per_row"):
        HfQuantConfig(outliers_per_row=-2)
    with pytest.raises(ValueError, match="exceeds in_features"):
        quantize_weight(torch.randn(4, 8), QuantScheme(bits=4, group_size=32, outliers_per_row=9))


def test_save_reload_generate(tmp_path, one_thread):
    config = HfQuantConfig(bits=2, group_size=32, outliers_per_row=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_folder(tmp_path / "float"), quantization_config=config)
    assert model.model.layers[0].mlp.down_proj.outlier_cols.shape == (64, 2)
    reloaded = check_round_trip(model, tmp_path / "quant")
    assert torch.equal(reloaded.model.layers[1].mlp.up_proj.outlier_cols, model.model.layers[1].mlp.up_proj.outlier_cols)
