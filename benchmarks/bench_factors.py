"""The loop's gradient control variate with and without the factors of nn.Linear layers.

    python benchmarks/bench_factors.py [--quick] [--smoke]

For ReLU MLPs of 10k to 1.05M parameters (n = 4,096, batch 128), slt's defaults in the loop
(``chain_method="loop"``: gradient control variate, acceptance probe every 20 steps), once
with ∇L_B(w*) from the per-sample factors (:mod:`slt.factors`) and once with the pass at w*
they replace, alternating, several repeats. Reports the median seconds per estimate, the µs
per chain-step of each (fixed cost removed: the median 1-draw call), the size of the factor
table the runs recorded and λ̂ under both (equal up to rounding). The 1M model's table (63 MB)
is over the default ``slt.factors.BUDGET``; it is run with the budget raised, to show what
raising it buys.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from functools import partial

import _common  # benchmarks/ is on sys.path when run as a script
import cases as bench_cases
import slt
import slt.factors
import slt.tables

WIDTHS = [(20, 100, 80, 1), (100, 300, 300, 1), (256, 1024, 768, 1)]


TABLES: list[int] = []  # bytes of every factor table recorded, in order


@contextmanager
def factors(on: bool, budget: int):
    """Within it, the loop reads ∇L_B(w*) from the factors (``on``; each table's size goes
    to :data:`TABLES`) or runs the pass at w*."""
    saved = slt.tables.record_factors, slt.factors.BUDGET
    slt.factors.BUDGET = budget

    def record(*args):
        table = saved[0](*args)
        if table is not None:
            TABLES.append(table.table.nbytes)
        return table

    slt.tables.record_factors = record if on else lambda *args: None
    try:
        yield
    finally:
        slt.tables.record_factors, slt.factors.BUDGET = saved


def estimate(case, kw, budget, on, draws) -> tuple[float, float]:
    """Seconds and λ̂ of one estimate with the factors ``on`` or off."""
    with factors(on, budget):
        start = time.perf_counter()
        res = slt.estimate_llc(case.model, case.loader(128), case.loss_fn, num_draws=draws, **kw)
        return time.perf_counter() - start, res.llc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="one repeat of a few steps")
    args = parser.parse_args(argv)
    header = _common.one_thread_header()  # one thread from here on
    repeats = 1 if args.smoke else 3 if args.quick else 5
    print(header)
    print("| model | d | table MiB | chains × steps | s / estimate: pass at w* / factors "
          "| µs / chain-step: pass / factors | speed-up | λ̂: pass / factors |")  # fmt: skip
    print("|---|---:|---:|---|---|---|---:|---|")
    for widths in WIDTHS:
        case = bench_cases.realizable_mlp(widths)
        big = case.num_params > 500_000
        chains, steps = (2, 120) if big else (4, 600)
        if args.smoke:
            steps = 12
        budget = max(slt.factors.BUDGET, 2**24)
        kw = dict(step_size=5e-5, num_chains=chains, num_burnin=0, progress=False,
                  chain_method="loop", seed=0)  # fmt: skip
        times = {True: [], False: []}
        short = {True: [], False: []}
        llc = {}

        TABLES.clear()
        run = partial(estimate, case, kw, budget)
        run(True, 2), run(False, 2)  # warm-up
        for _ in range(repeats):
            for on in (False, True):
                seconds, llc[on] = run(on, steps)
                times[on].append(seconds)
                short[on].append(run(on, 1)[0])
        full = {on: statistics.median(v) for on, v in times.items()}
        step = {on: (full[on] - statistics.median(short[on])) / (chains * (steps - 1)) * 1e6
                for on in full}  # fmt: skip
        table = f"{TABLES[-1] / 2**20:.0f}" if TABLES else "none recorded"
        print(f"| {case.name} | {case.num_params} | {table} | {chains} × {steps} "
              f"| {full[False]:.2f} / {full[True]:.2f} | {step[False]:.0f} / {step[True]:.0f} "
              f"| {full[False] / full[True]:.2f}x | {llc[False]:.4g} / {llc[True]:.4g} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
