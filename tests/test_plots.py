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
    fig.suptitle("the caller's title")
    assert slt.plot_trace(extended, ax=axes) is fig
    assert len(axes[0].lines) == 4 and len(axes[1].lines) == 7
    # the caller's figure keeps its title (a second result replaced it); ours on the axes
    assert [t.get_text() for t in fig.texts] == ["the caller's title"]
    title = axes[0].get_title()
    assert "R̂ 1.500" in title and "ESS 123" in title  # the result's own diagnostics win


def test_missing_matplotlib_names_the_extra(monkeypatch, result):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"slt\[plot\]"):
        slt.plot_trace(result)


def test_a_lone_chains_band_is_the_results_own_mcse(plt, result):
    # with one chain there is no llc_std; the band fell back to a recomputed MCSE (without
    # the result's epochs), 40% over what the result printed
    lone = dataclasses.replace(result, llc_std=float("nan"), mcse=0.123)
    fig = slt.plot_trace(lone)
    (band,) = fig.axes[1].patches
    ys = band.get_patch_transform().transform(band.get_path().vertices)[:, 1]
    assert ys.max() - ys.min() == pytest.approx(4 * 0.123)
    assert "± 0.12" in fig.texts[0].get_text()


def test_trace_marks_burn_in_divergence_keeps_the_center_and_dots_one_draw(plt, result):
    trace, llc_trace = result.trace.copy(), result.llc_trace.copy()
    trace[1], llc_trace[1] = np.nan, np.nan  # diverged during the burn-in: nothing to draw
    trace[2] += 0.5  # the usable chains sit above L_n(w*)
    bad = dataclasses.replace(result, trace=trace, diverged=np.array([False, True, False]))
    bad = types.SimpleNamespace(**{f.name: getattr(bad, f.name) for f in dataclasses.fields(bad)},
                                llc_trace=llc_trace)  # fmt: skip
    bad.trace[0] += 0.5
    fig = slt.plot_trace(bad)
    loss_ax = fig.axes[0]
    assert any(line.get_marker() == "x" for line in loss_ax.lines)  # was no mark at all
    assert any("burn-in" in t.get_text() for t in loss_ax.texts)
    lo, hi = loss_ax.get_ylim()
    assert lo < result.init_loss < hi  # L_n(w*) stayed in view
    one = dataclasses.replace(
        result, trace=result.trace[:, :1], trace_at_center=result.trace_at_center[:, :1]
    )
    fig = slt.plot_trace(types.SimpleNamespace(
        **{f.name: getattr(one, f.name) for f in dataclasses.fields(one)},
        llc_trace=result.llc_trace[:, :1]))  # fmt: skip
    assert all(line.get_marker() == "o" for line in fig.axes[0].lines[:3])


def test_plots_name_an_ax_of_the_wrong_kind(plt, result):
    _, one = plt.subplots()
    with pytest.raises(TypeError, match="ax must be a pair of matplotlib Axes"):
        slt.plot_trace(result, ax=one)
    sweep = slt.NbetaSweep(nbeta=np.array([10.0, 20.0]), llc=np.array([1.0, np.nan]),
                           llc_std=np.array([np.nan, np.nan]), step_size=np.ones(2), n=100,
                           results=())  # fmt: skip
    with pytest.raises(TypeError, match="ax must be one matplotlib Axes"):
        sweep.plot(ax=(one, one))


def test_sweep_plot_marks_lost_points_and_keeps_the_callers_layout(plt):
    sweep = slt.NbetaSweep(nbeta=np.array([10.0, 20.0, 640.0]), llc=np.array([1.0, 1.1, np.nan]),
                           llc_std=np.array([0.1, np.nan, np.nan]), step_size=np.ones(3), n=100,
                           results=())  # fmt: skip
    fig, ax = plt.subplots(layout="constrained")
    sweep.plot(ax=ax)
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
    labels = [line.get_label() for line in ax.lines]
    assert "no λ̂ (diverged)" in labels and "no standard error" in labels
    (lost,) = [line for line in ax.lines if line.get_label() == "no λ̂ (diverged)"]
    assert lost.get_xdata()[0] == 640.0


def test_trajectory_plot_sorts_steps_and_marks_what_has_no_number(plt):
    from slt.plots_development import plot_trajectory

    steps = np.array([30, 0, 20, 10])
    traj = types.SimpleNamespace(steps=steps, llc=np.array([3.0, 1.0, np.nan, 2.0]),
                                 se=np.array([0.1, 0.1, np.nan, np.nan]), warnings=[()] * 4,
                                 loss=np.array([0.1, 0.4, 0.2, 0.3]))  # fmt: skip
    fig = plot_trajectory(traj)
    ax = fig.axes[0]
    line = ax.lines[0]
    assert list(line.get_xdata()) == [0, 10, 30]  # training order, the NaN left out
    labels = [x.get_label() for x in ax.lines]
    assert "no λ̂ (see the table's error)" in labels and "no standard error" in labels


def test_trajectory_se_is_nan_where_there_is_no_mcse():
    from slt.trajectory import Trajectory

    fields = {f: None for f in Trajectory.__dataclass_fields__}
    traj = Trajectory(**(fields | {"llc_std": np.array([0.0, np.nan, 0.2]),
                                   "mcse": np.array([np.nan, 0.3, 0.1])}))  # fmt: skip
    # chains that never moved: llc_std 0, no MCSE; it was an error bar of 0
    np.testing.assert_array_equal(traj.se, [np.nan, 0.3, 0.2])


def test_validate_plot_leaves_the_backend_alone(plt, tmp_path):
    import matplotlib

    from slt.validate import Row, plot

    matplotlib.use("svg")  # a backend of the caller's other than Agg
    before = matplotlib.get_backend()
    row = Row(name="x", family="regular", d=2, lam=1.0, m=1, target=1.0, target_kind="λ",
              llc=0.9, llc_std=float("nan"), nbeta=10.0, seconds=1.0, settings={})  # fmt: skip
    plot([row], tmp_path / "v.png")  # it called matplotlib.use("Agg") on the user's session
    after = matplotlib.get_backend()
    matplotlib.use("Agg")
    assert after == before == "svg" and (tmp_path / "v.png").exists()
