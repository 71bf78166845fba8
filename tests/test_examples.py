"""examples/: the scripts the README tells users to run still run, end to end, on a
shortened training run (the full one takes ~25 s)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tms_development_runs_end_to_end(tmp_path):
    out = tmp_path / "tms"
    script = ROOT / "examples" / "tms_development.py"
    args = ["--out", str(out), "--steps", "4000", "--every", "800", "--no-progress"]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "table.txt").read_text()
    assert "6 checkpoints (6 computed, 0 reused" in table
    assert all(f"{k}-gon" in table for k in range(2, 7))
    assert "crossing" in table  # the phase diagram found where one k-gon overtakes another
    assert (out / "tms_development.png").stat().st_size > 0
    assert (out / "trajectory.jsonl").exists()
