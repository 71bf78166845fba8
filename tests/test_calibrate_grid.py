"""Calibration of the localization γ and of nβ (slt.calibrate with grids), where the
right choice is known exactly: a Gaussian regression sampled full batch, whose expected
λ̂ is ½ Σ_i nβq_i/(nβq_i + γ) over the eigenvalues q_i of XᵀX/n."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import slt

sys.path.insert(0, str(Path(__file__).parent))
from _regression import regression as _regression  # noqa: E402


@pytest.fixture(scope="module")
def regression():
    model, data, q = _regression(scales=(1.0,) * 40)
    return model, torch.utils.data.DataLoader(data, batch_size=len(data)), q


def expected_llc(q, nbeta, gamma):
    return 0.5 * float(np.sum(nbeta * q / (nbeta * q + gamma)))


def test_localization_grid_takes_the_largest_gamma_that_leaves_llc_unchanged(regression):
    # Exact λ̂(γ) at nβ = n/log n: γ = 1 → 19.86, γ = 3 → 19.59 (1.4 % lower: within the
    # 5 % tolerance), γ = 30 → 16.53 (17 % lower: biased). The rule must take γ = 3.
    model, loader, q = regression
    cal = slt.calibrate(model, loader, slt.gaussian_nll(1.0), localization=[30, 1, 3],
                        progress=False)  # fmt: skip
    nb = cal.nbeta
    assert expected_llc(q, nb, 1) / expected_llc(q, nb, 3) - 1 < 0.02
    assert expected_llc(q, nb, 1) / expected_llc(q, nb, 30) - 1 > 0.15
    assert cal.localization == 3
    assert [t.localization for t in cal.grid] == [1, 3, 30]
    assert [t.chosen for t in cal.grid] == [False, True, False]
    assert any("off the smallest γ" in r for r in cal.grid[2].reasons)
    # every comparison ran at the same reduced step ε·nβ
    assert len({t.comparison_step_size * t.nbeta for t in cal.grid}) == 1
    assert "localization γ and nβ" in str(cal)
    json.dumps(cal.to_dict())


def test_nbeta_grid_takes_the_smallest_nbeta_where_llc_has_levelled_off(regression):
    # Exact λ̂(nβ) at γ = 1: nβ = 10 → 18.12, 100 → 19.79 (+9 %), 1000 → 19.98 (+1 %).
    model, loader, q = regression
    cal = slt.calibrate(model, loader, slt.gaussian_nll(1.0), nbeta=[10, 100, 1000],
                        progress=False)  # fmt: skip
    assert expected_llc(q, 100, 1) / expected_llc(q, 10, 1) - 1 > 0.08
    assert expected_llc(q, 1000, 1) / expected_llc(q, 100, 1) - 1 < 0.01
    assert cal.nbeta == 100
    assert not cal.warnings
    assert any("below the next nβ" in r for r in cal.grid[0].reasons)
    # the calibration of the chosen setting is the one returned: its step size scales as 1/nβ
    chosen = next(t for t in cal.grid if t.chosen)
    assert cal.step_size == chosen.step_size


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"localization": []}, ValueError, "localization as a grid"),
        ({"localization": [1.0, -2.0]}, ValueError, "localization as a grid"),
        ({"nbeta": [10.0, 0.0]}, ValueError, "nbeta as a grid"),
        ({"nbeta": [10.0, 10.0]}, ValueError, "repeated"),
        ({"localization": "large"}, TypeError, "localization must be a number"),
        ({"localization": [1.0, True]}, TypeError, "localization as a grid must hold numbers"),
        ({"num_candidates": 0}, ValueError, "num_candidates must be an integer >= 1, got 0"),
        ({"max_stiff_bias": 0.0}, ValueError, "max_stiff_bias must be .* > 0 and < 1, got 0.0"),
        ({"max_stiff_bias": -0.01}, ValueError, "max_stiff_bias must be .* > 0"),
        ({"min_acceptance": 2.0}, ValueError, "min_acceptance must be .* <= 1, got 2.0"),
        ({"flat_tolerance": -1.0}, ValueError, "flat_tolerance must be .* > 0, got -1.0"),
        ({"num_draws": 0}, ValueError, "num_draws must be an integer >= 4, got 0"),
        ({"max_pilot_steps": 0}, ValueError, "max_pilot_steps must be an integer >= 1"),
        ({"grid_draws": 1}, ValueError, "grid_draws must be an integer >= 4"),
    ],
)
def test_bad_grids_are_refused_by_name(regression, kwargs, error, match):
    model, loader, _ = regression
    with pytest.raises(error, match=match):
        slt.calibrate(model, loader, slt.gaussian_nll(1.0), progress=False, **kwargs)


def test_numpy_scalars_and_arrays_are_a_value_and_a_grid(regression):
    # a numpy scalar or 0-d array is one value, as in estimate_llc; a 1-d array is a grid
    from slt.calibrate_grid import as_grid

    for value in (np.float32(1.0), np.int64(1), np.array(100.0), 3, 2.5):
        assert as_grid("nbeta", value) is None
    assert as_grid("localization", np.geomspace(1, 100, 3)) == [1.0, 10.0, 100.0]
    model, loader, _ = regression
    one = dict(step_sizes=[1e-4], num_draws=20, num_burnin=5, progress=False)
    plain = slt.calibrate(model, loader, slt.gaussian_nll(1.0), localization=1.0, nbeta=50.0,
                          **one)  # fmt: skip
    numpy = slt.calibrate(model, loader, slt.gaussian_nll(1.0), localization=np.array(1.0),
                          nbeta=np.float32(50.0), **one)  # fmt: skip
    assert (numpy.localization, numpy.nbeta, numpy.step_size) == (
        plain.localization,
        plain.nbeta,
        plain.step_size,
    )
    assert numpy.candidates[0].llc == plain.candidates[0].llc


def test_a_setting_whose_every_pilot_diverges_fails_and_the_grid_goes_on():
    # γ = 0 lets every pilot walk into the NaN region; the grid raised DivergenceError
    # without naming the γ, though γ = 1000 calibrates alone
    case = slt.zoo.regular(2, n=128)

    def loss_fn(model, batch):  # NaN once w0 > 1.2 (w* has w0 = 1)
        return case.loss_fn(model, batch) + torch.where(model[0].weight[0, 0] > 1.2, math.nan, 0.0)

    kw = dict(num_draws=50, num_candidates=2, grid_chains=2, grid_draws=50, progress=False)
    cal = slt.calibrate(case.model, case.loader(32), loss_fn, localization=[0.0, 1000.0], **kw)
    lost, kept = cal.grid
    assert lost.localization == 0.0 and not lost.passed
    assert lost.reasons[0].startswith("every pilot diverged (calibration:")
    assert kept.chosen and cal.localization == 1000.0
    with pytest.raises(slt.DivergenceError, match="every pilot diverged at every"):
        slt.calibrate(case.model, case.loader(32), loss_fn, localization=[0.0, 1e-3], **kw)
