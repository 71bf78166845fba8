"""The eager vmap step against the compiled one (``compile=True``), per chain-step.

    python benchmarks/bench_compile.py [--quick]

For each model and chain count: µs per chain-step of ``estimate_llc`` with
``chain_method="loop"``, ``"vmap"`` (its gradient pass eager, and replayed from its traced
graph as in runs of ``slt.traced.MIN_STEPS`` steps or more), and ``"vmap"`` with
``compile=True`` (median of
repeats, fixed cost removed by also timing a 1-step call); the seconds the first compiled
call took beyond an eager one (compilation); the same for a second estimate on a perturbed
copy of the model (a "checkpoint": should be ~0 s and compile no graph); and the largest
difference between the eager and compiled loss traces over 20 steps.
The compile cache on disk starts empty (a fresh ``TORCHINDUCTOR_CACHE_DIR``), so the first
row's compile time includes torch's one-off start-up of the compiler.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="slt-inductor-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import torch  # noqa: E402

import _common  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
import cases  # noqa: E402
import slt  # noqa: E402
from slt import compiled, zoo  # noqa: E402


def timed(case, model, chains, draws, chain_method="vmap", **kw):
    start = time.perf_counter()
    res = slt.estimate_llc(model, case.loader(128), case.loss_fn, step_size=5e-5,
                           num_chains=chains, num_burnin=0, num_draws=draws, acceptance_every=0,
                           progress=False, chain_method=chain_method, **kw)  # fmt: skip
    return time.perf_counter() - start, res


def per_chain_step(case, chains, steps, repeats, traced=False, **kw):
    def call(draws):
        return timed(case, case.model, chains, draws, **kw)[0]

    with _common.traced_passes(traced):
        call(5)  # warm-up (and the trace, cached for the timed calls)
        return _common.per_chain_step(call, chains, steps, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    header = _common.one_thread_header()  # one thread from here on
    steps, repeats = (100, 3) if args.quick else (300, 3)
    runs = [
        (zoo.regular(10), (4, 16)),
        (zoo.deep_linear((20, 40, 80, 80), 10), (4, 16)),
        (cases.realizable_transformer(), (4,)),
    ]  # the transformer: compute-bound, 4 chains only
    print(header)
    print(
        "| case | d | chains | compile s | checkpoint s (graphs) | µs/chain-step: loop "
        "| vmap eager | vmap traced | compiled | compiled speed-up over eager / traced "
        "| max trace diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case, chain_counts in runs:
        for chains in chain_counts:
            eager_short, ref = timed(case, case.model, chains, 20)
            first, res = timed(case, case.model, chains, 20, compile=True)
            diff = float(abs(ref.trace - res.trace).max())
            checkpoint = copy.deepcopy(case.model)
            with torch.no_grad():
                for p in checkpoint.parameters():
                    p.add_(0.01)
            before = compiled.compilations
            again, _ = timed(case, checkpoint, chains, 20, compile=True)
            eager_again, _ = timed(case, checkpoint, chains, 20)
            graphs = compiled.compilations - before
            loop = per_chain_step(case, chains, steps, repeats, chain_method="loop")
            eager = per_chain_step(case, chains, steps, repeats)
            traced = per_chain_step(case, chains, steps, repeats, traced=True)
            fast = per_chain_step(case, chains, steps, repeats, compile=True)
            print(f"| {case.name} | {case.num_params} | {chains} | {first - eager_short:.1f} "
                  f"| {again - eager_again:.2f} ({graphs}) | {loop:.0f} | {eager:.0f} "
                  f"| {traced:.0f} | {fast:.0f} | {eager / fast:.1f}x / {traced / fast:.1f}x "
                  f"| {diff:.1e} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
