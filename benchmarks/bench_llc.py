"""Time one LLC chain-step: slt against a plain SGD step (the floor) and devinterp 2.0.1.

    python benchmarks/bench_llc.py [--quick] [--out FILE.json]

For each case every method runs the same number of steps (chains × (burn-in + draws)) at
the same batch size, alternating between methods, several times. From the median wall time
of a full call T and of a one-step-per-chain call T₁ we report

    per chain-step = (T - T₁) / (chains × (steps - 1)),   fixed cost per call ≈ T₁,

and the λ̂ each sampler produced, pooled over the chains of all repeats (± standard error),
next to the known λ of the case. See README.md here for what each method runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # devinterp's per-chain trange cannot be turned off

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import slt  # noqa: E402
from slt import zoo  # noqa: E402

THREADS = 1


@dataclass(frozen=True)
class Run:
    """One benchmark configuration shared by every method."""

    num_chains: int
    num_burnin: int
    num_draws: int
    repeats: int
    step_size: float = 5e-5
    localization: float = 1.0
    batch_size: int = 128

    @property
    def steps(self) -> int:
        return self.num_burnin + self.num_draws


def minibatches(x, y, batch_size: int, generator: torch.Generator):
    """Shuffled epochs of (x, y) minibatches sliced from the tensors (what slt does itself)."""
    n = x.shape[0]
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


def full_loss(case, model) -> float:
    """L_n at the model's parameters, over the whole dataset in one batch."""
    with torch.no_grad():
        return float(case.loss_fn(model, case.dataset.tensors))


def per_chain_llc(losses: torch.Tensor, init_loss: float, nbeta: float) -> np.ndarray:
    """(chain,) λ̂ = nβ (mean_t L_{B_t}(w_t) - L_n(w*)) from (chain, draw) losses."""
    return nbeta * (losses.double().mean(dim=1).numpy() - init_loss)


# ---- the methods: each returns per-chain λ̂ (or None) ---------------------------------


def run_slt(case, run: Run, seed: int, *, control_variate: str) -> np.ndarray:
    res = slt.estimate_llc(
        case.model,
        case.loader(run.batch_size),
        case.loss_fn,
        localization=run.localization,
        step_size=run.step_size,
        num_chains=run.num_chains,
        num_draws=run.num_draws,
        num_burnin=run.num_burnin,
        control_variate=control_variate,
        seed=seed,
        progress=False,
    )
    return res.llc_per_chain


def run_sgd_floor(case, run: Run, seed: int) -> None:
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


class RowIds(torch.utils.data.Dataset):
    """Sample i as the two-"token" sequence [i, i]: devinterp's pipeline wants LM-shaped
    ``{"input_ids": (seq,)}`` rows and a per-token loss ``(batch, seq - 1)``, so with seq = 2
    each sample is one "token position" whose loss is that sample's NLL."""

    def __init__(self, n: int):
        self.ids = torch.arange(n).repeat_interleave(2).view(n, 2)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def gaussian_nll_per_sample(case):
    """``(model, input_ids) -> (batch, 1)`` per-sample NLL of the case's σ = 1 Gaussian model
    (whose batch mean is ``case.loss_fn``; checked in :func:`check_per_sample_loss`)."""
    x, y = case.dataset.tensors
    const = 0.5 * math.log(2 * math.pi)

    def loss_fn(model, input_ids):
        rows = input_ids[:, 0]
        residual = (model(x[rows]) - y[rows]).reshape(rows.shape[0], -1)
        return (0.5 * residual.square().sum(1) + residual.shape[1] * const)[:, None]

    return loss_fn


def check_per_sample_loss(case) -> None:
    ids = RowIds(case.n).ids
    with torch.no_grad():
        mine = float(gaussian_nll_per_sample(case)(case.model, ids).mean())
    if not math.isclose(mine, full_loss(case, case.model), rel_tol=1e-5):
        raise RuntimeError(f"{case.name}: per-sample NLL does not average to case.loss_fn")


def run_devinterp_llc(case, run: Run, seed: int, nbeta: float) -> np.ndarray:
    """devinterp 2's top-level ``devinterp.slt.llc.llc`` (sample() to zarr, then compute_llc).

    Its own ``llc_per_chain`` averages over the burn-in steps too; for a like-for-like λ̂
    we recompute it from the post-burn-in part of the ``loss_trace`` and the ``init_loss``
    that ``llc()`` returns (the same formula, nβ (mean loss - init loss))."""
    from devinterp.slt.llc import llc

    with tempfile.TemporaryDirectory() as tmp:
        res = llc(
            model=case.model,
            dataset=RowIds(case.n),
            observables={},
            lr=run.step_size,
            n_beta=nbeta,
            localization=run.localization,
            num_chains=run.num_chains,
            num_draws=run.num_draws,
            num_burnin_steps=run.num_burnin,
            batch_size=run.batch_size,
            init_seed=seed * 1000,
            match_sampling_input_ids_across_chains=False,
            output_path=Path(tmp) / "samples.zarr",
            loss_fn=gaussian_nll_per_sample(case),
        )
        trace = torch.as_tensor(res["loss_trace"].values[:, run.num_burnin :])
        return per_chain_llc(trace, float(res["init_loss"]), nbeta)


