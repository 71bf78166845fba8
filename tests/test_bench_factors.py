"""benchmarks/bench_factors.py runs end to end (``--smoke``): every model records its factor
table in the runs with the factors, and λ̂ agrees with the pass at w* they replace."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_factor_benchmark_smoke_run():
    cmd = [sys.executable, str(BENCH / "bench_factors.py"), "--smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| relu")]
    assert len(rows) == 3
    for name, _, table, *_, llc in rows:
        assert float(table) > 0, name  # a table was recorded (not "none recorded")
        without, with_factors = (float(v) for v in llc.split("/"))
        assert abs(with_factors - without) <= 1e-3 * abs(without), (name, llc)
