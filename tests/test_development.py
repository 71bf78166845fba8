"""detect_transitions, phase_diagram, their plots, and ``slt trajectory``."""

import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from slt.phase import Candidate, phase_diagram
from slt.transitions import detect_transitions, noise_scale

pytest.importorskip("ruptures")


def _signals(steps):
    llc = np.select([steps < 100, steps < 250], [1.0, 2.5], 4.0)
    loss = np.where(steps < 100, 0.9, 0.4)
    return {"steps": steps, "llc": llc, "loss": loss}


def test_exact_piecewise_constant_signals():
    steps = np.arange(0, 400, 10)
    t = detect_transitions(_signals(steps))
    assert t.change_points == {"llc": (100, 250), "loss": (100,)}
    assert t.boundaries == (100, 250)
    assert t.stages == ((0, 90), (100, 240), (250, 390))
    assert t.levels["llc"] == (1.0, 2.5, 4.0)
    assert t.levels["loss"] == (0.9, 0.4, 0.4)
    assert [t.stage_of(s) for s in (0, 99, 100, 250, 390)] == [0, 0, 1, 2, 2]
    assert "3 stages" in str(t)


@pytest.mark.parametrize("seed", range(5))
def test_jumps_of_eight_noise_scales_are_found(seed):
    """Jumps of 8σ: the true change points are found, each within one checkpoint."""
    steps = np.arange(0, 600, 10)
    rng = np.random.default_rng(seed)
    signals = _signals(steps)
    signals["llc"] = 8 / 1.5 * signals["llc"] + rng.normal(size=steps.size)  # jumps of 8σ
    t = detect_transitions(signals, signals=("llc",))
    found = np.array(t.change_points["llc"])
    for true in (100, 250):
        assert np.min(np.abs(found - true)) <= 10, found


def test_non_finite_checkpoints_are_left_out():
    steps = np.arange(0, 400, 10)
    signals = _signals(steps)
    signals["llc"] = signals["llc"].copy()
    signals["llc"][5] = np.nan  # every chain diverged there
    t = detect_transitions(signals)
    assert t.dropped == (50,)
    assert 50 not in t.steps
    assert t.boundaries == (100, 250)


def test_short_or_flat_trajectories_have_one_stage():
    t = detect_transitions({"steps": [0, 1, 2], "llc": [1.0, 5.0, 1.0], "loss": [1, 1, 1]})
    assert t.stages == ((0, 2),)
    flat = np.ones(30)
    t = detect_transitions({"steps": np.arange(30), "llc": flat, "loss": flat})
    assert t.stages == ((0, 29),)
    assert noise_scale(flat) == 1.0


def test_works_on_objects_and_names_a_missing_ruptures(monkeypatch):
    steps = np.arange(0, 400, 10)
    traj = SimpleNamespace(**_signals(steps))
    assert detect_transitions(traj).boundaries == (100, 250)
    with pytest.raises(ValueError, match="signal 'llc' has shape"):
        detect_transitions({"steps": steps, "llc": np.ones(3), "loss": np.ones(40)})
    monkeypatch.setitem(sys.modules, "ruptures", None)
    with pytest.raises(ImportError, match=r"pip install 'slt\[transitions\]'"):
        detect_transitions(traj)


def test_phase_diagram_crossing_solves_the_free_energy_equation():
    cands = {"simple": {"loss": 1.10, "llc": 1.0}, "complex": {"loss": 1.09, "llc": 3.0}}
    n = np.geomspace(10, 1e5, 300)
    d = phase_diagram(cands, n)
    (c,) = d.crossings
    assert (c.before, c.after) == ("simple", "complex")
    assert 0.01 * c.n == pytest.approx(2 * math.log(c.n), rel=1e-10)  # n ΔL = Δλ log n
    assert d.crossing("simple", "complex") == pytest.approx(c.n, rel=1e-10)
    assert d.names[d.dominant[0]] == "simple" and d.names[d.dominant[-1]] == "complex"
    np.testing.assert_allclose(d.free_energy[0], 1.10 * n + np.log(n))
    assert c.n_low == pytest.approx(c.n, rel=1e-12) == c.n_high  # no se given: no range


