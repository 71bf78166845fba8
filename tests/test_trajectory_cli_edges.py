"""Edge cases of trajectories (resuming, steps from names, failing checkpoints, a file per
checkpoint), of the command line's errors and of saved results."""

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import slt
from slt.trajectory import llc_trajectory, make_jobs
from slt.trajectory_file import read

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # spawned workers inherit sys.path
import _trajectory_helpers as h  # noqa: E402

TINY = dict(num_chains=2, num_draws=20, num_burnin=5, step_size=1e-3, seed=3, progress=False)


def _save_linears(folder, names):
    folder.mkdir(exist_ok=True)
    torch.manual_seed(0)
    for name in names:
        torch.save(h.linear().state_dict(), folder / name)


# 1. steps on resume; names without distinct numbers


def test_reused_rows_take_this_runs_steps_and_names_sort_naturally(tmp_path):
    folder, results = tmp_path / "ck", tmp_path / "r.jsonl"
    _save_linears(folder, ["ckpt_2.pt", "ckpt_10.pt", "ckpt_30.pt"])
    first = llc_trajectory(folder, h.linear, h.loader(), h.nll, results=results, **TINY)
    assert first.steps.tolist() == [2, 10, 30]
    _save_linears(folder, ["ckpt_final.pt"])
    with pytest.warns(UserWarning, match=r"no distinct step number \(ckpt_final.pt\)"):
        again = llc_trajectory(folder, h.linear, h.loader(), h.nll, results=results, **TINY)
    assert again.num_reused == 3 and again.num_computed == 1
    assert again.labels == ("ckpt_2.pt", "ckpt_10.pt", "ckpt_30.pt", "ckpt_final.pt")
    assert again.steps.tolist() == [0, 1, 2, 3]
    assert [r["step"] for r in again.rows] == [0, 1, 2, 3]
    np.testing.assert_array_equal(again.llc[:3], first.llc)


def test_steps_come_from_step_numbers_not_metrics_in_the_name(tmp_path):
    # Lightning's "{epoch}-{step}-{val_loss:.2f}": the last number was the metric's
    # decimals (steps 91, 8, 5: training in reverse, unwarned)
    folder = tmp_path / "ck"
    names = ["epoch=0-step=0-val_loss=0.91.ckpt", "epoch=3-step=150-val_loss=0.08.ckpt",
             "epoch=6-step=300-val_loss=0.05.ckpt"]  # fmt: skip
    _save_linears(folder, names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jobs = make_jobs(folder)
    assert sorted(j.step for j in jobs) == [0, 150, 300]
    assert {j.step: j.label for j in jobs}[0] == names[0]
    _save_linears(tmp_path / "plain", ["ckpt_10.pt", "ckpt-12.pth.tar", "global_step300.bin"])
    assert sorted(j.step for j in make_jobs(tmp_path / "plain")) == [10, 12, 300]
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError, match=r"\.pth\.tar, in any case\) and no checkpoint-<step> folders in"
    ):
        make_jobs(tmp_path / "empty")


def test_shared_numbers_fall_back_to_natural_order(tmp_path):
    folder = tmp_path / "ck"
    _save_linears(folder, ["run2_step100.pt", "run10_step100.pt", "run1_step100.pt"])
    with pytest.warns(UserWarning, match="run1_step100.pt, run2_step100.pt, run10_step100.pt"):
        jobs = make_jobs(folder)
    assert [(j.label, j.step) for j in jobs] == [
        ("run1_step100.pt", 0), ("run2_step100.pt", 1), ("run10_step100.pt", 2),
    ]  # fmt: skip


# 2. a callable setting resumes in a new process


