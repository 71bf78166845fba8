"""Peak memory of one full call, each method in a fresh process.

The parent pickles the built case and the run to a file and starts
``python bench_llc.py --memory-child FILE METHOD``. The child imports what the method needs
(torch and slt), loads the case, runs the method once on a tiny case (its lazy imports,
devinterp included, and torch's one-time set-up; see :func:`_warm_up`), then resets the
kernel's peak-RSS mark to the current RSS (writing 5 to ``/proc/self/clear_refs``, Linux ≥ 4.0),
so neither the imports nor loading the case count, runs one full call, and reads the peak
RSS again (``VmHWM``; see :func:`_peak_mb` for why not ``ru_maxrss``). It then resets the
mark once more and runs a second call (the next seed): the first call's figure includes
what a process pays once for a kind of model (a traced graph, the batching machinery's
first use of its operations), the second's is what each further estimate in a process
adds — the state the timings measure, which are medians of calls after a warm-up. Where the
reset is not allowed the baseline is the peak so far instead, and a call that stays under
the import peak reads as 0.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import cases
from slt import zoo


def _peak_mb() -> float:
    """This process's peak RSS in MB: ``VmHWM`` where /proc has it, else ``ru_maxrss``.

    ``ru_maxrss`` alone misleads in a child: Linux carries the high-water mark of the
    pre-exec address space (the forked copy of the parent) into it, so a child of a
    500 MB parent reports at least 500 MB. ``VmHWM`` counts this address space only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    per_mb = 1024**2 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _warm_up(method, run, nbeta_of) -> None:
    """The method once on a tiny linear regression (d = 2, n = 256, the same run): its
    lazy imports (slt's diagnostics pull in arviz-stats, torch's optimizers torch._dynamo)
    and torch's one-time set-up then count for no method, while the tiny model's own
    memory is negligible and hides nothing of the real call's."""
    tiny = cases.from_zoo(zoo.regular(2, n=256))
    method.run(tiny, run, 0, nbeta_of(tiny))


def child(path: Path, method: str, methods: dict, nbeta_of) -> dict:
    """Run ``methods[method]`` once on the pickled case; the peak-RSS figures as a dict."""
    saved = torch.load(path, weights_only=False)
    case, run = saved["case"], saved["run"]
    _warm_up(methods[method], run, nbeta_of)
    loaded = _peak_mb()  # the peak through imports, loading the case and the warm-up
    reset = _reset_peak()
    before = _peak_mb()
    methods[method].run(case, run, 0, nbeta_of(case))
    peak = _peak_mb()
    _reset_peak()
    again = _peak_mb()
    methods[method].run(case, run, 1, nbeta_of(case))
    return {"increase_mb": peak - before, "peak_mb": max(peak, loaded),
            "before_call_mb": before, "hwm_reset": reset,
            "repeat_increase_mb": _peak_mb() - again}  # fmt: skip


def measure(case, run, methods: list[str], script: Path, workers: int = 1) -> dict[str, dict]:
    """Peak-RSS figures per method (None where the child failed), each from a fresh
    ``script --memory-child`` process, ``workers`` at a time (each child's RSS is its own,
    so running them side by side changes no figure, only the wall time)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.pt"
        torch.save({"case": case, "run": run}, path)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            figures = pool.map(lambda method: _child_process(script, path, method), methods)
            return dict(zip(methods, figures))


def _child_process(script: Path, path: Path, method: str) -> dict | None:
    proc = subprocess.run(
        [sys.executable, str(script), "--memory-child", str(path), method],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        print(f"  memory {method}: failed ({tail[0]})", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])
