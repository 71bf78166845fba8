"""Issue 2's acceptance check: models with known λ outside the zoo defaults (m = 1,
n = 4096, batches of 128, w* an exact empirical minimizer) land within 10% of λ with
``step_size=5e-5, localization=1.0, num_chains=4, num_draws=1500, num_burnin=500``
and every other argument at its default. Data seed 1 (the defaults use seed 0)."""

import pytest

import slt
from slt import zoo

CASES = [
    zoo.regular(8, 2, seed=1),
    zoo.reduced_rank(7, 5, 4, 3, seed=1),
    zoo.deep_linear((6, 3, 3, 6), 3, seed=1),
    zoo.deep_linear((6, 5, 4, 6), 3, seed=1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_lands_within_ten_percent(case):
    assert case.m == 1 and case.n == 4096
    res = slt.estimate_llc(
        case.model, case.loader(128), case.loss_fn, step_size=5e-5, localization=1.0,
        num_chains=4, num_draws=1500, num_burnin=500, progress=False,
    )  # fmt: skip
    assert abs(res.llc / float(case.lam) - 1) < 0.10, str(res)
