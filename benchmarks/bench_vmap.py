"""Chains in a loop against all chains in one vmapped step, per chain-step.

    python benchmarks/bench_vmap.py [--quick] [--mlp] [--chains C ...]

Same model, data, settings and seeds for both, slt's defaults otherwise (gradient control
variate, MALA acceptance probe every 20 steps); reports µs per chain-step (median of
repeats, fixed cost removed by also timing a 1-step call) for the loop and vmap, each with
its gradient pass eager and replayed from a traced graph (``slt.traced``; vmapped estimates
of ``slt.traced.MIN_STEPS`` steps or more trace, and loops of
``slt.chains.LOOP_TRACE_MIN_STEPS`` chain-steps or more up to
``slt.chains.LOOP_TRACE_MAX_PARAMS`` parameters; the timed runs here are forced to), and the
speed-up of vmap over the loop, eager over eager and traced over traced.
``--mlp`` runs ReLU MLPs of 83k to 1.05M parameters at 4 chains instead: where the
crossover lies that ``chain_method="auto"`` uses (``slt.vmapped.VMAP_MAX_PARAMS``).
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
import cases as bench_cases
import slt
from slt import zoo


def per_chain_step(case, method, chains, steps, repeats, traced=False):
    kw = dict(
        step_size=5e-5, num_chains=chains, num_burnin=0, progress=False, chain_method=method
    )  # fmt: skip  (defaults otherwise: acceptance probe every 20)

    def call(draws):
        start = time.perf_counter()
        slt.estimate_llc(case.model, case.loader(128), case.loss_fn, num_draws=draws, **kw)
        return time.perf_counter() - start

    with _common.traced_passes(traced):
        call(5)  # warm-up (and the trace, cached for the timed calls)
        return _common.per_chain_step(call, chains, steps, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mlp", action="store_true", help="ReLU MLPs of 83k-1.05M parameters")
    parser.add_argument("--chains", type=int, nargs="+", metavar="C",
                        help="chain counts (default 4 8 16; with --mlp, 4)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.chains and min(args.chains) < 1:
        parser.error(f"--chains must be integers >= 1, got {args.chains}")
    header = _common.one_thread_header()  # one thread from here on
    steps, repeats = (100, 3) if args.quick else (300, 5)
    if args.mlp:  # realizable MLPs at their random init (benchmarks/cases.py), 4 chains
        widths = [(64, 256, 256, 1), (128, 384, 384, 1), (256, 512, 512, 1), (256, 1024, 768, 1)]
        cases = [bench_cases.realizable_mlp(w) for w in widths]
        chain_counts = (4,)
        steps = max(20, steps // 5)
    else:
        cases = [zoo.regular(10), zoo.deep_linear((8, 4, 8, 8), 4),
                 zoo.deep_linear((20, 40, 80, 80), 10)]  # fmt: skip
        chain_counts = (4, 8, 16)
    chain_counts = tuple(args.chains) if args.chains else chain_counts
    print(header)
    print("| case | d | chains | µs/chain-step: loop eager | loop traced | vmap eager "
          "| vmap traced | speed-up of vmap over the loop: eager / traced |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        for chains in chain_counts:
            loop = per_chain_step(case, "loop", chains, steps, repeats)
            loop_traced = per_chain_step(case, "loop", chains, steps, repeats, traced=True)
            eager = per_chain_step(case, "vmap", chains, steps, repeats)
            traced = per_chain_step(case, "vmap", chains, steps, repeats, traced=True)
            print(f"| {case.name} | {case.num_params} | {chains} | {loop:.0f} "
                  f"| {loop_traced:.0f} | {eager:.0f} | {traced:.0f} "
                  f"| {loop / eager:.2f}x / {loop_traced / traced:.2f}x |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
