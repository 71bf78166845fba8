"""llc_trajectory: resume after a kill, changed settings, executors that agree bit for bit."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from slt.trajectory import llc_trajectory, make_jobs
from slt.trajectory_file import SettingsChangedError, read

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # spawned workers inherit sys.path; Ray gets PYTHONPATH
import _trajectory_helpers as h  # noqa: E402

SETTINGS = dict(num_chains=2, num_draws=60, num_burnin=10, step_size=1e-3, seed=3)


@pytest.fixture
def ckpts(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    h.checkpoints(folder, num=5)
    return folder


def _run(ckpts, **kwargs):
    options = {**SETTINGS, "progress": False, **kwargs}
    return llc_trajectory(ckpts, h.linear, h.loader(), h.nll, **options)


def test_rows_steps_and_results_file(ckpts, tmp_path):
    results = tmp_path / "r.jsonl"
    traj = _run(ckpts, results=results)
    assert traj.steps.tolist() == [0, 10, 20, 30, 40]  # from the file names
    assert traj.labels[0] == "step_00000.pt"
    assert traj.num_computed == 5 and traj.num_reused == 0
    contents = read(results)
    assert contents.header["settings"]["estimate_llc"]["num_draws"] == 60
    assert [r["label"] for r in contents.rows] == list(traj.labels)
    row = contents.rows[0]
    for key in ("llc", "llc_std", "mcse", "rhat", "ess_bulk", "init_loss", "warnings",
                "settings_hash", "checkpoint_sha256"):  # fmt: skip
        assert key in row
    assert np.all(np.diff(traj.loss) < 0)  # gradient descent between checkpoints
    assert "λ̂ trajectory: 5 checkpoints" in str(traj)
    # the "± se" column is the error bar Trajectory.se (it printed llc_std, up to 25x smaller)
    first = str(traj).splitlines()[2].split()
    assert first[3:5] == [f"{traj.se[0]:.2g}", f"{traj.llc_std[0]:.2g}"]
    assert first[3] != first[4]  # MCSE is the larger here: the two columns differ


def test_rerun_reuses_everything_and_extends(ckpts, tmp_path):
    results = tmp_path / "r.jsonl"
    first = _run(ckpts, results=results)
    again = _run(ckpts, results=results)
    assert again.num_computed == 0 and again.num_reused == 5
    np.testing.assert_array_equal(again.llc, first.llc)
    np.testing.assert_array_equal(again.mcse, first.mcse)
    h.checkpoints(ckpts, num=7)  # training went on: two more checkpoints, same first five
    more = _run(ckpts, results=results)
    assert more.num_computed == 2 and more.num_reused == 5
    np.testing.assert_array_equal(more.llc[:5], first.llc)


def test_killed_run_resumes_without_recomputing(ckpts, tmp_path, monkeypatch):
    """Kill a trajectory mid-run (SIGKILL), rerun: finished rows kept, only the rest run."""
    results, counter = tmp_path / "r.jsonl", tmp_path / "counter"
    h.checkpoints(ckpts, num=10)
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        sys.path.insert(0, {str(HERE)!r})
        import _trajectory_helpers as h
        from slt.trajectory import llc_trajectory
        llc_trajectory({str(ckpts)!r}, h.counting_linear, h.loader(), h.nll,
                       results={str(results)!r}, progress=False, **{SETTINGS!r})
    """)
    env = {**os.environ, "SLT_TEST_COUNTER": str(counter), "SLT_TEST_SLEEP": "0.3"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(read(results).rows) < 3:
            assert proc.poll() is None, "the trajectory ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = results.read_bytes()
    finished = read(results).rows
    k = len(finished)
    assert 3 <= k < 10, k
    first_pid = finished[0]["pid"]
    calls_before = counter.read_text().split()

    monkeypatch.setenv("SLT_TEST_COUNTER", str(counter))
    resumed = llc_trajectory(ckpts, h.counting_linear, h.loader(), h.nll, results=results,
                             progress=False, **SETTINGS)  # fmt: skip
    calls_after = counter.read_text().split()[len(calls_before) :]
    assert resumed.num_reused == k and resumed.num_computed == 10 - k
    # the factory ran once per missing row, and once to check the files before sampling
    assert calls_after == [str(os.getpid())] * (10 - k + 1)
    assert results.read_bytes()[: len(before)] == before  # finished rows untouched
    rows = read(results).rows
    assert [r["pid"] for r in rows[:k]] == [first_pid] * k
    assert {r["pid"] for r in rows[k:]} == {os.getpid()}
    fresh = _run(ckpts)  # the same numbers as one uninterrupted run
    np.testing.assert_array_equal(resumed.llc, fresh.llc)


def test_partial_last_line_is_dropped_and_repaired(ckpts, tmp_path):
    results = tmp_path / "r.jsonl"
    _run(ckpts, results=results)
    lines = results.read_bytes().split(b"\n")
    results.write_bytes(b"\n".join(lines[:4]) + b"\n" + lines[4][:25])  # killed mid-write
    assert len(read(results).rows) == 3
    traj = _run(ckpts, results=results)
    assert traj.num_reused == 3 and traj.num_computed == 2
    assert len(read(results).rows) == 5
    for line in results.read_text().splitlines():
        json.loads(line)


def test_changed_settings_are_named_not_mixed(ckpts, tmp_path):
    results = tmp_path / "r.jsonl"
    _run(ckpts, results=results)
    with pytest.raises(SettingsChangedError, match=r"localization: 1\.0 -> 5\.0") as err:
        _run(ckpts, results=results, localization=5.0)
    assert "overwrite=True" in str(err.value)
    with pytest.raises(SettingsChangedError, match=r"num_draws: 60 -> 61"):
        _run(ckpts, results=results, num_draws=61)
    with pytest.raises(SettingsChangedError, match="loss_fn"):
        llc_trajectory(ckpts, h.linear, h.loader(), lambda m, b: h.nll(m, b), results=results,
                       progress=False, **SETTINGS)  # fmt: skip
    with pytest.raises(SettingsChangedError, match=r"data\.n: 256 -> 128"):
        llc_trajectory(ckpts, h.linear, h.loader(n=128), h.nll, results=results,
                       progress=False, **SETTINGS)  # fmt: skip
    assert len(read(results).rows) == 5  # nothing was appended
    redone = _run(ckpts, results=results, localization=5.0, overwrite=True)
    assert redone.num_computed == 5 and redone.num_reused == 0
    assert read(results).header["settings"]["estimate_llc"]["localization"] == 5.0


def test_a_file_from_before_an_option_was_added_resumes(ckpts, tmp_path):
    # a file written by an slt without estimate_llc's microbatch option: its header lacks the
    # key and its hash covered the settings without it
    results = tmp_path / "r.jsonl"
    first = _run(ckpts, results=results)
    lines = results.read_text().splitlines()
    header = json.loads(lines[0])
    del header["settings"]["estimate_llc"]["microbatch"]
    rows = [json.loads(line) for line in lines[1:]]
    for entry in [header, *rows]:  # the hash it had: over the settings without the option
        entry["settings_hash"] = "0" * 16
    results.write_text("\n".join(json.dumps(entry) for entry in [header, *rows]) + "\n")
    again = _run(ckpts, results=results, microbatch=None)  # what the file's run did
    assert again.num_computed == 0 and again.num_reused == 5
    np.testing.assert_array_equal(again.llc, first.llc)
    # rows appended now carry this run's hash; the file still resumes
    extra = ckpts / "step_00099.pt"
    torch.save(h.linear().state_dict(), extra)
    more = _run(ckpts, results=results, microbatch=None)
    assert more.num_computed == 1 and more.num_reused == 5
    assert _run(ckpts, results=results, microbatch=None).num_computed == 0
    with pytest.raises(SettingsChangedError, match=r"microbatch: \(absent\) -> 8"):
        _run(ckpts, results=results, microbatch=8)
    # the default came later: "auto" is not what the file's run had
    with pytest.raises(SettingsChangedError, match=r'microbatch: \(absent\) -> "auto"'):
        _run(ckpts, results=results)


def test_changed_checkpoint_is_detected(ckpts, tmp_path):
    results = tmp_path / "r.jsonl"
    _run(ckpts, results=results)
    torch.save(h.linear().state_dict(), ckpts / "step_00020.pt")
    with pytest.raises(ValueError, match="'step_00020.pt' has changed"):
        _run(ckpts, results=results)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SLT_TEST_MARKER']}",))


def test_checkpoint_that_would_run_code_is_refused(ckpts, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SLT_TEST_MARKER", str(marker))
    state = h.linear().state_dict()
    torch.save({"weight": state["weight"], "bias": state["bias"], "x": _RunsCode()},
               ckpts / "step_00050.pt")  # fmt: skip
    with pytest.raises(ValueError, match="refusing to load checkpoint .*step_00050.pt"):
        _run(ckpts)
    assert not marker.exists()


def test_state_dicts_in_memory_and_steps():
    states = {s: h.linear().state_dict() for s in (100, 0, 50)}
    traj = llc_trajectory(states, h.linear, h.loader(), h.nll, progress=False, **SETTINGS)
    assert traj.steps.tolist() == [0, 50, 100]
    assert traj.labels == ("step 0", "step 50", "step 100")
    jobs = make_jobs([states[0], states[50]], steps=[7, 3])
    assert [j.step for j in jobs] == [3, 7]
    with pytest.raises(ValueError, match="steps has 1 entries for 2 checkpoints"):
        make_jobs([states[0], states[50]], steps=[1])


def test_bad_arguments_are_named(ckpts):
    with pytest.raises(TypeError, match="unknown setting.*num_drawz"):
        _run(ckpts, num_drawz=5)
    with pytest.raises(ValueError, match="executor must be one of"):
        _run(ckpts, executor="threads")
    with pytest.raises(TypeError, match="loss_fn=.*does not pickle.*module"):
        llc_trajectory(ckpts, h.linear, h.loader(), lambda m, b: h.nll(m, b),
                       executor="process", progress=False, **SETTINGS)  # fmt: skip
    with pytest.raises(ValueError, match=r"missing keys \(none\); unexpected keys bias"):
        llc_trajectory(ckpts, lambda: torch.nn.Linear(3, 1, bias=False),
                       h.loader(), h.nll, progress=False, **SETTINGS)  # fmt: skip


def test_serial_and_process_give_identical_numbers(ckpts):
    serial = _run(ckpts)
    pooled = _run(ckpts, executor="process", max_workers=2)
    np.testing.assert_array_equal(pooled.llc, serial.llc)
    np.testing.assert_array_equal(pooled.llc_per_chain, serial.llc_per_chain)
    np.testing.assert_array_equal(pooled.mcse, serial.mcse)
    assert {r["pid"] for r in pooled.rows}.isdisjoint({os.getpid()})


def test_ray_gives_identical_numbers(ckpts, tmp_path, ray_cluster):
    serial = _run(ckpts)
    on_ray = _run(ckpts, executor="ray", results=tmp_path / "r.jsonl")
    np.testing.assert_array_equal(on_ray.llc, serial.llc)
    np.testing.assert_array_equal(on_ray.llc_per_chain, serial.llc_per_chain)
    assert len(read(tmp_path / "r.jsonl").rows) == 5


def test_jobs_pickle(ckpts):
    for job in make_jobs(ckpts):
        assert pickle.loads(pickle.dumps(job)) == job
