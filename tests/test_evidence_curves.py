"""evidence_curves and `slt evidence`: F_n over n, and the slope that BIC gets wrong."""

from __future__ import annotations

import json
import math

import pytest
import torch

import slt
from slt.evidence import evidence_curves, plot_evidence
from slt.evidence.curves import fit_slope


def test_the_slope_of_the_free_energy_is_lambda_not_half_d_on_a_singular_model():
    # a²b⁴: λ = 1/4, m = 1, d/2 = 1. F_n - n L_n(0) = λ log n + O(1): the exact slope over
    # n = 10²..10⁴ is 0.23 (quadrature); BIC's is d/2 = 1 and Laplace's 0 (zero Hessian at 0).
    curves = evidence_curves(ns=(100, 1000, 10000), num_rungs=9, num_chains=4, num_draws=150,
                             num_burnin=40, progress=False)  # fmt: skip
    exact, _ = curves.slopes["exact"]
    ti, ti_se = curves.slopes["thermodynamic"]
    assert abs(exact - 0.25) < 0.03
    assert abs(ti - exact) < 3 * ti_se and ti_se < 0.1
    assert ti < 0.5 < 1.0 - 4 * ti_se  # far from d/2
    assert curves.slopes["bic"] == pytest.approx((1.0, 0.0), abs=1e-9)
    assert abs(curves.slopes["laplace"][0]) < 1e-9
    wb, wb_se = curves.slopes["wbic"]
    assert abs(wb - exact) < 4 * wb_se + 0.1  # WBIC - F_n = O(√log n): its slope wanders more
    for i in range(3):  # each F_n within its stated error of the exact one
        assert abs(curves.thermodynamic[i] - curves.exact[i]) < 3 * curves.thermodynamic_error[i]
    text = str(curves)
    assert "slope in log n" in text and "BIC 1.000" in text
    print(text)


def test_fit_slope_weights_by_the_errors():
    x = [0.0, 1.0, 2.0]
    assert fit_slope(x, [0.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == pytest.approx((1.0, math.sqrt(0.5)))
    slope, _ = fit_slope(x, [0.0, 1.0, 5.0], [0.1, 0.1, 100.0])  # the noisy point barely counts
    assert slope == pytest.approx(1.0, abs=1e-3)


def test_evidence_curves_for_a_users_model_uses_prefixes_of_its_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, generator=g)
    y = x @ torch.tensor([[0.5], [-1.0]]) + torch.randn(300, 1, generator=g)
    model = torch.nn.Linear(2, 1, bias=False)
    import slt

    curves = evidence_curves(model, torch.utils.data.TensorDataset(x, y), slt.gaussian_nll(1.0),
                             ns=(50, 300), num_rungs=5, num_chains=2, num_draws=20,
                             num_burnin=5, progress=False)  # fmt: skip
    assert curves.lam is None and curves.num_params == 2 and list(curves.ns) == [50, 300]
    assert all(math.isnan(v) for v in curves.exact)
    assert curves.slopes["bic"] == pytest.approx((1.0, 0.0), abs=1e-9)
    with pytest.raises(ValueError, match="dataset"):
        evidence_curves(model, torch.utils.data.TensorDataset(x, y), slt.gaussian_nll(1.0),
                        ns=(50, 400), progress=False)  # fmt: skip
    pytest.importorskip("matplotlib")
    fig = plot_evidence(curves)
    assert fig.axes and fig.axes[0].get_xscale() == "log"


def test_slt_evidence_command_prints_the_table_and_writes_the_files(tmp_path):
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from slt.cli import app

    out = tmp_path / "ev"
    args = ["evidence", "--ns", "50,200", "--num-rungs", "5", "--num-chains", "2",
            "--num-draws", "20", "--num-burnin", "5", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "slope in log n" in result.output and "n = 200" in result.output
    table = json.loads((out / "table.json").read_text(), parse_constant=_refuse)  # strict
    assert table["ns"] == [50, 200]
    assert table["slopes"]["bic"] == pytest.approx([1.0, 0.0], abs=1e-9)
    if (out / "evidence.png").exists():
        assert (out / "evidence.png").stat().st_size > 1000
    bad = CliRunner().invoke(app, ["evidence", "--ns", "x", "--out", str(out)])
    assert bad.exit_code == 2
    alone = CliRunner().invoke(app, ["evidence", "--model", "a.py:f", "--out", str(out)])
    assert alone.exit_code == 2 and "--data" in alone.output
    two = CliRunner().invoke(app, ["evidence", "--num-rungs", "2", "--out", str(out)])
    assert two.exit_code == 2 and "--num-rungs" in two.output  # the ladder needs 3
    (tmp_path / "w.pt").write_bytes(b"")
    for option, value in (("--checkpoint", tmp_path / "w.pt"), ("--loss", "x.py:f"),
                          ("--sigma", "2")):  # fmt: skip
        alone = CliRunner().invoke(app, ["evidence", option, str(value), "--out", str(out)])
        text = " ".join(alone.output.replace("│", " ").split())
        assert alone.exit_code == 2 and f"{option} applies to your model" in text


def _refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_evidence_curves_carry_the_warnings_of_their_runs():
    # the TI, WBIC and Laplace runs' warnings were dropped: the table read as clean
    case = slt.zoo.regular(2, n=128)
    curves = slt.evidence_curves(case.model, case.dataset, case.loss_fn, ns=(64, 128),
                                 num_rungs=3, num_chains=6, num_draws=40, num_burnin=10,
                                 progress=False, seed=0)  # fmt: skip
    loader = torch.utils.data.DataLoader(case.dataset, batch_size=128, shuffle=True)
    wb = slt.wbic(
        case.model,
        loader,
        case.loss_fn,
        num_chains=6,
        num_draws=40,
        num_burnin=10,
        seed=1,
        progress=False,
    )  # what evidence_curves runs at n = 128
    assert [f"n = 128, WBIC: {w}" for w in wb.warnings] == [
        w for w in curves.warnings if w.startswith("n = 128, WBIC: ")]  # fmt: skip
    assert curves.warnings and all(f"warning: {w}" in str(curves) for w in curves.warnings)
    assert curves.to_dict()["warnings"] == list(curves.warnings)