def test_multiplicity_term_and_error_ranges():
    a = Candidate("a", loss=1.0, llc=1.5, m=2, llc_std=0.1)
    n = np.array([10.0, 100.0])
    np.testing.assert_allclose(a.free_energy(n), n + 1.5 * np.log(n) - np.log(np.log(n)))
    b = Candidate("b", loss=0.99, llc=3.0, llc_std=0.1)
    d = phase_diagram([a, b], np.geomspace(5, 1e5, 200))
    (c,) = d.crossings
    assert c.n_low < c.n < c.n_high  # a smaller gap in λ crosses earlier


def test_a_candidate_that_never_wins_makes_no_crossing():
    cands = [
        {"name": "a", "loss": 1.0, "llc": 1.0},
        {"name": "b", "loss": 0.999, "llc": 5.0},  # barely better loss, far more complex
        {"name": "c", "loss": 0.95, "llc": 3.0},
    ]
    d = phase_diagram(cands, np.geomspace(10, 1e5, 300))
    assert [(c.before, c.after) for c in d.crossings] == [("a", "c")]
    assert "b" not in {d.names[i] for i in d.dominant}
    assert "crossing a -> c" in str(d)


def test_a_negative_llc_is_warned_not_taken_silently():
    # λ ≥ 0 at a local minimum: a negative λ̂ (chains below w*) makes F(n) too low
    cands = {"saddle": {"loss": 0.10, "llc": -2.0, "llc_std": 0.5},
             "minimum": {"loss": 0.09, "llc": 3.0}}  # fmt: skip
    with pytest.warns(UserWarning, match=r"'saddle': λ̂ = -2 ± 0.5 is negative"):
        d = phase_diagram(cands, np.geomspace(10, 1e4, 50))
    assert len(d.warnings) == 1 and "minimum" not in d.warnings[0].split(":")[0]
    assert "warning: candidate 'saddle'" in str(d)
    assert d.to_dict()["warnings"] == list(d.warnings)


def test_phase_diagram_rejects_bad_input():
    with pytest.raises(ValueError, match="> e"):
        phase_diagram({"a": {"loss": 1, "llc": 1}}, [1.0, 10.0])
    with pytest.raises(ValueError, match="needs 'loss' and 'llc'"):
        phase_diagram({"a": {"loss": 1}}, [10.0])
    with pytest.raises(ValueError, match="llc must be finite"):
        phase_diagram({"a": {"loss": 1, "llc": math.nan}}, [10.0])


def test_every_crossing_of_a_pair_gets_its_own_range():
    # with m = 2, a and b cross three times (a -> b -> a -> b); the ranges were all searched
    # from n[0], so each was the first crossing's (5.11 to 5.11 for all three)
    a = Candidate("a", loss=0.10002, llc=1.0, llc_std=0.01)
    b = Candidate("b", loss=0.1, llc=1.3, m=2)
    d = phase_diagram([a, b], np.geomspace(3, 1e5, 400))
    assert [(c.before, c.after) for c in d.crossings] == [("a", "b"), ("b", "a"), ("a", "b")]
    se = 2 * 0.01
    for c in d.crossings:
        assert c.n_low < c.n < c.n_high
        after, before = (b, a) if c.after == "b" else (a, b)
        for end, shift in ((c.n_low, -se), (c.n_high, se)):  # F_before = F_after there
            moved = Candidate(after.name, after.loss, after.llc + shift, after.m)
            assert before.free_energy(end) == pytest.approx(moved.free_energy(end), rel=1e-9)
    # 2 se of 0.05 make the middle crossing and its neighbours' inner ends vanish: "none"
    wide = phase_diagram([Candidate("a", 0.10002, 1.0, llc_std=0.05), b], d.n)
    first, middle, last = wide.crossings
    assert math.isnan(first.n_high) and math.isnan(middle.n_low) and math.isnan(middle.n_high)
    assert math.isnan(last.n_low) and first.n_low < first.n < last.n < last.n_high
    assert "λ̂ ± 2 se: none to none" in str(wide)
    assert str(wide).count("no range: llc_std is 0") == 0
    no_se = phase_diagram([Candidate("a", 0.10002, 1.0), b], d.n)
    assert str(no_se).count("no range: llc_std is 0") == 3


