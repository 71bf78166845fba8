"""GPU check: chains in a loop against all chains vmapped, on models up to ~1M parameters.

    python benchmarks/bench_gpu.py [--quick]

Needs CUDA (exits with a message otherwise); finishes in a few minutes on one GPU. Reports
µs per chain-step for the loop and vmap paths, the speed-up, λ̂ against the known λ, and
peak GPU memory, with the date and the GPU's name.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import slt
from slt import zoo


def _to(case, device):
    x, y = case.dataset.tensors
    data = torch.utils.data.TensorDataset(x.to(device), y.to(device))
    return case.model.to(device), torch.utils.data.DataLoader(data, batch_size=128, shuffle=True)


def bench(case, method, chains, draws, repeats, device):
    model, loader = _to(case, device)
    kw = dict(step_size=1e-5, localization=10.0, num_chains=chains, num_burnin=0,
              acceptance_every=0, progress=False, chain_method=method)  # fmt: skip

    def call(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        res = slt.estimate_llc(model, loader, case.loss_fn, num_draws=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - start, res

    call(5)
    torch.cuda.reset_peak_memory_stats()
    runs = [call(draws) for _ in range(repeats)]
    short = statistics.median(call(1)[0] for _ in range(repeats))
    full = statistics.median(t for t, _ in runs)
    per_step = (full - short) / (chains * (draws - 1)) * 1e6
    return per_step, runs[-1][1].llc, torch.cuda.max_memory_allocated() / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device")
    device = torch.device("cuda")
    draws, repeats = (200, 2) if args.quick else (500, 3)
    cases = [
        zoo.regular(10),
        zoo.deep_linear((8, 4, 8, 8), 4),
        zoo.deep_linear((80, 50, 50, 80), 50),
        zoo.deep_linear((500, 400, 400, 500), 300),
    ]
    print(f"{time.strftime('%Y-%m-%d')}  {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(
        "| case | d | chains | loop µs/chain-step | vmap µs/chain-step | speed-up "
        "| λ̂ loop | λ̂ vmap | λ | peak MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        for chains in (4, 16):
            loop, l1, _ = bench(case, "loop", chains, draws, repeats, device)
            vm, l2, mem = bench(case, "vmap", chains, draws, repeats, device)
            print(f"| {case.name} | {case.num_params} | {chains} | {loop:.0f} | {vm:.0f} | "
                  f"{loop / vm:.1f}x | {l1:.4g} | {l2:.4g} | {float(case.lam):g} | {mem:.0f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
