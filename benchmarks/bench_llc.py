"""slt against devinterp 2.0.1 and a plain SGD loop on the same LLC estimates.

    python benchmarks/bench_llc.py [--quick | --smoke] [--cases KEY ...] [--no-memory]
                                   [--out FILE.json]

On each case every method runs the same model, data, nβ = n/log n, γ, ε, batch size,
chains and draws (chains × (burn-in + draws) steps), alternating between methods with the
order rotated, several repeats. From the median wall time of a full call T and of a
one-step-per-chain call T₁ we report

    per estimate = T,   per chain-step = (T - T₁) / (chains × (steps - 1)),   fixed ≈ T₁,

the ratio of devinterp ``llc()``'s T to each method's, the ratio of its per chain-step time
to the SGD floor's, the peak-RSS increase of one full call in a fresh process, and the λ̂
each method produced (pooled over the chains of all repeats, ± standard error) next to
the known λ where there is one. README.md here says what each row runs.

Each case runs in a process of its own, and in it the compiled rows after all the others:
what torch.compile leaves in a process (hundreds of thousands of objects) slowed
devinterp's ``gc.collect()`` calls by half, and its graphs were replayed by the shorter
eager runs. Each method's warm-up is one full call, reported as its first call: in a
process where nothing else ran that method yet it includes imports and tracing.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TQDM_DISABLE", "1")  # devinterp's per-chain trange cannot be turned off
# torch's compile cache on disk starts empty, so the compiled rows' warm-up is a cold compile
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="slt-inductor-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from functools import partial  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _devinterp  # noqa: E402
import _memory  # noqa: E402
import cases  # noqa: E402
import slt  # noqa: E402
from _common import Run, machine_speed, minibatches, noise_draw_us  # noqa: E402
from _report import cpu_model, markdown, summary  # noqa: E402

THREADS = 1


def run_slt(case, run: Run, seed: int, nbeta: float, **options) -> np.ndarray:
    """``slt.estimate_llc`` with the run's settings; ``options`` are the row's other keywords."""
    res = slt.estimate_llc(
        case.model, case.loader(run.batch_size), case.loss_fn, nbeta=nbeta,
        localization=run.localization, step_size=run.step_size, num_chains=run.num_chains,
        num_draws=run.num_draws, num_burnin=run.num_burnin, seed=seed, progress=False,
        **options,
    )  # fmt: skip
    return res.llc_per_chain


def run_sgd_floor(case, run: Run, seed: int, nbeta: float) -> None:
    """The cost floor: a plain SGD training loop, same model, loss, batches and step count."""
    x, y = case.dataset.tensors
    model = copy.deepcopy(case.model)
    opt = torch.optim.SGD(model.parameters(), lr=run.step_size)
    batches = minibatches(x, y, run.batch_size, torch.Generator().manual_seed(seed))
    for _ in range(run.num_chains * run.steps):
        batch = next(batches)
        opt.zero_grad()
        loss = case.loss_fn(model, batch)
        loss.backward()
        opt.step()


@dataclass(frozen=True)
class Method:
    label: str
    run: Callable  # (case, run, seed, nbeta) -> (chain,) λ̂, or None for the floor


NO_PROBE = dict(acceptance_every=0)
METHODS = {
    "slt": Method("slt defaults (gradient CV, acceptance_every=20)", run_slt),
    "slt-loss": Method(
        "slt (control_variate=loss, acceptance_every=0, loop)",
        partial(run_slt, control_variate="loss", chain_method="loop", **NO_PROBE),
    ),
    "slt-none": Method(
        "slt (control_variate=none, acceptance_every=0, loop)",
        partial(run_slt, control_variate="none", chain_method="loop", **NO_PROBE),
    ),
    "slt-plain": Method(  # devinterp's algorithm: plain SGLD, chain_method as auto picks it
        "slt (control_variate=none, acceptance_every=0)",
        partial(run_slt, control_variate="none", **NO_PROBE),
    ),
    "slt-compiled": Method(  # the defaults, compiled: a sweep over checkpoints after the first
        "slt defaults, compile=True (vmap; compiled in the warm-up)",
        partial(run_slt, chain_method="vmap", compile=True),
    ),
    "slt-plain-compiled": Method(
        "slt (control_variate=none, acceptance_every=0), compile=True (vmap)",
        partial(run_slt, control_variate="none", chain_method="vmap", compile=True, **NO_PROBE),
    ),
    "slt-microbatch": Method(  # opt-in where the defaults read the factors (the 10k MLP)
        "slt defaults, microbatch=16",
        partial(run_slt, microbatch=16),
    ),
    "slt-per-sample": Method(  # where microbatch="auto" takes micro-batches: without them
        "slt defaults, microbatch=None (a pass at w* per step)",
        partial(run_slt, microbatch=None),
    ),
    "devinterp-llc": Method("devinterp llc()", _devinterp.run_devinterp_llc),
    "devinterp-chain": Method("devinterp sample_single_chain", _devinterp.run_devinterp_chain),
    "devinterp-loop": Method("devinterp SGMCMC.sgld loop", _devinterp.run_devinterp_loop),
    "sgd": Method("torch.optim.SGD (floor)", run_sgd_floor),
}
# a fresh process each: ~5-10 s
MEMORY_METHODS = ("slt", "slt-plain", "slt-microbatch", "slt-per-sample", "devinterp-llc", "sgd")
# The compiled rows: what each estimate after the first costs in a sweep over checkpoints of
# one architecture (compiled once, in the warm-up, whose seconds are reported). Not on the 1M
# model, which runs in the loop.
COMPILED_METHODS = ("slt-compiled", "slt-plain-compiled")
COMPILED_CASES = ("regular", "rrr", "mlp10k", "transformer", "lambda_hat")
# Rows run on some cases only: microbatch=16 where the defaults read the factors of nn.Linear
# layers (on the 1M model its table would be over the budget; on the regressions the pass is
# too cheap to matter), and microbatch=None where the defaults take micro-batches
ONLY_ON = {"slt-microbatch": ("mlp10k",), "slt-per-sample": ("transformer",)}
LAMBDA_HAT_METHODS = ("slt", "slt-none", "slt-plain", "slt-compiled", "slt-plain-compiled",
                      "devinterp-llc")  # fmt: skip

# key -> (cases.CASES name, run per mode). Full mode runs estimate_llc's default 4 × (250 +
# 1000) on the small cases; "lambda_hat" repeats linear regression at the size of the issue's
# lambda_hat measurement, 6 chains × 1,500 steps, for its per-call seconds.
SMOKE = Run(num_chains=2, num_burnin=2, num_draws=10, repeats=1)
PLAN = {
    "regular": ("regular", {"quick": Run(4, 100, 400, 3), "full": Run(4, 250, 1000, 5)}),
    "rrr": ("rrr", {"quick": Run(4, 100, 400, 3), "full": Run(4, 250, 1000, 5)}),
    "mlp10k": ("mlp10k", {"quick": Run(4, 50, 250, 3), "full": Run(4, 100, 500, 5)}),
    "mlp1m": ("mlp1m", {"quick": Run(2, 10, 50, 2), "full": Run(2, 20, 100, 3)}),
    "transformer": ("transformer", {"quick": Run(4, 50, 250, 3), "full": Run(4, 100, 500, 5)}),
    "lambda_hat": ("regular", {"quick": Run(6, 500, 1000, 1), "full": Run(6, 500, 1000, 3)}),
}


def nbeta_of(case) -> float:
    return case.n / math.log(case.n)


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def bench_case(case, run: Run, names: list[str], *, warm_up: bool = True) -> dict:
    nbeta = nbeta_of(case)
    _devinterp.check_per_sample_loss(case)
    machine = {"before": machine_speed()}
    noise_us = noise_draw_us(case.num_params)
    one_step = run.short(1)
    warm_up_s = {}
    full = {name: [] for name in names}
    short = {name: [] for name in names}
    chains = {name: [] for name in names}
    # the compiled rows last: what compiling leaves in the process must not time the others
    groups = ([n for n in names if n not in COMPILED_METHODS],
              [n for n in names if n in COMPILED_METHODS])  # fmt: skip
    for group in (g for g in groups if g):  # the 1M model has no compiled rows
        for name in group if warm_up else ():  # a full call: imports, tracing, compiling
            warm_up_s[name] = timed(METHODS[name].run, case, run, 0, nbeta)[0]
        for rep in range(run.repeats):
            order = group[rep % len(group) :] + group[: rep % len(group)]  # rotate the order
            for name in order:
                seconds, per_chain = timed(METHODS[name].run, case, run, rep, nbeta)
                full[name].append(seconds)
                if per_chain is not None:
                    chains[name].extend(np.asarray(per_chain).tolist())
                short[name].append(timed(METHODS[name].run, case, one_step, rep, nbeta)[0])
    machine["after"] = machine_speed()
    out = {}
    for name in names:
        t_full, t_short = statistics.median(full[name]), statistics.median(short[name])
        values = np.array(chains[name], dtype=float)
        values = values[np.isfinite(values)]
        out[name] = {
            "label": METHODS[name].label,
            "median_call_s": t_full,
            "us_per_step": (t_full - t_short) / (run.num_chains * (run.steps - 1)) * 1e6,
            "fixed_ms": t_short * 1e3,
            "call_s": full[name],
            "one_step_call_s": short[name],
            "warm_up_s": warm_up_s.get(name),
            "llc": float(values.mean()) if values.size else None,
            "llc_se": float(values.std(ddof=1) / math.sqrt(values.size))
            if values.size > 1
            else None,
            "llc_chains_pooled": int(values.size),
        }
    for m in out.values():
        if "devinterp-llc" in out:
            devinterp = out["devinterp-llc"]["median_call_s"]
            m["devinterp_llc_over_this"] = devinterp / m["median_call_s"]
        if "sgd" in out:
            m["x_sgd_step"] = m["us_per_step"] / out["sgd"]["us_per_step"]
            m["x_sgld_floor"] = m["us_per_step"] / (out["sgd"]["us_per_step"] + noise_us)
    return {"case": case.name, "num_params": case.num_params, "n": case.n, "nbeta": nbeta,
            "lam": case.lam, "run": run.__dict__, "run_label": run.label(),
            "machine": machine, "noise_us": noise_us, "methods": out}  # fmt: skip


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer draws and repeats (~15 min)")
    mode.add_argument("--smoke", action="store_true", help="2 × (2+10), 1 repeat: does it run?")
    parser.add_argument("--cases", nargs="+", choices=list(PLAN), default=list(PLAN))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--memory-child", nargs=2, metavar=("CASE_FILE", "METHOD"),
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--case-child", type=Path, metavar="OUT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_key(key: str, mode: str, args) -> dict:
    """One case of the plan, timed (and its memory measured) in this process."""
    case_name, runs = PLAN[key]
    run = SMOKE if mode == "smoke" else runs[mode]
    case = cases.build(case_name)
    names = list(LAMBDA_HAT_METHODS if key == "lambda_hat" else METHODS)
    if key not in COMPILED_CASES:
        names = [name for name in names if name not in COMPILED_METHODS]
    names = [name for name in names if key in ONLY_ON.get(name, (key,))]
    res = {"key": key, **bench_case(case, run, names, warm_up=mode != "smoke")}
    if not args.no_memory and key != "lambda_hat":
        measured = [m for m in names if m in MEMORY_METHODS]
        workers = min(4, os.cpu_count() or 1)
        mem = _memory.measure(case, run, measured, Path(__file__).resolve(), workers)
        for name, figures in mem.items():
            res["methods"][name]["memory"] = figures
    return res


def _case_process(key: str, mode: str, args) -> dict:
    """:func:`run_key` in a fresh process (nothing an earlier case left, compiled graphs
    above all, slows this one's calls)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--cases", key,
                   "--case-child", str(out)]  # fmt: skip
        command += ["--smoke"] if mode == "smoke" else ["--quick"] if mode == "quick" else []
        command += ["--no-memory"] if args.no_memory else []
        subprocess.run(command, check=True)
        return json.loads(out.read_text())


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.memory_child:
        path, method = args.memory_child
        print(json.dumps(_memory.child(Path(path), method, METHODS, nbeta_of)))
        return {}
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.case_child:
        (key,) = args.cases
        args.case_child.write_text(json.dumps(run_key(key, mode, args)))
        return {}
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "slt": slt.__version__,
        "devinterp": version("devinterp"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mode": mode,
        "memory": None
        if args.no_memory
        else "peak RSS (VmHWM) over RSS before one call, "
        "fresh process, after imports and a warm-up on a tiny case (README)",
    }
    print(
        f"{meta['date']}  torch {meta['torch']}  devinterp {meta['devinterp']}  "
        f"{meta['cpu']} ({meta['cpu_count']} cores, torch threads {meta['torch_threads']})\n"
        f"{mode}: batch 128, ε 5e-5, γ 1, nβ = n/log n; medians of alternating repeats\n",
        flush=True,
    )
    results = []
    for key in args.cases:
        start = time.perf_counter()
        try:
            results.append(_case_process(key, mode, args))
        except subprocess.CalledProcessError:  # its traceback is above; the others still run
            print(f"{key}: FAILED", flush=True)
            continue
        print(f"{key}: {time.perf_counter() - start:.0f} s", flush=True)
    table = markdown(results) + "\n\n" + summary(results)
    print("\n" + table)
    report = {"meta": meta, "results": results, "table": table}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
