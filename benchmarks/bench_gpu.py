"""GPU check: chains in a loop against all chains vmapped, on models up to ~1M parameters.

    python benchmarks/bench_gpu.py [--quick] [--device cpu --smoke]

Needs CUDA (exits with a message otherwise); finishes in a few minutes on one GPU.
``--device cpu --smoke`` is a dry run of the same code on the CPU (tiny settings, two
small cases) so that the script is known to work before a GPU is lent. Reports
µs per chain-step for the loop and vmap paths (each with its gradient pass eager and
replayed from a traced graph, ``slt.traced``), the speed-ups, λ̂ against the known λ,
and peak GPU memory, with the date and the GPU's name.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import _common  # benchmarks/ is on sys.path when run as a script
import slt
from slt import zoo


def _to(case, device):
    x, y = case.dataset.tensors
    data = torch.utils.data.TensorDataset(x.to(device), y.to(device))
    return case.model.to(device), torch.utils.data.DataLoader(data, batch_size=128, shuffle=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(case, method, chains, draws, repeats, device, traced=False):
    with _common.traced_passes(traced):
        return _bench(case, method, chains, draws, repeats, device)


def _bench(case, method, chains, draws, repeats, device):
    model, loader = _to(case, device)
    kw = dict(step_size=1e-5, localization=10.0, num_chains=chains, num_burnin=0,
              acceptance_every=0, progress=False, chain_method=method)  # fmt: skip

    def call(n):
        _sync(device)
        start = time.perf_counter()
        res = slt.estimate_llc(model, loader, case.loss_fn, num_draws=n, **kw)
        _sync(device)
        return time.perf_counter() - start, res

    call(5)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = [call(draws) for _ in range(repeats)]
    short = statistics.median(call(1)[0] for _ in range(repeats))
    full = statistics.median(t for t, _ in runs)
    per_step = (full - short) / (chains * (draws - 1)) * 1e6
    memory = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return per_step, runs[-1][1].llc, memory


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="10 draws, 1 repeat, 2 cases")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device")
    draws, repeats = (200, 2) if args.quick else (500, 3)
    if args.smoke:
        draws, repeats = 10, 1
    cases = [
        zoo.regular(10),
        zoo.deep_linear((8, 4, 8, 8), 4),
        zoo.deep_linear((80, 50, 50, 80), 50),
        zoo.deep_linear((500, 400, 400, 500), 300),
    ]
    if args.smoke:
        cases = cases[:2]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{device} (dry run)"
    print(f"{time.strftime('%Y-%m-%d')}  {name}  torch {torch.__version__}")
    print(
        "| case | d | chains | µs/chain-step: loop eager | loop traced | vmap eager "
        "| vmap traced | speed-up of vmap over the loop: eager / traced | λ̂ loop | λ̂ vmap | λ "
        "| peak MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        for chains in (4, 16):
            loop, l1, _ = bench(case, "loop", chains, draws, repeats, device)
            lt, _, _ = bench(case, "loop", chains, draws, repeats, device, traced=True)
            vm, l2, mem = bench(case, "vmap", chains, draws, repeats, device)
            tr, _, _ = bench(case, "vmap", chains, draws, repeats, device, traced=True)
            print(f"| {case.name} | {case.num_params} | {chains} | {loop:.0f} | {lt:.0f} "
                  f"| {vm:.0f} | {tr:.0f} | {loop / vm:.1f}x / {lt / tr:.1f}x | {l1:.4g} "
                  f"| {l2:.4g} | {float(case.lam):g} | {mem:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
