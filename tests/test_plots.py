"""slt.plot_trace on a small real estimate (Agg backend); a missing matplotlib is named."""

import dataclasses
import sys
import types

import numpy as np
import pytest
import torch

import slt


@pytest.fixture(scope="module")
def plt():
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


@pytest.fixture(scope="module")
def result():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    data = torch.utils.data.TensorDataset(x, x @ torch.tensor([[1.0], [-1.0]]))
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    return slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), num_chains=3, num_draws=60,
                            num_burnin=20, progress=False)  # fmt: skip


def test_one_line_per_chain_running_means_and_the_estimate(plt, result):
    fig = slt.plot_trace(result)
    assert isinstance(fig, plt.Figure)
    loss_ax, llc_ax = fig.axes
    # loss: a line per chain and L_n(w*); λ̂: per chain the draws and their running mean, and λ̂.
    assert len(loss_ax.lines) == 3 + 1
    assert len(llc_ax.lines) == 2 * 3 + 1
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), result.trace[0])
    np.testing.assert_allclose(loss_ax.lines[0].get_xdata(), 20 + np.arange(60))  # no burn-in
    running = np.cumsum(result.llc_trace[1]) / np.arange(1, 61)
    np.testing.assert_allclose(llc_ax.lines[3].get_ydata(), running)
    assert llc_ax.lines[-1].get_ydata()[0] == pytest.approx(result.llc)
    (band,) = llc_ax.patches  # λ̂ ± 2 se, in data coordinates on the y-axis
    ys = band.get_patch_transform().transform(band.get_path().vertices)[:, 1]
    assert ys.min() == pytest.approx(result.llc - 2 * result.llc_std)
    assert ys.max() == pytest.approx(result.llc + 2 * result.llc_std)


def test_diverged_chain_is_marked_and_kept_off_the_axis_limits(plt, result):
    trace = result.trace.copy()
    trace[1, 30:] = np.linspace(1e3, 1e30, 30)
    trace[1, 55:] = np.inf
    bad = dataclasses.replace(result, trace=trace, diverged=np.array([False, True, False]))
    fig = slt.plot_trace(bad)
    loss_ax, llc_ax = fig.axes
    labels = [line.get_label() for line in loss_ax.lines]
    assert "chain 1 (diverged)" in labels
    markers = [line for line in loss_ax.lines if line.get_marker() == "x"]
    assert len(markers) == 1 and markers[0].get_xdata()[0] == 20 + 54  # last finite draw
    assert loss_ax.get_ylim()[1] < 1e3
    assert len([line for line in llc_ax.lines if line.get_marker() == "x"]) == 1


def test_draws_into_given_axes_and_tolerates_extra_fields(plt, result):
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    extra = {"acceptance": np.ones((3, 60)), "rhat": 1.5, "ess_bulk": 123.0, "new_field": 1}
    extended = types.SimpleNamespace(**{**fields, **extra}, llc_trace=result.llc_trace)
    fig, axes = plt.subplots(1, 2)
    assert slt.plot_trace(extended, ax=axes) is fig
    assert len(axes[0].lines) == 4 and len(axes[1].lines) == 7
    (title,) = [t.get_text() for t in fig.texts]
    assert "R̂ 1.500" in title and "ESS 123" in title  # the result's own diagnostics win


def test_missing_matplotlib_names_the_extra(monkeypatch, result):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"slt\[plot\]"):
        slt.plot_trace(result)
