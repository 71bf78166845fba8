"""benchmarks/error_bars.py: its exact value is the Gaussian posterior's, and a short run
prints a row per configuration."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from slt import zoo

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "error_bars.py"


@pytest.fixture(scope="module")
def error_bars():
    spec = importlib.util.spec_from_file_location("error_bars", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_exact_value_is_half_the_effective_parameter_count(error_bars):
    case = zoo.regular(3, n=512)
    x = case.dataset.tensors[0].double().numpy()
    q = np.linalg.eigvalsh(x.T @ x / len(x))  # σ = 1
    assert error_bars.exact_llc(case, 1e12, 1.0) == pytest.approx(1.5, rel=1e-9)  # d/2
    assert error_bars.exact_llc(case, 50.0, 1.0) == pytest.approx(
        0.5 * np.sum(50 * q / (50 * q + 1)), rel=1e-12
    )
    assert error_bars.exact_llc(case, 50.0, 1e9) < 1e-6  # all localization, no data


def test_a_short_run_reports_the_spread_against_the_errors(error_bars, monkeypatch):
    monkeypatch.setitem(error_bars.BASE, "num_draws", 50)
    case = zoo.regular(2, n=256)
    row = error_bars.run("default", 3, case, 64)
    assert row["chains"] == 4 and np.isfinite(row["sd"]) and row["sd"] > 0
    assert all(np.isfinite(row[k][0]) and 0 <= row[k][1] <= 1 for k in ("llc_std", "mcse"))