def test_a_callable_setting_resumes_in_a_new_process(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(HERE)!r})
        import _trajectory_helpers as h
        from slt.trajectory import llc_trajectory

        def only_weight(name, p):
            return name == "weight"

        torch.set_num_threads(1)
        torch.manual_seed(0)
        ckpts = {{0: h.linear().state_dict(), 10: h.linear().state_dict()}}
        t = llc_trajectory(ckpts, h.linear, h.loader(), h.nll, results=sys.argv[1],
                           params=only_weight, num_chains=2, num_draws=10, num_burnin=2,
                           progress=False)
        print(t.num_computed, t.num_reused)
    """)
    results = tmp_path / "r.jsonl"

    def run():
        out = subprocess.run([sys.executable, "-c", script, str(results)], capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert run() == ["2", "0"]
    assert run() == ["0", "2"]
    params = read(results).header["settings"]["estimate_llc"]["params"]
    # module.qualname and a digest of its code (the same in the second process: it resumed)
    assert re.fullmatch(r"__main__\.only_weight \[[0-9a-f]{12}\]", params), params


# 3. equal numbers spelled int and float


def test_int_and_float_spellings_of_a_setting_resume(tmp_path):
    ckpts = {0: h.linear().state_dict(), 10: h.linear().state_dict()}
    results = tmp_path / "r.jsonl"
    kw = {**TINY, "results": results}
    llc_trajectory(ckpts, h.linear, h.loader(), h.nll, localization=1.0, nbeta=50.0, **kw)
    again = llc_trajectory(ckpts, h.linear, h.loader(), h.nll, localization=1, nbeta=50, **kw)
    assert again.num_reused == 2
    # a file hashed before numbers were normalised (another header hash) still resumes
    lines = results.read_text().splitlines()
    header = json.loads(lines[0]) | {"settings_hash": "0123456789abcdef"}
    rows = [json.loads(line) | {"settings_hash": "0123456789abcdef"} for line in lines[1:]]
    results.write_text("".join(json.dumps(r) + "\n" for r in [header, *rows]))
    old = llc_trajectory(ckpts, h.linear, h.loader(), h.nll, localization=1.0, nbeta=50.0, **kw)
    assert old.num_reused == 2
    with pytest.raises(slt.SettingsChangedError, match="localization: 1.0 -> 2"):
        llc_trajectory(ckpts, h.linear, h.loader(), h.nll, localization=2, nbeta=50, **kw)


# 4. a one-line file without a newline is not a results file


def test_a_one_line_file_without_newline_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"my": "precious config"}')
    ckpts = {0: h.linear().state_dict()}
    with pytest.raises(ValueError, match="not an slt trajectory results file.*overwrite=True"):
        llc_trajectory(ckpts, h.linear, h.loader(), h.nll, results=path, **TINY)
    assert path.read_text() == '{"my": "precious config"}'
    llc_trajectory(ckpts, h.linear, h.loader(), h.nll, results=path, overwrite=True, **TINY)
    assert read(path).header is not None


# 6. serial and process agree at the same thread count; rows record it


def test_serial_and_process_agree_at_two_threads(tmp_path):
    ckpts = {0: h.linear().state_dict(), 10: h.linear().state_dict()}
    torch.set_num_threads(2)
    serial = llc_trajectory(ckpts, h.linear, h.loader(), h.nll, **TINY)
    pooled = llc_trajectory(ckpts, h.linear, h.loader(), h.nll, executor="process",
                            max_workers=1, threads_per_worker=2, **TINY)  # fmt: skip
    np.testing.assert_array_equal(pooled.llc_per_chain, serial.llc_per_chain)
    assert [r["threads"] for r in serial.rows] == [2, 2]
    assert [r["threads"] for r in pooled.rows] == [2, 2]


# 7. record_path: one file per checkpoint; a failed call keeps an existing file


def test_record_path_gives_each_checkpoint_its_own_file(tmp_path):
    h5py = pytest.importorskip("h5py")
    torch.manual_seed(0)
    states = {0: h.linear().state_dict(), 20: h.linear().state_dict()}
    kw = dict(TINY, record="per_sample", record_every=5)
    traj = llc_trajectory(states, h.linear, h.loader(), h.nll,
                          record_path=str(tmp_path / "ps.h5"), **kw)  # fmt: skip
    paths = [r["per_sample_path"] for r in traj.rows]
    assert paths == [str(tmp_path / "ps.step0.h5"), str(tmp_path / "ps.step20.h5")]
    assert not (tmp_path / "ps.h5").exists()
    for step, path in zip(states, paths):
        model = h.linear()
        model.load_state_dict(states[step])
        direct = tmp_path / f"direct{step}.h5"
        slt.estimate_llc(model, h.loader(), h.nll, record_path=str(direct), **kw)
        with h5py.File(path) as a, h5py.File(direct) as b:
            np.testing.assert_array_equal(a["per_sample_loss"][()], b["per_sample_loss"][()])


def test_failed_per_sample_run_keeps_an_existing_file_and_stays_quiet(tmp_path):
    pytest.importorskip("h5py")
    path = tmp_path / "results.h5"
    path.write_bytes(b"precious earlier results " * 100)
    model = h.linear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(slt.DivergenceError):
            slt.estimate_llc(model, h.loader(), h.nll, step_size=1e3, record="per_sample",
                             record_every=1, record_path=str(path), num_chains=2,
                             num_draws=20, num_burnin=5, progress=False)  # fmt: skip
    assert path.read_bytes() == b"precious earlier results " * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.h5"]  # no temporary left


# 8. a checkpoint with a non-finite loss is one NaN row, not the end of the run


def test_a_checkpoint_with_a_nan_loss_is_recorded_and_the_rest_run(tmp_path):
    torch.manual_seed(0)
    good, bad, later = (h.linear().state_dict() for _ in range(3))
    bad["weight"][0, 0] = float("nan")
    results = tmp_path / "r.jsonl"
    traj = llc_trajectory({0: good, 10: bad, 20: later}, h.linear, h.loader(), h.nll,
                          results=results, **TINY)  # fmt: skip
    assert np.isfinite(traj.llc[[0, 2]]).all() and np.isnan(traj.llc[1])
    assert np.isnan(traj.loss[1])
    assert "the loss at w*" in traj.rows[1]["error"]
    assert "step 10: the loss at w*" in str(traj)
    assert len(read(results).rows) == 3


def test_a_diverged_checkpoint_keeps_its_loss():
    torch.manual_seed(0)
    state = h.linear().state_dict()
    kw = dict(TINY, step_size=1e3)
    traj = llc_trajectory({0: state}, h.linear, h.loader(), h.nll, **kw)
    assert np.isnan(traj.llc[0]) and "diverged" in traj.rows[0]["error"]
    model = h.linear()
    model.load_state_dict(state)
    direct = slt.estimate_llc(model, h.loader(), h.nll, **TINY)
    np.testing.assert_allclose(traj.loss[0], direct.init_loss, rtol=1e-6)  # float32 sums


# 10, 11. slt.load on what slt did not write; save of what load cannot read


def test_load_names_the_path_of_a_file_it_cannot_read(tmp_path):
    pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    for name, content in [("rand.nc", os.urandom(600)), ("empty.nc", b""),
                          ("text.nc", b"llc = 3\n")]:  # fmt: skip
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not a result saved by slt"):
            slt.load(tmp_path / name)


def test_load_refuses_an_edited_field_index(tmp_path):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    for index in ("{not json", "[1, 2]", '{"llc": 3}'):
        attrs = {"slt_schema": 1, "slt_result": "LLCResult", "slt_fields": index}
        xr.Dataset(attrs=attrs).to_netcdf(tmp_path / "f.nc", engine="h5netcdf")
        with pytest.raises(ValueError, match=r"f\.nc is not a result saved by slt.*slt_fields"):
            slt.load(tmp_path / "f.nc")


def test_save_refuses_a_result_load_cannot_read(tmp_path):
    pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    from slt import io
    from slt.phase import Candidate

    with pytest.raises(TypeError, match="result is a Candidate.*LLCResult"):
        io.save(Candidate("a", 0.1, 1.0), tmp_path / "cand.nc")
    assert not (tmp_path / "cand.nc").exists()


# 12. detect_transitions: unsorted steps are sorted, repeated ones refused


def test_transitions_sort_steps_and_refuse_repeats_and_unknown_signals():
    pytest.importorskip("ruptures")
    from slt.transitions import detect_transitions

    steps = np.arange(0, 60, 10)
    llc = np.where(steps < 30, 1.0, 3.0)
    loss = np.where(steps < 30, 0.5, 0.2)
    order = np.array([5, 0, 1, 4, 2, 3])
    want = detect_transitions({"steps": steps, "llc": llc, "loss": loss})
    got = detect_transitions({"steps": steps[order], "llc": llc[order], "loss": loss[order]})
    assert got.stages == want.stages == ((0, 20), (30, 50))
    assert got.change_points == want.change_points
    np.testing.assert_array_equal(got.steps, steps)
    twice = np.array([0, 10, 10, 30, 40, 50])
    with pytest.raises(ValueError, match=r"steps must be distinct; \[10\]"):
        detect_transitions({"steps": twice, "llc": llc, "loss": loss})
    with pytest.raises(ValueError, match="no signal 'lcc'"):
        detect_transitions({"steps": steps, "llc": llc, "loss": loss}, signals=("lcc",))
    with pytest.raises(ValueError, match="signals is empty"):
        detect_transitions({"steps": steps, "llc": llc, "loss": loss}, signals=())


# 5, 9, 13. the command line


USER = """
import torch

