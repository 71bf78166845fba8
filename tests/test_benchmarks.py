"""benchmarks/bench_llc.py runs end to end (its --smoke mode) and its memory child reports.

Skipped without devinterp (in the test extra and the bench extra). The numbers of a smoke run mean
nothing (12 steps, one repeat); these tests check that every row runs and is reported.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("devinterp") is None, reason="needs devinterp (the bench extra)"
)


def test_smoke_run_reports_every_method_on_a_small_case(tmp_path):
    # one case runs every method (two took 40-76 s of the suite); the timeout is a guard
    # against a hang, not a speed test (a busy 2-core machine took 76 s for two)
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, str(BENCH / "bench_llc.py"), "--smoke", "--no-memory",
           "--cases", "rrr", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["key"] for r in report["results"]] == ["rrr"]
    assert report["meta"]["mode"] == "smoke" and report["meta"]["devinterp"] == "2.0.1"
    for res in report["results"]:
        methods = res["methods"]
        assert len(methods) == 10 and res["lam"] > 0  # the compiled rows included
        for name, m in methods.items():
            assert m["median_call_s"] > 0 and m["fixed_ms"] > 0, (res["key"], name)
            assert m["label"] in report["table"]
            if name != "sgd":  # every sampler returns one finite λ̂ per chain
                assert m["llc_chains_pooled"] == 2, (res["key"], name)
        assert methods["devinterp-llc"]["devinterp_llc_over_this"] == 1.0
        assert methods["sgd"]["x_sgd_step"] == 1.0
        assert f"With compile=True on {res['case']}" in report["table"]
        assert set(res["machine"]) == {"before", "after"}  # the machine's speed, both ends
    assert "Machine speed (" in report["table"]


def test_memory_child_measures_a_fresh_process():
    sys.path.insert(0, str(BENCH))  # the benchmark imports its helper modules by name
    try:
        import _memory
        import cases
        from _common import Run
    finally:
        sys.path.remove(str(BENCH))
    case = cases.build("regular")
    figures = _memory.measure(case, Run(2, 2, 10, 1), ["sgd"], BENCH / "bench_llc.py")
    sgd = figures["sgd"]
    assert sgd is not None
    assert sgd["increase_mb"] >= 0 and 0 < sgd["before_call_mb"] <= sgd["peak_mb"]
    assert sgd["repeat_increase_mb"] >= 0  # the second call, from a peak mark reset again
    if sys.platform == "linux":  # the peak mark was reset after imports and the warm-up
        assert sgd["hwm_reset"]


def test_compiled_rows_run_after_the_others_and_each_warm_up_is_a_full_call(monkeypatch):
    # what compiling leaves in a process slowed devinterp's gc.collect() by half and was
    # replayed by short eager runs: every other row is timed before any compiled one
    sys.path.insert(0, str(BENCH))
    import bench_llc
    from _common import Run

    calls = []

    def method(name):
        return lambda case, run, seed, nbeta: calls.append((name, run.num_draws))

    names = ["slt-compiled", "slt", "devinterp-llc", "slt-plain-compiled"]
    monkeypatch.setattr(bench_llc, "METHODS", {n: bench_llc.Method(n, method(n)) for n in names})
    monkeypatch.setattr(bench_llc._devinterp, "check_per_sample_loss", lambda case: None)
    monkeypatch.setattr(bench_llc, "machine_speed", lambda: {})
    monkeypatch.setattr(bench_llc, "noise_draw_us", lambda d: 1.0)

    class Case:
        name, num_params, n, lam = "fake", 3, 100, None

    bench_llc.bench_case(Case(), Run(2, 3, 7, 2), names)
    order = [name for name, _ in calls]
    last_plain = max(i for i, n in enumerate(order) if n in ("slt", "devinterp-llc"))
    assert all(order.index(n) > last_plain for n in ("slt-compiled", "slt-plain-compiled"))
    warm_ups = [draws for name, draws in calls[:2]]  # the first calls: full runs, not 20 draws
    assert warm_ups == [7, 7]
    calls.clear()  # a case without compiled rows (the 1M model)
    bench_llc.bench_case(Case(), Run(2, 3, 7, 2), ["slt", "devinterp-llc"])
    assert {name for name, _ in calls} == {"slt", "devinterp-llc"}


def test_devinterp_llc_row_runs_on_the_models_device_where_cuda_is_there(monkeypatch):
    # llc() picks CUDA whenever torch says it is there: on a GPU machine the row moved the
    # model to the GPU (or failed: the row ids index CPU tensors) while slt ran on the CPU
    sys.path.insert(0, str(BENCH))
    try:
        import cases
        from _common import Run
        from _devinterp import run_devinterp_llc
    finally:
        sys.path.remove(str(BENCH))
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    case = cases.build("regular")
    llc = run_devinterp_llc(case, Run(2, 2, 10, 1), seed=0, nbeta=100.0)
    assert llc.shape == (2,) and next(case.model.parameters()).device.type == "cpu"


def test_the_language_model_translation_runs():
    # benchmarks/devinterp_lm.py: the README's devinterp table on sequences (numbers of a
    # smoke run mean nothing; every row must be there and finite)
    cmd = [sys.executable, str(BENCH / "devinterp_lm.py"), "--smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count(" ± ") == 4 and "7× hotter" in proc.stdout