def test_phase_diagram_names_and_values_are_checked():
    n = np.geomspace(10, 1e4, 50)
    twice = [{"name": "a", "loss": 0.1, "llc": 1.0}, {"name": "a", "loss": 0.09, "llc": 3.0}]
    with pytest.raises(ValueError, match=r"names must be distinct; \['a'\]"):
        phase_diagram(twice, n)
    with pytest.raises(TypeError, match=r"candidates\[0\] must be a Candidate or a mapping"):
        phase_diagram([{"loss": 0.1, "llc": 1.0}], n)  # no name: was named "None"
    for bad in ("ab", [("a", 0.1, 1.0)]):  # were AttributeError: 'str' has no 'get'
        with pytest.raises(TypeError, match="candidates"):
            phase_diagram(bad, n)
    with pytest.raises(ValueError, match="candidate 'a': loss must be a real number, got 'x'"):
        phase_diagram({"a": {"loss": "x", "llc": 1.0}}, n)
    with pytest.raises(ValueError, match="finite sample sizes > e.*inf"):  # inf made a winner
        phase_diagram({"a": {"loss": 0.1, "llc": 1.0}}, [10, 100, np.inf])


def test_noise_scale_of_a_signal_with_no_jitter_is_in_its_own_units():
    # an exact step with min_scale=0 (or in the outer 5% of the values) fell back to a scale
    # of 1 in the signal's units: found ×1000, missed ×1
    steps = np.arange(0, 300, 10)
    loss = np.where(steps < 100, 0.5, np.where(steps < 200, 0.3, 0.1))
    late = np.where(np.arange(100) < 96, 0.5, 0.2)
    for unit in (1.0, 1000.0):
        t = detect_transitions({"steps": steps, "loss": loss * unit}, signals="loss", min_scale=0)
        assert t.change_points["loss"] == (100, 200)
        t = detect_transitions({"steps": np.arange(100), "loss": late * unit}, signals="loss")
        assert t.change_points["loss"] == (96,)
        assert t.scale["loss"] == pytest.approx(0.05 * 0.3 * unit)


def test_any_mapping_is_a_trajectory():
    from collections import UserDict
    from types import MappingProxyType

    signals = _signals(np.arange(0, 400, 10))
    for kind in (UserDict, MappingProxyType):  # refused: "trajectory has no array 'steps'"
        assert detect_transitions(kind(signals)).boundaries == (100, 250)


def test_phase_plot_shades_a_removed_end_to_the_edge():
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    from slt.plots_development import plot_phase_diagram

    # the docstring's example with se 2: at λ̂ - 2 se "complex" wins from the start, so n_low
    # is NaN; the band was drawn from the crossing (1457) up, as if more certain below
    n = np.geomspace(10, 1e4, 50)
    d = phase_diagram({"simple": {"loss": 0.10, "llc": 1.0, "llc_std": 2.0},
                       "complex": {"loss": 0.09, "llc": 3.0}}, n)  # fmt: skip
    (c,) = d.crossings
    assert math.isnan(c.n_low) and c.n_high > c.n
    fig = plot_phase_diagram(d)
    (band,) = fig.axes[0].patches
    left = band.get_x()
    assert left == pytest.approx(10) and left + band.get_width() == pytest.approx(c.n_high)
    assert "λ̂ ± 2 se: none to" in str(d)
    assert "(m−1) log log n" in fig.axes[0].get_title()
    # a crossing at small n: its label was at the top, under the legend (upper left), so
    # the TMS plot showed only "7 →6-gon" of "n≈84.7 3-gon→6-gon"
    early = phase_diagram({"simple": {"loss": 0.30, "llc": 1.0},
                           "complex": {"loss": 0.10, "llc": 3.0}}, n)  # fmt: skip
    fig = plot_phase_diagram(early)
    fig.canvas.draw()
    (label,) = [t for t in fig.axes[0].texts if "n≈" in t.get_text()]
    legend = fig.axes[0].get_legend().get_window_extent()
    assert not label.get_window_extent().overlaps(legend)


