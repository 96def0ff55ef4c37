"""GPTQ's least-squares refit of group scales (and fractional zero-points) with its codes kept
(hf_quant.solvers.gptq.refit_group_params, config field `refit_scales`), checked against a dense reference solve."""

from __future__ import annotations

import pytest
import torch

from hf_quant import HfQuantConfig
from hf_quant.algorithms.gptq import gptq_quantize
from hf_quant.formats import QuantScheme
from hf_quant.formats.scalar import dequantize_codes, pack, round_params, unpack
from hf_quant.solvers.gptq import refit_group_params

from test_calibration import correlated_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    H = hessian.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    return H


def dense_reference(weight, H, unit, g, with_offset):
    """Per row, the normal equations of the explicit design matrix (one column per group's scale, one per offset)."""
    rows, cols = weight.shape
    n_groups = -(-cols // g)
    group_of = torch.arange(cols) // g
    onehot = torch.nn.functional.one_hot(group_of, n_groups).double()  # [cols, G]
    H = H.double()
    out = []
    for r in range(rows):
        design = unit[r].double().unsqueeze(1) * onehot
        if with_offset:
            design = torch.cat([design, -onehot], 1)
        out.append(torch.linalg.solve(design.t() @ H @ design, design.t() @ H @ weight[r].double()))
    out = torch.stack(out)
    return out[:, :n_groups], (out[:, n_groups:] if with_offset else None)


@pytest.mark.parametrize("cols,g", [(200, 64), (96, 32), (130, 130)])  # short last group; exact groups; one group
@pytest.mark.parametrize("with_offset", [True, False])
def test_refit_solves_the_normal_equations(cols, g, with_offset):
    torch.manual_seed(cols + g)
    rows = 7
    n_groups = -(-cols // g)
    unit = torch.randint(0, 16, (rows, cols)).float() - (0 if with_offset else 8)
    # a weight near what the codes decode to under other parameters, so the optimum has positive scales
    true_scale = (torch.rand(rows, n_groups) + 0.5).repeat_interleave(g, 1)[:, :cols]
    weight = unit * true_scale - (1.0 if with_offset else 0.0) + 0.5 * torch.randn(rows, cols)
    x = correlated_inputs(4 * cols, cols, 11)
    hessian = x.t() @ x / x.shape[0]
    scale = torch.rand(rows, n_groups) * 0.2 + 0.05
    offset = torch.rand(rows, n_groups) if with_offset else None
    s, o, before, after = refit_group_params(weight, hessian, unit, g, scale, offset, damp=0.01, rowwise=True)
    ref_s, ref_o = dense_reference(weight, damped(hessian, 0.01), unit, g, with_offset)
    assert (ref_s > 0).all()  # so every row takes the exact optimum
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-3, atol=1e-5)
    if with_offset:
        torch.testing.assert_close(o.double(), ref_o, rtol=1e-3, atol=1e-4)
    assert after < before


def layer_error(weight, hessian, scheme, params) -> torch.Tensor:
    E = weight - dequantize_codes(scheme, params.codes, params.scale, params.zero, weight.shape[1])
    return ((E @ hessian) * E).sum(-1)


SCHEMES = [
    dict(bits=4, group_size=128),  # fractional zero-points (the half-quadratic fit): scale and zero refitted
    dict(bits=3, group_size=64),  # integer zero-points: kept, scales refitted
    dict(bits=4, group_size=64, symmetric=True),
    dict(bits=4, group_size=64, double_quant=True),  # 8-bit scale codes: refitted for the whole weight or not at all
    dict(format="nf4", bits=4, group_size=64),
]


@pytest.mark.parametrize("settings", SCHEMES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_refit_lowers_gptq_error_keeps_codes_and_storage(settings):
    torch.manual_seed(0)
    out_f, in_f = 40, 200
    weight = torch.randn(out_f, in_f)
    x_cal, x_test = correlated_inputs(1024, in_f, 1), correlated_inputs(1024, in_f, 2)
    hessian = x_cal.t() @ x_cal / x_cal.shape[0]
    scheme = QuantScheme(method="gptq", **settings)
    plain = gptq_quantize(weight, hessian, scheme, refit_scales=False)
    refit = gptq_quantize(weight, hessian, scheme, refit_scales=True)
    assert torch.equal(plain.codes, refit.codes)
    e_plain, e_refit = layer_error(weight, hessian, scheme, plain), layer_error(weight, hessian, scheme, refit)
    # no row gets worse on the calibration inputs (the damped objective is what is minimised: a small slack)
    assert (e_refit <= e_plain * (1 + 1e-3)).all()
    # Measured: 6.5-10% lower calibration error on these layers; 3% fails if the refit stops doing much.
    assert e_refit.sum() < 0.97 * e_plain.sum(), (float(e_refit.sum()), float(e_plain.sum()))
    # and it generalises: lower output error on held-out inputs of the same distribution
    def held_out(p):
        E = weight - dequantize_codes(scheme, p.codes, p.scale, p.zero, in_f)
        return float(((x_test @ E.t()) ** 2).mean())
    assert held_out(refit) < held_out(plain)
    # parameters are exactly what storage holds: packing and unpacking returns them unchanged
    back = unpack(scheme, pack(scheme, refit), in_f)
    assert torch.equal(back.scale, refit.scale)
    if refit.zero is not None:
        assert torch.equal(back.zero, refit.zero)
        if settings["bits"] == 3:  # integer zero-points stay integers (exportable to GPTQ / compressed-tensors)
            assert torch.equal(refit.zero, plain.zero)
    assert (refit.scale > 0).all()


def test_refit_never_keeps_a_worse_row():
    """A row whose refit would not lower its error keeps its old parameters (here: codes already optimal for the
    starting scale, so the starting point is the optimum up to rounding)."""
    torch.manual_seed(3)
    rows, cols, g = 5, 64, 32
    unit = torch.randint(0, 16, (rows, cols)).float()
    scale = torch.full((rows, 2), 0.125)
    offset = torch.full((rows, 2), 0.125 * 8)
    weight = unit * 0.125 - 1.0  # decodes exactly
    x = correlated_inputs(256, cols, 4)
    s, o, before, after = refit_group_params(weight, x.t() @ x, unit, g, scale, offset,
                                             round_params=lambda s, o: round_params(QuantScheme(bits=4), s, o))
    assert after <= before
    torch.testing.assert_close(s, scale)
    torch.testing.assert_close(o, offset)


def test_refit_scales_config_field():
    assert HfQuantConfig(method="gptq").refit_scales is False
    assert HfQuantConfig(method="gptq", refit_scales=True).to_dict()["refit_scales"] is True
    with pytest.raises(ValueError, match="refit_scales"):
        HfQuantConfig(method="gptq", refit_scales="yes")
