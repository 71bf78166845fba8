"""``slt validate``: table, files, exit status."""

import json
import subprocess
import sys
from dataclasses import replace
from fractions import Fraction

import pytest
from typer.testing import CliRunner

from slt import validate as validate_mod
from slt import zoo
from slt.cli import app


def _tiny(lam=None):
    s = zoo.Settings(num_chains=2, num_draws=300, num_burnin=100, step_size=1e-3)
    case = zoo.regular(4, n=1024, settings=s)
    return replace(case, lam=Fraction(lam)) if lam is not None else case


def test_validate_writes_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = validate_mod.validate([_tiny()], out=tmp_path, progress=False)
    assert rows[0].passed and rows[0].target_kind == "λ"
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["rows"][0]["name"] == "regular(4,1)" and table["rows"][0]["passed"]
    assert (tmp_path / "validate.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "regular(4,1)" in out and "1/1 passed" in out


def test_a_case_whose_chains_diverge_is_a_failing_row_and_the_rest_still_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    s = zoo.Settings(num_chains=2, num_draws=20, num_burnin=5, step_size=50.0)
    diverging = zoo.regular(3, n=100, settings=s)
    negative = replace(_tiny(), lam=Fraction(1, 2))  # drawn at the log axis' edge
    rows = validate_mod.validate([_tiny(), diverging, negative], out=tmp_path, progress=False)
    assert [r.passed for r in rows] == [True, False, False]
    assert rows[1].note == "every chain diverged" and rows[1].llc != rows[1].llc  # NaN
    table = json.loads((tmp_path / "table.json").read_text())
    assert [r["passed"] for r in table["rows"]] == [True, False, False]
    assert "NO (every chain diverged)" in capsys.readouterr().out
    assert (tmp_path / "validate.png").stat().st_size > 1000


def test_cli_exit_status(monkeypatch, tmp_path):
    runner = CliRunner()
    monkeypatch.setattr(validate_mod, "default_cases", lambda: [_tiny()])
    ok = runner.invoke(app, ["validate", "--out", str(tmp_path), "--no-progress"])
    assert ok.exit_code == 0, ok.output
    monkeypatch.setattr(validate_mod, "default_cases", lambda: [_tiny(lam=100)])
    bad = runner.invoke(app, ["validate", "--out", str(tmp_path), "--no-progress"])
    assert bad.exit_code == 1 and "NO" in bad.output


def test_only_runs_the_families_named(monkeypatch, tmp_path):
    # a quick check for a user: `slt validate` had no subset (8 cases, 30-70 s)
    seen = []

    def run(cases, **kwargs):
        seen.append([c.name for c in cases])
        return []

    monkeypatch.setattr(validate_mod, "validate", run)
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", "--out", str(tmp_path), "--only", "regular,tanh"])
    assert ok.exit_code == 0, ok.output
    assert seen == [["regular(10,1)", "regular(20,3)", "tanh(H=1)"]]
    bad = runner.invoke(app, ["validate", "--out", str(tmp_path), "--only", "mlp"])
    assert bad.exit_code == 2 and "expected families among deep_linear" in bad.output


def test_microbatch_reaches_every_case(monkeypatch, tmp_path):
    runner = CliRunner()
    monkeypatch.setattr(validate_mod, "default_cases", lambda: [_tiny()])
    ok = runner.invoke(app, ["validate", "--out", str(tmp_path), "--no-progress",
                             "--microbatch", "16"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert "microbatch=16: batches of whole micro-batches" in ok.output
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["meta"]["microbatch"] == 16
    assert table["rows"][0]["settings"]["microbatch"] == 16
    bad = runner.invoke(app, ["validate", "--no-progress", "--microbatch", "3"])
    assert bad.exit_code == 2
    assert "--microbatch must divide the number of samples (1024)" in bad.output
    off = runner.invoke(app, ["validate", "--out", str(tmp_path), "--no-progress",
                              "--microbatch", "none"])  # fmt: skip
    assert off.exit_code == 0, off.output
    assert json.loads((tmp_path / "table.json").read_text())["meta"]["microbatch"] is None


def test_targets_for_singular_cases():
    pot = zoo.potential((1, 1), n=256)
    value, kind = validate_mod.target_for(pot, 100.0, 2.0)
    assert kind == "exact" and value == pytest.approx(pot.expected(100.0, 2.0))
    rrr = zoo.reduced_rank(10, 8, 6, 3, n=256)
    value, kind = validate_mod.target_for(rrr, 100.0, 1.0)
    assert rrr.m == 2 and kind == "asymptotic"
    assert value == pytest.approx(30 - 1 / 4.605170185988092)


def test_default_cases_cover_every_family():
    cases = validate_mod.default_cases()
    assert len(cases) >= 8
    assert {c.family for c in cases} == {
        "regular",
        "reduced_rank",
        "deep_linear",
        "potential",
        "tanh",
    }
    assert max(c.num_params for c in cases if c.family == "deep_linear") >= 10_000


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "slt", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "validate" in out.stdout


def test_the_plot_keeps_a_negative_or_missing_estimate_on_its_log_axes(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    row = validate_mod.Row("a", "regular", 4, 2.0, 1, 2.0, "λ", 1.9, 0.1, 50.0, 1.0, {})
    rows = [row, replace(row, name="b", llc=-3.0), replace(row, name="c", llc=float("nan"))]
    shown = []
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        shown.append(fig)
        return real_savefig(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", keep)
        validate_mod.plot(rows, tmp_path / "v.png")
    left = shown[0].axes[0]
    assert 0 < left.get_xlim()[0] and 0 < left.get_ylim()[0]  # log limits that hold
    crosses = [line for line in left.get_lines() if line.get_marker() == "x"]
    assert sum(len(line.get_xdata()) for line in crosses) == 2  # b and c, at the edge
    assert "λ̂ ≤ 0 or none (at the edge)" in [t.get_text() for t in left.get_legend().get_texts()]