def make_model():
    return torch.nn.Linear(3, 1)

class MyData(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 3, generator=g)
        self.y = self.x[:, :1] + 0.3 * torch.randn(64, 1, generator=g)
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return self.x[i], self.y[i]

dataset = MyData()
"""
CLI_TINY = ["--num-chains", "2", "--num-draws", "10", "--num-burnin", "2", "--no-progress"]


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """A user's file with a Dataset class, a folder of two checkpoints, and a runner."""
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from slt.cli import app

    (tmp_path / "user_file.py").write_text(USER)
    _save_linears(tmp_path / "ck", ["m_0.pt", "m_5.pt"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield lambda *args: CliRunner().invoke(app, [str(a) for a in args])
    for module in [m for m in sys.modules if m.startswith("_slt_cli_")]:
        del sys.modules[module]


SPECS = ["--model", "user_file.py:make_model", "--data", "user_file.py:dataset"]


def test_process_executor_with_a_dataset_class_from_a_file(cli, tmp_path):
    out = cli("trajectory", "ck", *SPECS, *CLI_TINY, "--results", "p.jsonl", "--executor",
              "process", "--max-workers", "1", "--plot", "p.png")  # fmt: skip
    assert out.exit_code == 0, out.output
    serial = cli("trajectory", "ck", *SPECS, *CLI_TINY, "--results", "s.jsonl", "--plot", "s.png")
    assert serial.exit_code == 0, serial.output
    pooled, alone = read(tmp_path / "p.jsonl").rows, read(tmp_path / "s.jsonl").rows
    assert [r["pid"] for r in pooled] != [os.getpid()] * 2
    assert [r["llc"] for r in pooled] == [r["llc"] for r in alone]


def test_ray_executor_with_a_dataset_class_from_a_file(cli, tmp_path, ray_cluster):
    # Ray workers cannot import the file's module by its name: what it defines goes by value
    serial = cli("trajectory", "ck", *SPECS, *CLI_TINY, "--results", "s.jsonl", "--plot", "s.png")
    assert serial.exit_code == 0, serial.output
    out = cli("trajectory", "ck", *SPECS, *CLI_TINY, "--results", "r.jsonl", "--executor",
              "ray", "--plot", "r.png")  # fmt: skip
    assert out.exit_code == 0, out.output
    on_ray, alone = read(tmp_path / "r.jsonl").rows, read(tmp_path / "s.jsonl").rows
    assert [r["pid"] for r in on_ray] != [os.getpid()] * 2
    # rows are written as jobs finish, in any order on a cluster of two workers
    assert {r["step"]: r["llc"] for r in on_ray} == {r["step"]: r["llc"] for r in alone}
    from ray import cloudpickle

    assert not [m for m in cloudpickle.list_registry_pickle_by_value() if "_slt_cli_" in m]


def test_workers_skip_file_modules_that_are_gone(tmp_path):
    from slt import executors

    (tmp_path / "gone.py").write_text("X = 1\n")
    (tmp_path / "kept.py").write_text("X = 2\n")
    executors.load_file_module("_slt_test_gone", tmp_path / "gone.py")
    executors.load_file_module("_slt_test_kept", tmp_path / "kept.py")
    del sys.modules["_slt_test_gone"]  # as a test fixture cleans up
    (tmp_path / "kept.py").rename(tmp_path / "moved.py")
    executors.load_file_module("_slt_test_moved", tmp_path / "moved.py")
    try:
        live = executors._live_file_modules()
        assert "_slt_test_gone" not in live and "_slt_test_kept" not in live
        assert live["_slt_test_moved"] == str(tmp_path / "moved.py")
    finally:
        for name in ("_slt_test_gone", "_slt_test_kept", "_slt_test_moved"):
            sys.modules.pop(name, None)
            executors._FILE_MODULES.pop(name, None)


@pytest.mark.parametrize("command", ["llc", "trajectory", "evidence"])
@pytest.mark.parametrize("sigma", ["0", "-1"])
def test_bad_sigma_exits_2_naming_it(cli, command, sigma):
    folder = ["ck"] if command == "trajectory" else []
    out = cli(command, *folder, *SPECS, "--sigma", sigma, *CLI_TINY[-1:])
    assert out.exit_code == 2, out.output
    assert "--sigma" in out.output and "positive" in out.output


def test_output_paths_are_checked_before_sampling(cli, tmp_path, monkeypatch):
    import slt.llc

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the output path")

    monkeypatch.setattr(slt, "estimate_llc", no_sampling)
    monkeypatch.setattr(slt.llc, "estimate_llc", no_sampling)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = [
        (["llc", *SPECS, "--out", "adir"], "--out", "adir is a folder"),
        (["llc", *SPECS, "--out", "afile/x.nc"], "--out", "afile is a file"),
        (["trajectory", "ck", *SPECS, "--results", "adir"], "--results", "adir is a folder"),
        (["trajectory", "ck", *SPECS, "--plot", "nowhere/p.png"], "--plot", "nowhere does not"),
        (["trajectory", "ck", *SPECS, "--plot", "adir/p.v2"], "--plot", "cannot write .v2"),
        (["validate", "--out", "afile"], "--out", "afile is a file"),
        (["evidence", "--out", "afile"], "--out", "afile is a file"),
    ]
    for args, option, message in cases:
        out = cli(*args, *CLI_TINY[-1:])
        assert out.exit_code == 2, (args, out.output)
        assert option in out.output and message in out.output, (args, out.output)


def test_validate_checks_out_before_any_case(tmp_path, monkeypatch):
    import slt.validate as validate

    monkeypatch.setattr(validate, "run_case", lambda *a, **k: pytest.fail("ran a case"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is a file; give a folder"):
        validate.validate(out=tmp_path / "afile" / "sub", progress=False)


def test_plot_without_a_suffix_prints_the_file_written(cli, tmp_path):
    pytest.importorskip("matplotlib").use("Agg")
    out = cli("trajectory", "ck", *SPECS, *CLI_TINY, "--results", "r.jsonl", "--plot", "pic")
    assert out.exit_code == 0, out.output
    assert "plot in pic.png" in out.output and (tmp_path / "pic.png").is_file()


def test_help_shows_the_ray_extra(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = cli("trajectory", "--help")
    assert "(slt[ray])" in out.output


# a run that fails on a bad setting leaves the results file as it was


def test_a_run_that_fails_on_a_setting_leaves_the_results_file_as_it_was(tmp_path):
    ckpts = {0: h.linear().state_dict(), 1: h.linear().state_dict()}
    path = tmp_path / "r.jsonl"
    bad = TINY | {"step_size": -1.0}
    with pytest.raises(ValueError, match="step_size"):
        llc_trajectory(ckpts, h.linear, h.loader(), h.nll, results=path, **bad)
    assert not path.exists()  # no header-only file to block the corrected rerun
    good = llc_trajectory(ckpts, h.linear, h.loader(), h.nll, results=path, **TINY)
    before = path.read_bytes()
    assert len(before.splitlines()) == 3
    with pytest.raises(ValueError, match="step_size"):
        llc_trajectory(ckpts, h.linear, h.loader(), h.nll, results=path, overwrite=True, **bad)
    assert path.read_bytes() == before  # overwrite discards the rows only once one is ready
    again = llc_trajectory(ckpts, h.linear, h.loader(), h.nll, results=path, **TINY)
    assert again.num_reused == 2
    np.testing.assert_array_equal(again.llc, good.llc)


def test_a_header_without_rows_does_not_block_other_settings(tmp_path):
    # a file an earlier slt left with its header only, from a run that then failed
    ckpts = {0: h.linear().state_dict()}
    path = tmp_path / "r.jsonl"
    llc_trajectory(ckpts, h.linear, h.loader(), h.nll, results=path, **TINY)
    path.write_bytes(path.read_bytes().splitlines(keepends=True)[0])
    res = llc_trajectory(ckpts, h.linear, h.loader(), h.nll, results=path, localization=2.0,
                         **TINY)  # fmt: skip
    assert res.num_reused == 0
    contents = read(path)
    assert contents.header["settings"]["estimate_llc"]["localization"] == 2.0
    assert len(contents.rows) == 1


# failures, concurrent runs and identities (an audit)


def test_record_paths_are_the_callers_and_a_failed_one_names_no_file(tmp_path, monkeypatch):
    pytest.importorskip("h5py")
    torch.manual_seed(0)
    good, bad = h.linear().state_dict(), h.linear().state_dict()
    bad["weight"][0, 0] = float("nan")
    monkeypatch.chdir(tmp_path)
    traj = llc_trajectory({0: good, 10: bad}, h.linear, h.loader(), h.nll, record="per_sample",
                          record_every=5, record_path="ps.h5", **TINY)  # fmt: skip
    assert traj.rows[0]["per_sample_path"] == str(tmp_path / "ps.step0.h5")  # absolute
    assert "per_sample_path" not in traj.rows[1]  # no λ̂, no file
    with pytest.raises(ValueError, match="record_path=.* is a folder"):
        slt.estimate_llc(h.linear(), h.loader(), h.nll, record="per_sample",
                         record_path=str(tmp_path), **TINY)  # fmt: skip


def test_one_file_at_two_steps_is_two_checkpoints(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(h.linear().state_dict(), path)
    jobs = make_jobs({0: str(path), 10: str(path)})
    assert [j.step for j in jobs] == [0, 10] and len({j.label for j in jobs}) == 2
    traj = llc_trajectory({0: str(path), 10: str(path)}, h.linear, h.loader(), h.nll, **TINY)
    assert traj.steps.tolist() == [0, 10]


class _ScaledNLL:  # a callable object with the default repr (a memory address)
    def __init__(self, scale):
        self.scale = scale

    def __call__(self, model, batch):
        return self.scale * h.nll(model, batch)


def test_a_callable_object_is_identified_by_its_state_not_its_address():
    from slt.checkpoint_jobs import describe

    a, b = describe(_ScaledNLL(1.0)), describe(_ScaledNLL(1.0))
    assert a == b and "0x" not in a and "scale=1.0" in a
    assert describe(_ScaledNLL(2.0)) != a


def test_two_runs_creating_one_results_file_keep_both_rows(tmp_path):
    from slt.trajectory_file import ResultsFile, SettingsChangedError

    path = tmp_path / "r.jsonl"
    first, second = ResultsFile(path), ResultsFile(path)
    for file in (first, second):  # both open it while it does not exist yet
        assert file.open({"a": 1}, "hash1", overwrite=False, defaults={}) == []
    first.append({"label": "x", "settings_hash": "hash1"})
    second.append({"label": "y", "settings_hash": "hash1"})
    contents = read(path)
    assert [r["label"] for r in contents.rows] == ["x", "y"]
    other = ResultsFile(tmp_path / "s.jsonl")
    other.open({"a": 2}, "hash2", overwrite=False, defaults={})
    ResultsFile(tmp_path / "s.jsonl").open({"a": 1}, "hash1", overwrite=False, defaults={})
    late = ResultsFile(tmp_path / "s.jsonl")
    late.open({"a": 1}, "hash1", overwrite=False, defaults={})
    other.append({"label": "x", "settings_hash": "hash2"})
    with pytest.raises(SettingsChangedError, match="created by another run meanwhile"):
        late.append({"label": "y", "settings_hash": "hash1"})


def test_a_process_pool_keeps_the_rows_of_jobs_running_when_another_fails(tmp_path):
    counter = tmp_path / "calls"
    good, corrupt = tmp_path / "step_0.pt", tmp_path / "step_10.pt"
    torch.save(h.linear().state_dict(), good)
    poisoned = h.linear().state_dict()  # it loads; the loss refuses it when its turn comes
    poisoned["weight"].fill_(123.0)
    torch.save(poisoned, corrupt)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        import _trajectory_helpers as h
        from slt.trajectory import llc_trajectory
        try:
            llc_trajectory([{str(good)!r}, {str(corrupt)!r}], h.counting_linear, h.loader(),
                           h.picky_nll, results={str(tmp_path / "r.jsonl")!r}, executor="process",
                           max_workers=2, num_chains=2, num_draws=20, num_burnin=5,
                           progress=False)
        except ValueError as err:
            print("raised", err)
    """)
    env = {**os.environ, "SLT_TEST_COUNTER": str(counter), "SLT_TEST_SLEEP": "1.0"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0 and "raised" in proc.stdout, proc.stderr[-2000:]
    assert [r["label"] for r in read(tmp_path / "r.jsonl").rows] == ["step_0.pt"]


def test_a_resume_with_another_closure_or_another_loader_draw_is_refused(tmp_path):
    # closures of one factory (and lambdas) were named alike, and the loader's shuffle was
    # not recorded: a resume returned the old rows for the new settings
    from slt.trajectory_file import SettingsChangedError

    ckpts = {0: h.linear().state_dict()}

    def scaled(s):
        return lambda model, batch: s * h.nll(model, batch)

    results = tmp_path / "r.jsonl"
    first = llc_trajectory(ckpts, h.linear, h.loader(), scaled(1.0), results=results, **TINY)
    again = llc_trajectory(ckpts, h.linear, h.loader(), scaled(1.0), results=results, **TINY)
    assert again.num_reused == 1 and again.llc.tolist() == first.llc.tolist()
    with pytest.raises(SettingsChangedError, match="loss_fn"):
        llc_trajectory(ckpts, h.linear, h.loader(), scaled(0.7), results=results, **TINY)
    ordered = torch.utils.data.DataLoader(h.data(), batch_size=32, shuffle=False)
    with pytest.raises(SettingsChangedError, match="data.shuffle: true -> false"):
        llc_trajectory(ckpts, h.linear, ordered, scaled(1.0), results=results, **TINY)
    dropping = torch.utils.data.DataLoader(h.data(), batch_size=30, shuffle=True, drop_last=True)
    with pytest.raises(SettingsChangedError, match="drop_last"):
        llc_trajectory(ckpts, h.linear, dropping, scaled(1.0), results=results, **TINY)


def test_a_serial_trajectory_leaves_the_global_rng_alone():
    # the model factory's random initialization, overwritten at once, drew from it
    torch.manual_seed(5)
    llc_trajectory({0: h.linear().state_dict()}, h.linear, h.loader(), h.nll, **TINY)
    after = torch.rand(1)
    torch.manual_seed(5)
    h.linear()  # what the line above draws before the trajectory
    assert torch.equal(after, torch.rand(1))


@pytest.mark.parametrize("option", ["max_workers", "threads_per_worker"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_executor_sizes_are_checked_by_name(option, value):
    # max_workers=0 meant every CPU; -1, "2", threads 0 were bare errors from the pool
    with pytest.raises(ValueError, match=f"{option} must be None or an integer >= 1"):
        llc_trajectory({0: h.linear().state_dict()}, h.linear, h.loader(), h.nll,
                       executor="process", **{option: value}, **TINY)  # fmt: skip


def test_checkpoint_suffixes_in_any_case_and_pth_tar(tmp_path):
    _save_linears(tmp_path, ["ckpt_10.pt", "ckpt_20.PT", "ckpt_40.pth.tar", "notes.txt"])
    assert [(j.label, j.step) for j in make_jobs(tmp_path)] == [
        ("ckpt_10.pt", 10), ("ckpt_20.PT", 20), ("ckpt_40.pth.tar", 40)]  # fmt: skip


def test_process_workers_take_the_callers_default_dtype(tmp_path):
    # spawned workers started at float32: float64 data met a float32 model and raised
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ckpts = {0: h.linear().state_dict()}
        serial = llc_trajectory(ckpts, h.linear, h.loader(), h.nll, **TINY)
        pooled = llc_trajectory(ckpts, h.linear, h.loader(), h.nll, executor="process",
                                max_workers=1, **TINY)  # fmt: skip
    finally:
        torch.set_default_dtype(previous)
    assert pooled.llc.tolist() == serial.llc.tolist()


def test_a_worker_that_cannot_set_up_or_dies_is_said_by_name(tmp_path):
    import types

    from slt.trajectory_file import read as read_file

    # a factory that pickles by a name a fresh process lacks (as a notebook's function):
    # BrokenProcessPool, the cause only in a child's stderr
    fake = types.ModuleType("_slt_fake_module")
    exec("import torch\ndef factory():\n    return torch.nn.Linear(3, 1)", fake.__dict__)
    fake.factory.__module__ = "_slt_fake_module"
    sys.modules["_slt_fake_module"] = fake
    try:
        with pytest.raises(RuntimeError, match="a worker process could not set up"):
            llc_trajectory({0: h.linear().state_dict()}, fake.factory, h.loader(), h.nll,
                           executor="process", max_workers=1, **TINY)  # fmt: skip
    finally:
        del sys.modules["_slt_fake_module"]
    # a worker that dies mid-job: named checkpoints, the rows written before kept
    alive, dying = h.linear(), h.linear()
    with torch.no_grad():
        alive.bias.fill_(-1.0)
        dying.bias.fill_(1.0)
    results = tmp_path / "r.jsonl"
    with pytest.raises(RuntimeError, match=r"a worker process died .* step 10"):
        llc_trajectory({0: alive.state_dict(), 10: dying.state_dict()}, h.linear, h.loader(),
                       h.dies_on_positive_bias, results=results, executor="process",
                       max_workers=1, **TINY)  # fmt: skip
    assert [r["label"] for r in read_file(results).rows] == ["step 0"]


def test_a_list_mixing_paths_and_state_dicts_warns_that_its_steps_are_positions(tmp_path):
    # the warning came only when every checkpoint was a path: [ckpt_10.pt, state] was
    # silently steps 0 and 1
    _save_linears(tmp_path, ["ckpt_10.pt"])
    with pytest.warns(UserWarning, match=r"no distinct step number \(state dict \[1\]\)"):
        jobs = make_jobs([str(tmp_path / "ckpt_10.pt"), h.linear().state_dict()])
    assert [j.step for j in jobs] == [0, 1]


def test_cli_trajectory_refuses_rows_of_an_edited_model_file_or_other_data(cli, tmp_path):
    # the results file knew --model and --data only by their text: an edited model file or
    # another Dataset of the same size resumed the old rows
    first = cli("trajectory", "ck", *SPECS, *CLI_TINY, "--results", "r.jsonl")
    assert first.exit_code == 0, first.output
    again = cli("trajectory", "ck", *SPECS, *CLI_TINY, "--results", "r.jsonl")
    assert again.exit_code == 0 and "reused" in again.output, again.output
    (tmp_path / "user_file.py").write_text(USER + "\nother = MyData()\nother.y = other.y * 10\n")
    for module in [m for m in sys.modules if m.startswith("_slt_cli_")]:
        del sys.modules[module]
    edited = cli("trajectory", "ck", *SPECS, *CLI_TINY, "--results", "r.jsonl")
    assert edited.exit_code == 2 and "--model" in edited.output and "--overwrite" in edited.output
    specs = ["--model", "user_file.py:make_model", "--data", "user_file.py:other"]
    other = cli("trajectory", "ck", *specs, *CLI_TINY, "--results", "s.jsonl")
    assert other.exit_code == 0, other.output
    swapped = cli("trajectory", "ck", *SPECS, *CLI_TINY, "--results", "s.jsonl")
    assert swapped.exit_code == 2 and "data.spec" in swapped.output


def test_cli_trajectory_exits_1_for_what_sampling_could_not_do(cli, tmp_path):
    # a step --compile cannot compile exited 2 here (the status of a bad option), 1 in llc
    (tmp_path / "user_file.py").write_text(
        USER
        + """
class Breaks(torch.nn.Linear):
    def forward(self, x):
        torch._dynamo.graph_break()
        return super().forward(x)

def breaks():
    return Breaks(3, 1)
"""
    )
    specs = ["--model", "user_file.py:breaks", "--data", "user_file.py:dataset"]
    out = cli("trajectory", "ck", *specs, *CLI_TINY, "--compile", "--results", "c.jsonl")
    assert out.exit_code == 1 and "drop --compile" in out.output, out.output


def test_results_that_is_a_folder_or_empty_is_named_before_sampling(tmp_path):
    folder = tmp_path / "ck"
    _save_linears(folder, ["a_1.pt"])
    calls = []

    def model():
        calls.append(1)
        return h.linear()

    for bad in ("", tmp_path):  # "" is the current folder
        with pytest.raises(ValueError, match=r"results=.* must be the path of a file"):
            llc_trajectory(folder, model, h.loader(), h.nll, results=bad, **TINY)
    assert not calls


class _FakeRay:
    """Ray as the executor sees it, with every task already finished when first waited on
    (the case that lost rows: a failed job listed first, the others done but not collected)."""

    def __init__(self, function):
        self.function, self.cancelled = function, []

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return {"CPU": 2}

    def put(self, value):
        return value

    def remote(self, task):
        fake = self

        class Remote:
            def options(self, **_):
                return self

            def remote(self, function, shared, job, threads, dtype):
                return ("ref", job, fake.function)

        return Remote()

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref[2](None, ref[1])

    def cancel(self, ref):
        self.cancelled.append(ref[1])


def test_ray_keeps_the_results_of_jobs_finished_when_another_fails(monkeypatch):
    from slt import executors

    pytest.importorskip("ray")

    def function(shared, job):
        if job == "bad":
            raise ValueError("bad checkpoint")
        return job.upper()

    fake = _FakeRay(function)
    monkeypatch.setattr(executors, "_ray", lambda: fake)
    monkeypatch.setattr(
        executors, "_file_modules_by_value", lambda: __import__("contextlib").nullcontext()
    )
    written = []
    with pytest.raises(ValueError, match="bad checkpoint"):
        executors.run_jobs(function, None, ["bad", "good", "also"],
                           lambda job, row: written.append((job, row)), executor="ray")  # fmt: skip
    assert written == [("good", "GOOD"), ("also", "ALSO")] and fake.cancelled == []


def test_a_model_instead_of_a_factory_and_a_bad_device_are_named_before_any_job(tmp_path):
    ckpts = {0: h.linear().state_dict()}
    with pytest.raises(TypeError, match=r"model_factory must be a function .* got Linear"):
        llc_trajectory(ckpts, h.linear(), h.loader(), h.nll, **TINY)
    with pytest.raises(ValueError, match=r"device must be \"auto\" or a torch device .* 'gpu'"):
        llc_trajectory(ckpts, h.linear, h.loader(), h.nll, device="gpu", **TINY)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda', but this PyTorch has no CUDA"):
            llc_trajectory(ckpts, h.linear, h.loader(), h.nll, device="cuda", **TINY)


def test_cli_says_library_warnings_and_shape_errors_in_one_line(cli, tmp_path):
    # the steps warning leaked as a raw Python warning with its source line and advised
    # steps=, an option the command lacks; a shape mismatch printed torch's lines and tabs
    _save_linears(tmp_path / "dup", ["a_step5.pt", "b_step5.pt"])
    out = cli("trajectory", "dup", *SPECS, *CLI_TINY, "--results", "d.jsonl")
    assert out.exit_code == 0, out.output
    assert "warning: checkpoint names give no distinct step number" in out.output
    assert "rename the files to set them" in out.output and "steps=" not in out.output
    assert "UserWarning" not in out.output
    (tmp_path / "wide").mkdir()
    torch.save(torch.nn.Linear(4, 1).state_dict(), tmp_path / "wide" / "w_1.pt")
    out = cli("trajectory", "wide", *SPECS, *CLI_TINY, "--results", "w.jsonl")
    assert out.exit_code == 2
    (line,) = [x for x in out.output.splitlines() if "does not fit the model" in x]
    assert line.endswith("shapes differ: weight (1, 4) (model (1, 3))")


def test_a_bad_checkpoint_stops_the_run_before_any_sampling(tmp_path):
    # a garbage file, or one of another model (an optimizer.pt beside the weights), stopped
    # the run only when its turn came, after the others had sampled
    folder, results = tmp_path / "ck", tmp_path / "r.jsonl"
    _save_linears(folder, ["step_0.pt", "step_50.pt"])
    calls = []

    def counting_nll(model, batch):
        calls.append(1)
        return h.nll(model, batch)

    (folder / "step_99.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="step_99.pt"):
        llc_trajectory(folder, h.linear, h.loader(), counting_nll, results=results, **TINY)
    (folder / "step_99.pt").unlink()
    torch.save(torch.nn.Linear(4, 1).state_dict(), folder / "step_99.pt")
    with pytest.raises(ValueError, match=r"'step_99.pt' does not fit the model: shapes differ"):
        llc_trajectory(folder, h.linear, h.loader(), counting_nll, results=results, **TINY)
    assert not calls and not results.exists()