def test_plots(tmp_path):
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    from slt.plots_development import plot_phase_diagram, plot_trajectory

    steps = np.arange(0, 400, 10)
    signals = _signals(steps)
    llc = signals["llc"].copy()
    llc[0] = -50.0  # a saddle: far off, with warnings
    warned = [("w",)] + [()] * (steps.size - 1)
    traj = SimpleNamespace(steps=steps, llc=llc, se=np.full(steps.size, 0.1),
                           loss=signals["loss"], warnings=warned)  # fmt: skip
    t = detect_transitions(signals)
    fig = plot_trajectory(traj, t)
    ax_llc, ax_loss = fig.axes
    assert ax_llc.get_ylim()[0] > -10  # fitted to the clean estimates
    assert len(ax_loss.patches) == len(t.stages)
    labels = [x.get_text() for x in ax_llc.get_legend().get_texts()]
    assert "λ̂ below the axis (warnings)" in labels and not any("above" in x for x in labels)
    fig.savefig(tmp_path / "t.png")
    llc[0] = 50.0  # far above: the legend says so
    traj = SimpleNamespace(**{**vars(traj), "llc": llc})
    labels = [x.get_text() for x in plot_trajectory(traj).axes[0].get_legend().get_texts()]
    assert "λ̂ above the axis (warnings)" in labels and not any("below" in x for x in labels)
    d = phase_diagram({"a": {"loss": 1.0, "llc": 1.0}, "b": {"loss": 0.99, "llc": 3.0}},
                      np.geomspace(10, 1e5, 100))  # fmt: skip
    fig = plot_phase_diagram(d)
    assert len(fig.axes[0].get_legend().get_texts()) == 2


USER = """
import torch

def make_model():
    return torch.nn.Linear(3, 1)

def dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 3, generator=g)
    return torch.utils.data.TensorDataset(x, x[:, :1] + 0.3 * torch.randn(128, 1, generator=g))
"""


def _cli_folder(tmp_path, monkeypatch, steps, draws: int) -> list[str]:
    """A user's spec file and a folder of checkpoints at ``steps``; the command's args."""
    pytest.importorskip("typer")
    pytest.importorskip("matplotlib").use("Agg")
    import torch

    (tmp_path / "user_spec.py").write_text(USER)
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in steps:
        torch.save(torch.nn.Linear(3, 1).state_dict(), folder / f"model_{step}.pt")
    monkeypatch.chdir(tmp_path)
    return ["trajectory", str(folder), "--model", "user_spec.py:make_model", "--data",
            "user_spec.py:dataset", "--num-chains", "2", "--num-draws", str(draws),
            "--num-burnin", "5", "--no-progress"]  # fmt: skip