def run_devinterp_chain(case, run: Run, seed: int, nbeta: float) -> np.ndarray:
    """devinterp's chain runner ``sample_single_chain`` (what ``sample()`` calls per chain)
    with a custom ``evaluate`` -- its README's route for "more exotic control" -- minus the
    zarr writing; the draw losses go to a tensor through its ``callbacks``."""
    from devinterp.optim import SGMCMC
    from devinterp.slt.sampler import sample_single_chain

    init_loss = full_loss(case, case.model)  # sample() computes this before the chains
    loss_fn = gaussian_nll_per_sample(case)
    losses = torch.empty(run.num_chains, run.num_draws)

    def evaluate(model, data):
        return loss_fn(model, data["input_ids"]), {}

    for chain in range(run.num_chains):

        def record(*, loss, draw, chain=chain, **_):
            losses[chain, draw] = loss.mean()

        sample_single_chain(
            ref_model=case.model,
            dataset=RowIds(case.n),
            evaluate=evaluate,
            param_masks={name: None for name, _ in case.model.named_parameters()},
            num_draws=run.num_draws,
            num_burnin_steps=run.num_burnin,
            num_steps_bw_draws=1,
            sampling_method=SGMCMC.sgld,
            sampling_method_kwargs=devinterp_sgld_kwargs(run, nbeta),
            chain=chain,
            seed=seed * 1000 + chain,
            dataloader_seed=seed * 1000 + chain,
            device="cpu",
            callbacks=[record],
            batch_size=run.batch_size,
            shuffle=True,
        )
    return per_chain_llc(losses, init_loss, nbeta)


def run_devinterp_loop(case, run: Run, seed: int, nbeta: float) -> np.ndarray:
    """The plain user loop around ``devinterp.optim.SGMCMC.sgld``: a model copy per chain,
    zero_grad / loss / backward / step per draw, batches sliced as for the SGD floor."""
    from devinterp.optim import SGMCMC

    init_loss = full_loss(case, case.model)
    x, y = case.dataset.tensors
    losses = torch.empty(run.num_chains, run.steps)
    for chain in range(run.num_chains):
        model = copy.deepcopy(case.model)
        opt = SGMCMC.sgld(model.parameters(), **devinterp_sgld_kwargs(run, nbeta))
        noise = torch.Generator().manual_seed(2 * (seed * 1000 + chain))
        data = torch.Generator().manual_seed(2 * (seed * 1000 + chain) + 1)
        batches = minibatches(x, y, run.batch_size, data)
        for t in range(run.steps):
            batch = next(batches)
            opt.zero_grad()
            loss = case.loss_fn(model, batch)
            loss.backward()
            opt.step(noise_generator=noise)
            losses[chain, t] = loss.detach()
    return per_chain_llc(losses[:, run.num_burnin :], init_loss, nbeta)


def devinterp_sgld_kwargs(run: Run, nbeta: float) -> dict:
    """SGMCMC.sgld: Δw = (lr/2)(-nbeta ∇L_B - localization (w - w0)) + √lr N(0, noise_level²),
    so lr = ε, nbeta = nβ, localization = γ, noise_level = 1 is our SGLD step exactly.
    The remaining keys are the values ``devinterp.slt.sampling.sample`` passes."""
    return dict(
        lr=run.step_size,
        nbeta=nbeta,
        localization=run.localization,
        noise_level=1.0,
        weight_decay=0.0,
        bounding_box_size=None,
        save_metrics=False,
    )


# ---- driver ---------------------------------------------------------------------------

