"""Chains in a loop against all chains in one vmapped step, per chain-step.

    python benchmarks/bench_vmap.py [--quick]

Same model, data, settings and seeds for both, slt's defaults otherwise (gradient control
variate, MALA acceptance probe every 20 steps); reports µs per chain-step (median of
repeats, fixed cost removed by also timing a 1-step call) and the speed-up of vmap.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import _common  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
import slt
from slt import zoo


def per_chain_step(case, method, chains, steps, repeats):
    kw = dict(
        step_size=5e-5, num_chains=chains, num_burnin=0, progress=False, chain_method=method
    )  # fmt: skip  (defaults otherwise: acceptance probe every 20)

    def call(draws):
        start = time.perf_counter()
        slt.estimate_llc(case.model, case.loader(128), case.loss_fn, num_draws=draws, **kw)
        return time.perf_counter() - start

    call(5)  # warm-up
    return _common.per_chain_step(call, chains, steps, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps, repeats = (100, 3) if args.quick else (300, 5)
    cases = [zoo.regular(10), zoo.deep_linear((8, 4, 8, 8), 4),
             zoo.deep_linear((20, 40, 80, 80), 10)]  # fmt: skip
    cpu = platform.processor() or platform.machine()
    print(f"{time.strftime('%Y-%m-%d')}  torch {torch.__version__}  {cpu}  1 thread")
    print("| case | d | chains | loop µs/chain-step | vmap µs/chain-step | vmap speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for case in cases:
        for chains in (4, 8, 16):
            loop = per_chain_step(case, "loop", chains, steps, repeats)
            vmap = per_chain_step(case, "vmap", chains, steps, repeats)
            print(f"| {case.name} | {case.num_params} | {chains} | {loop:.0f} | {vmap:.0f} "
                  f"| {loop / vmap:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
