"""benchmarks/bench_gpu.py is otherwise run only when a GPU is lent: a CPU dry run of the
same code (``--device cpu --smoke``) keeps it working in between."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_benchmark_dry_runs_on_the_cpu():
    cmd = [sys.executable, str(BENCH / "bench_gpu.py"), "--device", "cpu", "--smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 4 and "dry run" in proc.stdout  # header + 2 cases × 2 chain counts