def test_cli_trajectory(tmp_path, monkeypatch):
    args = [*_cli_folder(tmp_path, monkeypatch, (0, 5, 10), 30), "--results", "r.jsonl"]
    from typer.testing import CliRunner

    from slt.cli import app
    from slt.trajectory_file import read

    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "3 checkpoints (3 computed, 0 reused" in out.output
    assert [r["step"] for r in read(tmp_path / "r.jsonl").rows] == [0, 5, 10]
    assert (tmp_path / "r.png").is_file()
    again = CliRunner().invoke(app, args)
    assert "(0 computed, 3 reused" in again.output
    changed = CliRunner().invoke(app, [*args, "--localization", "3"])
    assert changed.exit_code == 2
    assert "localization: 1.0 -> 3.0" in changed.output and "--overwrite" in changed.output
    # --chain-method and --compile reach estimate_llc (which refuses the pair, by the options)
    refused = CliRunner().invoke(app, [*args, "--results", "other.jsonl", "--chain-method",
                                       "loop", "--compile"])  # fmt: skip
    assert refused.exit_code == 2
    assert "--compile needs --chain-method" in refused.output
    assert "got --chain-method 'loop'" in refused.output
    # --microbatch reaches estimate_llc and the results file's settings
    grouped = CliRunner().invoke(app, [*args, "--results", "mb.jsonl", "--microbatch", "8"])
    assert grouped.exit_code == 0, grouped.output
    assert read(tmp_path / "mb.jsonl").header["settings"]["estimate_llc"]["microbatch"] == 8


def test_cli_trajectory_outputs_and_failures(tmp_path, monkeypatch):
    args = _cli_folder(tmp_path, monkeypatch, (0, 5), 10)
    from typer.testing import CliRunner

    from slt.cli import app
    from slt.trajectory_file import read

    def run(*more):
        out = CliRunner().invoke(app, [*args, *more])
        return out.exit_code, " ".join(out.output.replace("│", " ").split())

    # results named .png: the plot goes beside it, not over it; the file resumes
    assert run("--results", "r.png")[0] == 0
    assert len(read(tmp_path / "r.png").rows) == 2 and (tmp_path / "r.png.png").is_file()
    code, text = run("--results", "s.svg", "--plot", "s.svg")
    assert code == 2 and "is the results file" in text and not (tmp_path / "s.svg").exists()
    (tmp_path / "plots").mkdir()
    code, text = run("--results", "t.jsonl", "--plot", "plots")
    assert code == 2 and "plots is a folder" in text
    # the same file spelled another way is the same model: the rows are reused
    code, text = run("--results", "r.png", "--model", f"{tmp_path / 'user_spec.py'}:make_model")
    assert code == 0 and "(0 computed, 2 reused" in text
    # a results file that is not one, binary or text, is named as such
    (tmp_path / "weights.jsonl").write_bytes(b"\x80\x02binary")
    code, text = run("--results", "weights.jsonl")
    assert code == 2 and "is not an slt trajectory results file" in text
    # no λ̂ at any checkpoint: exit 1, as `slt llc` when every chain diverges
    code, text = run("--results", "u.jsonl", "--step-size", "1e6")
    assert code == 1 and "no λ̂ at any of the 2 checkpoints" in text


def test_a_candidate_that_wins_between_grid_points_makes_its_own_crossings():
    # with 8 points a -> c was reported at n = 316.7, where F_b = 92.1 < F_a = F_c = 100.8
    cands = {"a": {"loss": 0.30, "llc": 1.0}, "b": {"loss": 0.20, "llc": 5.0},
             "c": {"loss": 0.10, "llc": 12.0}}  # fmt: skip
    coarse = phase_diagram(cands, np.geomspace(10, 1e4, 8))
    fine = phase_diagram(cands, np.geomspace(10, 1e4, 2000))
    for d in (coarse, fine):
        assert [(c.before, c.after) for c in d.crossings] == [("a", "b"), ("b", "c")]
        for c in d.crossings:  # each is a root of its own pair, where the pair is lowest
            a, b = (d.candidates[d.names.index(x)] for x in (c.before, c.after))
            assert float(a.free_energy(c.n)) == pytest.approx(float(b.free_energy(c.n)))
            assert min(float(x.free_energy(c.n)) for x in d.candidates) == pytest.approx(
                float(a.free_energy(c.n))
            )
    assert [round(c.n, 1) for c in coarse.crossings] == [214.8, 423.4]
