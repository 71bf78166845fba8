"""Bad arguments are refused up front, with errors naming the argument and the value;
good ones that used to be refused or misread (numpy integers, whole floats) are taken."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import slt
from slt import theory, zoo
from slt.checkpoint_jobs import make_jobs
from slt.evidence import estimate_lambda_m, laplace, quadrature_free_energy

TINY = dict(num_chains=2, num_draws=10, num_burnin=2, progress=False)


def _states(k: int = 2) -> list[dict]:
    torch.manual_seed(0)
    return [torch.nn.Linear(2, 1).state_dict() for _ in range(k)]


def _trajectory(checkpoints, **kw):
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=16)
    factory = lambda: torch.nn.Linear(2, 1)  # noqa: E731
    return slt.llc_trajectory(checkpoints, factory, loader, slt.gaussian_nll(1.0), **kw, **TINY)


@pytest.mark.parametrize("steps", [[0.5, 1.7], ["a", "b"], [1, float("nan")], [True, False]])
def test_llc_trajectory_refuses_steps_that_are_not_whole_numbers(steps):
    with pytest.raises(ValueError, match=r"steps must be whole numbers.*got "):
        _trajectory(_states(), steps=steps)


def test_llc_trajectory_refuses_mapping_keys_that_are_not_whole_numbers():
    a, b = _states()
    with pytest.raises(ValueError, match=r"steps \(the mapping's keys\) must be whole .*1\.2"):
        _trajectory({1.2: a, 1.7: b})
    with pytest.raises(TypeError, match="steps must be a sequence of whole numbers, got 5"):
        make_jobs([a, b], steps=5)
    # whole floats and numpy integers are steps
    assert [j.step for j in make_jobs({np.int64(4): a, 7.0: b})] == [4, 7]
    assert [j.step for j in make_jobs([a, b], steps=np.array([20.0, 10.0]))] == [10, 20]


@pytest.mark.parametrize("ns", [(50, 50), (50, 50.5), (100, 100.0)])
def test_evidence_curves_needs_two_distinct_whole_sample_sizes(ns):
    with pytest.raises(
        ValueError, match=r"ns must be (whole numbers >= 3|sample sizes with at least two distinct)"
    ):
        slt.evidence_curves(ns=ns, num_rungs=3, num_chains=2, num_draws=8, num_burnin=2,
                            progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "nbeta, order, need",
    [([100, 100, 100, 100], 2, 3), ([100, 100, 1000, 1000], 2, 3), ([100, 100, 100], 1, 2)],
)
def test_estimate_lambda_m_needs_enough_distinct_nbeta(nbeta, order, need):
    llc = [1.0, 1.1, 0.9, 1.0][: len(nbeta)]
    with pytest.raises(ValueError, match=f"nbeta needs at least {need} distinct values"):
        estimate_lambda_m(nbeta, llc, order=order)


_SIGNALS = {"steps": list(range(10)), "llc": np.arange(10.0), "loss": [2.0] * 10}


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(penalty=-1.0), "penalty must be a finite number >= 0, got -1.0"),
        (dict(penalty=math.nan), "penalty must be a finite number >= 0, got nan"),
        (dict(penalty="high"), "penalty must be a real number, got 'high'"),
        (dict(min_size=0), "min_size must be an integer >= 1, got 0"),
        (dict(min_size=2.5), "min_size must be an integer >= 1, got 2.5"),
        (dict(min_scale=-1), "min_scale must be a finite number >= 0, got -1"),
        (dict(min_scale=math.inf), "min_scale must be a finite number >= 0, got inf"),
    ],
)
def test_detect_transitions_checks_its_options(kw, match):
    with pytest.raises(ValueError, match=match):
        slt.detect_transitions(_SIGNALS, **kw)


def test_detect_transitions_refuses_steps_that_are_not_numbers():
    with pytest.raises(ValueError, match=r"steps must be whole numbers, got \['a', 'b'\]"):
        slt.detect_transitions({"steps": ["a", "b"], "llc": [1.0, 2.0], "loss": [1.0, 1.0]})


def _gaussian(w):
    return (w**2).sum(1) / 2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(prior_std=[1.0, 2.0, 3.0]), r"prior_std must be .* or 2 of them .*shape \(3,\)"),
        (dict(prior_std="wide"), r"prior_std must be a finite number > 0 .*'wide'"),
        (dict(prior_mean=[[0.0, 0.0]]), r"prior_mean must be .* or 2 of them .*shape \(1, 2\)"),
        (dict(breaks=[1.0, 2.0, 3.0]), r"breaks must be finite points: .*shape \(3,\)"),
        (dict(breaks=[1.0, 2.0, 3.0, 4.0]), r"breaks must be finite points: .*shape \(4,\)"),
        (dict(breaks=[[0.0, math.nan]]), r"breaks must be finite points"),
        (dict(max_evals="many"), "max_evals must be an integer >= 1, got 'many'"),
    ],
)
def test_quadrature_checks_shapes_and_budget(kw, match):
    with pytest.raises(ValueError, match=match):
        quadrature_free_energy(_gaussian, n=10, dim=2, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_eigs=0), "num_eigs must be an integer >= 1, got 0"),
        (dict(num_eigs=-5), "num_eigs must be an integer >= 1, got -5"),
        (dict(dense_max=-1), "dense_max must be an integer >= 0, got -1"),
        (dict(dense_max=1.5), "dense_max must be an integer >= 0, got 1.5"),
    ],
)
def test_laplace_checks_num_eigs_and_dense_max(kw, match):
    case = zoo.regular(3, n=64)
    with pytest.raises(ValueError, match=match):
        laplace(case.model, case.loader(), case.loss_fn, **kw)


def test_laplace_goes_dense_when_lanczos_cannot_give_what_is_asked():
    one = zoo.regular(1, n=64)
    res = laplace(one.model, one.loader(), one.loss_fn, dense_max=0)  # eigsh needs d >= 2
    assert (res.method, res.num_unknown) == ("dense", 0)
    three = zoo.regular(3, n=64)
    every = laplace(three.model, three.loader(), three.loss_fn, dense_max=0, num_eigs=3)
    assert (every.method, len(every.eigenvalues)) == ("dense", 3)
    top = laplace(three.model, three.loader(), three.loss_fn, dense_max=0, num_eigs=2)
    assert (top.method, len(top.eigenvalues)) == ("eigsh", 2)


def test_learning_coefficient_takes_numpy_integers():
    c = theory.LearningCoefficient(Fraction(1, 2), np.int64(2))
    assert c == theory.LearningCoefficient(Fraction(1, 2), 2) and type(c.m) is int
    d = theory.LearningCoefficient(np.int64(3), 1)
    assert d.lam == 3 and type(d.lam) is Fraction and type(d.lam.numerator) is int
    with pytest.raises(ValueError, match=r"m must be an integer >= 1, got 2\.0"):
        theory.LearningCoefficient(1, 2.0)


@pytest.mark.parametrize("lam", [0.5, np.float64(0.5)])
def test_learning_coefficient_refuses_a_float_lam_saying_to_pass_a_fraction(lam):
    with pytest.raises(TypeError, match=r"lam must be exact.*float.*pass a Fraction"):
        theory.LearningCoefficient(lam, 1)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: theory.monomial(3), "k must be a sequence of integers >= 0, .*got 3"),
        (lambda: theory.monomial("12"), "k must be a sequence of integers >= 0, .*got '12'"),
        (lambda: theory.monomial([1, 1], h=2), "h must be a sequence of .*got 2"),
        (lambda: theory.deep_linear(5, 0), "widths must be a sequence of integers >= 1.*got 5"),
    ],
)
def test_theory_builders_name_an_argument_that_is_not_a_sequence(call, match):
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize("confidence", ["high", 1.0, 0, float("nan")])
def test_estimate_lambda_m_names_a_bad_confidence(confidence):
    nb = np.geomspace(1e2, 1e6, 9)
    with pytest.raises(ValueError, match="confidence"):
        estimate_lambda_m(nb, 1.5 - 2 / np.log(nb), order=1, confidence=confidence)


@pytest.mark.parametrize("spec", [{"m": 0}, {"m": 0.5}, {"llc_std": -0.1}])
def test_phase_diagram_refuses_a_multiplicity_below_one_or_a_negative_error(spec):
    with pytest.raises(ValueError, match="m must be >= 1 and llc_std >= 0"):
        slt.phase_diagram({"a": {"loss": 0.1, "llc": 1.0} | spec, "b": {"loss": 0.2, "llc": 0.5}},
                          np.geomspace(10, 1e4, 5))  # fmt: skip


def test_estimate_lambda_m_says_why_points_were_left_out():
    nb = np.geomspace(1e2, 1e6, 4)
    with pytest.raises(ValueError, match=r"got 0 \(4 left out .*llc_std=None"):
        estimate_lambda_m(nb, 1.5 - 2 / np.log(nb), np.full(4, np.nan), order=2)


def test_baselines_and_curves_name_a_bad_dtype_or_potential():
    case = slt.zoo.regular(2, n=64)
    for fn in (slt.bic, slt.laplace):  # "Invalid device string"
        with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
            fn(case.model, case.loader(), case.loss_fn, dtype="float64")
    with pytest.raises(ValueError, match="k must be a non-empty sequence"):  # "int not iterable"
        slt.evidence_curves(potential=5, ns=(50, 100), progress=False)
    with pytest.raises(ValueError, match="seed must be an integer"):
        slt.laplace(case.model, case.loader(), case.loss_fn, seed=-1)


def test_evidence_inputs_found_by_a_new_user():
    # each was a bare or misleading error, or silence
    case = zoo.potential((0, 1), n=100)  # k = 0 made the Hessian NaN: "no curvature ... flat"
    loader = torch.utils.data.DataLoader(case.dataset, batch_size=100)
    small = dict(num_chains=2, num_draws=20, num_burnin=5, progress=False)
    res = slt.wbic(case.model, loader, case.loss_fn, prior_std=1.0, **small)
    assert math.isfinite(res.wbic)
    with pytest.raises(ValueError, match="test_loader: yielded no batches"):
        slt.waic(case.model, loader, case.loss_fn, test_loader=[], **small)
    with pytest.raises(ValueError, match=r"prior_std=None \(a flat prior\): F_n .* needs a proper"):
        slt.free_energy(case.model, loader, case.loss_fn, prior_std=None, progress=False)
    with pytest.warns(UserWarning, match="n = 1000, but one pass of the loader holds 100 samples"):
        res = slt.wbic(case.model, loader, case.loss_fn, n=1000, **small)
    assert any("holds 100 samples" in w for w in res.warnings)