METHODS = {
    "slt (control_variate=gradient, default)": lambda c, r, s, nb: run_slt(
        c, r, s, control_variate="gradient"
    ),
    "slt (control_variate=loss)": lambda c, r, s, nb: run_slt(c, r, s, control_variate="loss"),
    "slt (control_variate=none)": lambda c, r, s, nb: run_slt(c, r, s, control_variate="none"),
    "devinterp llc()": run_devinterp_llc,
    "devinterp sample_single_chain": run_devinterp_chain,
    "devinterp SGMCMC.sgld loop": run_devinterp_loop,
    "torch.optim.SGD (floor)": lambda c, r, s, nb: run_sgd_floor(c, r, s),
}
SLT_LOSS, SLT_NONE, SGD = (
    "slt (control_variate=loss)",
    "slt (control_variate=none)",
    "torch.optim.SGD (floor)",
)


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def bench_case(case, run: Run) -> dict:
    nbeta = case.n / math.log(case.n)
    check_per_sample_loss(case)
    one_step = Run(run.num_chains, 0, 1, run.repeats, run.step_size, run.localization)
    for fn in METHODS.values():  # warm-up: imports, allocator, first-call costs
        fn(case, Run(run.num_chains, 0, 20, 1), 0, nbeta)
    full = {name: [] for name in METHODS}
    short = {name: [] for name in METHODS}
    chains = {name: [] for name in METHODS}
    names = list(METHODS)
    for rep in range(run.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate the order
        for name in order:
            seconds, per_chain = timed(METHODS[name], case, run, rep, nbeta)
            full[name].append(seconds)
            if per_chain is not None:
                chains[name].extend(np.asarray(per_chain).tolist())
            short[name].append(timed(METHODS[name], case, one_step, rep, nbeta)[0])
    out = {}
    for name in names:
        t_full, t_short = statistics.median(full[name]), statistics.median(short[name])
        per_step = (t_full - t_short) / (run.num_chains * (run.steps - 1))
        values = np.array(chains[name], dtype=float)
        values = values[np.isfinite(values)]
        out[name] = {
            "us_per_step": per_step * 1e6,
            "fixed_ms": t_short * 1e3,
            "median_call_s": t_full,
            "call_s": full[name],
            "one_step_call_s": short[name],
            "llc": float(values.mean()) if values.size else None,
            "llc_se": float(values.std(ddof=1) / math.sqrt(values.size))
            if values.size > 1
            else None,
            "llc_chains_pooled": int(values.size),
        }
    base = out[SGD]["us_per_step"]
    for name in names:
        out[name]["x_sgd"] = out[name]["us_per_step"] / base
        out[name]["x_slt_loss"] = out[name]["us_per_step"] / out[SLT_LOSS]["us_per_step"]
        out[name]["x_slt_none"] = out[name]["us_per_step"] / out[SLT_NONE]["us_per_step"]
    return {
        "case": case.name,
        "num_params": case.num_params,
        "n": case.n,
        "nbeta": nbeta,
        "lam": float(case.lam),
        "m": case.m,
        "methods": out,
    }


def markdown(results: list[dict]) -> str:
    head = (
        "| case | method | µs / chain-step | fixed ms / call | × SGD | × slt(loss) "
        "| × slt(none) | λ̂ ± se | λ |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [head]
    for res in results:
        for name, m in res["methods"].items():
            llc = "—" if m["llc"] is None else f"{m['llc']:.4g} ± {m['llc_se']:.2g}"
            rows.append(
                f"| {res['case']} (d={res['num_params']}) | {name} | {m['us_per_step']:.0f} "
                f"| {m['fixed_ms']:.1f} | {m['x_sgd']:.2f} | {m['x_slt_loss']:.2f} "
                f"| {m['x_slt_none']:.2f} | {llc} | {res['lam']:g} |"
            )
    return "\n".join(rows)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 chains × 500 draws, 5 repeats")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.quick:
        run = Run(num_chains=4, num_burnin=100, num_draws=500, repeats=5)
    else:
        run = Run(num_chains=4, num_burnin=500, num_draws=2000, repeats=5)
    cases = [zoo.regular(10), zoo.deep_linear((20, 40, 80, 80), 10)]
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "slt": slt.__version__,
        "devinterp": version("devinterp"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mode": "quick" if args.quick else "full",
        "run": run.__dict__,
    }
    print(
        f"{meta['date']}  torch {meta['torch']}  devinterp {meta['devinterp']}  "
        f"{meta['cpu']} ({meta['cpu_count']} cores, torch threads {meta['torch_threads']})\n"
        f"{run.num_chains} chains × ({run.num_burnin} burn-in + {run.num_draws} draws), "
        f"batch {run.batch_size}, ε {run.step_size:g}, γ {run.localization:g}, nβ = n/log n, "
        f"medians of {run.repeats} alternating repeats\n",
        flush=True,
    )
    results = []
    for case in cases:
        start = time.perf_counter()
        results.append(bench_case(case, run))
        print(f"{case.name}: {time.perf_counter() - start:.0f} s", flush=True)
    table = markdown(results)
    print("\n" + table)
    report = {"meta": meta, "results": results, "table": table}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
