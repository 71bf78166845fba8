"""``slt validate``: estimate λ on zoo models whose answer is known and print the table.

A case with m = 1 passes if |λ̂ - λ| ≤ 10% of λ. A case with m > 1 is compared with what
a finite-nβ estimator actually targets, which is below λ by about (m - 1)/log nβ
(THEORY.md): the exact value by quadrature where the zoo provides it, else the
asymptotic λ - (m - 1)/log nβ; it passes if within 10% of that target.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slt import _json, zoo
from slt._text import right
from slt.chains import DivergenceError
from slt.llc import estimate_llc

TOLERANCE = 0.10

# Two-parameter singular models: the flat directions relax at rate εγ/2, so γ = 8 and
# ε = 1e-3 with 8 chains of 6,000 draws give a standard error of ~3% of the target.
_SINGULAR_2D = zoo.Settings(
    step_size=1e-3, localization=8.0, batch_size=1024, num_chains=8, num_draws=6000,
    num_burnin=1000,
)  # fmt: skip


def default_cases() -> list[zoo.Case]:
    """The known-answer set ``slt validate`` runs: every zoo family, 30 s of sampling on 2
    cores (2026-12-01)."""
    S = zoo.Settings
    return [
        zoo.regular(10),
        zoo.regular(20, 3),
        zoo.reduced_rank(5, 4, 3, 2),
        zoo.reduced_rank(10, 8, 6, 3),
        zoo.deep_linear((8, 4, 8, 8), 4),
        zoo.deep_linear((80, 50, 50, 80), 50, settings=S(step_size=1e-5, localization=10.0)),
        zoo.potential((1, 1), sigma=1.0, settings=_SINGULAR_2D),
        zoo.tanh_network(1, sigma=1.0, settings=_SINGULAR_2D),
    ]


@dataclass(frozen=True)
class Row:
    """One line of the validation table."""

    name: str
    family: str
    d: int
    lam: float
    m: int
    target: float  # what λ̂ should be at this nβ (λ when m = 1)
    target_kind: str  # "λ", "exact", or "asymptotic"
    llc: float
    llc_std: float
    nbeta: float
    seconds: float
    settings: dict
    note: str = ""  # "every chain diverged": λ̂ and se are NaN, the case fails

    @property
    def rel_error(self) -> float:
        """(λ̂ - λ) / λ."""
        return self.llc / self.lam - 1

    @property
    def passed(self) -> bool:
        return abs(self.llc - self.target) <= TOLERANCE * abs(self.target)

    def to_dict(self) -> dict:
        return {**asdict(self), "rel_error": self.rel_error, "passed": self.passed}


def target_for(case: zoo.Case, nbeta: float, localization: float) -> tuple[float, str]:
    """The value a finite-nβ estimate of ``case`` should reach, and how it was obtained."""
    if case.m == 1:
        return float(case.lam), "λ"
    if case.expected is not None:
        return case.expected(nbeta, localization), "exact"
    return float(case.lam) - (case.m - 1) / math.log(nbeta), "asymptotic"


def run_case(
    case: zoo.Case,
    *,
    seed: int = 0,
    step_size: float | str | None = None,
    microbatch: int | str | None = "auto",
) -> Row:
    """Estimate λ on one case with its recommended settings (``step_size`` overrides ε;
    "auto" calibrates it; ``microbatch`` is passed to :func:`slt.estimate_llc`)."""
    s = case.settings
    kwargs = s.estimate_kwargs() | ({} if step_size is None else {"step_size": step_size})
    start = time.perf_counter()
    try:
        res = estimate_llc(case.model, case.loader(), case.loss_fn, seed=seed, progress=False,
                           microbatch=microbatch, **kwargs)  # fmt: skip
    except DivergenceError:  # a row that fails, and the other cases still run
        nbeta = case.n / math.log(case.n)  # estimate_llc's default, which the cases keep
        target, kind = target_for(case, nbeta, s.localization)
        return Row(case.name, case.family, case.num_params, float(case.lam), case.m, target,
                   kind, math.nan, math.nan, nbeta, time.perf_counter() - start,
                   asdict(s) | {"step_size": kwargs["step_size"], "microbatch": microbatch},
                   note="every chain diverged")  # fmt: skip
    target, kind = target_for(case, res.nbeta, res.localization)
    return Row(
        name=case.name,
        family=case.family,
        d=case.num_params,
        lam=float(case.lam),
        m=case.m,
        target=target,
        target_kind=kind,
        llc=res.llc,
        llc_std=res.llc_std,
        nbeta=res.nbeta,
        seconds=res.seconds,
        settings=asdict(s) | {"step_size": res.step_size, "microbatch": res.microbatch},
    )


def format_table(rows: list[Row]) -> str:
    """The table as aligned text."""
    head = (
        f"{'case':<28} {'d':>6} {'d/2':>7} {'λ':>8} {'m':>2} {'target':>9} "
        f"{right('λ̂ ± se', 18)} {right('λ̂/λ-1', 8)} {'time':>6}  ok"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = {"λ": "", "exact": "*", "asymptotic": "~"}[r.target_kind]
        lines.append(
            f"{r.name:<28} {r.d:>6} {r.d / 2:>7g} {r.lam:>8.4g} {r.m:>2} "
            f"{r.target:>8.4g}{mark or ' '} {r.llc:>9.4g} ± {r.llc_std:<6.2g} "
            f"{r.rel_error:>+8.1%} {r.seconds:>5.1f}s  {'yes' if r.passed else 'NO'}"
            + (f" ({r.note})" if r.note else "")
        )
    lines.append(
        f"target: λ for m = 1; * exact finite-nβ value by quadrature, ~ λ - (m-1)/log nβ, "
        f"for m > 1. Pass: within {TOLERANCE:.0%} of the target."
    )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Left: λ̂ against λ (log-log) with the diagonal. Right: each case's relative error
    against its target with ±2 se bars and the ±10% pass band."""
    from matplotlib.figure import Figure

    # a Figure of its own, not pyplot's: the caller's backend (a notebook's) is left alone
    fig = Figure(figsize=(11, 0.45 * len(rows) + 3.2))
    left, right = fig.subplots(1, 2)
    # log axes: the limits from the positive values; a λ̂ ≤ 0 or NaN (a case that failed
    # badly) is drawn as a red cross at the bottom edge, not left off the plot
    values = [v for r in rows for v in (r.lam, r.llc, r.target) if v > 0]
    lo, hi = min(values) / 1.5, max(values) * 1.5
    left.plot([lo, hi], [lo, hi], color="0.6", lw=1, label="λ̂ = λ")
    for r in rows:
        color = "tab:blue" if r.m == 1 else "tab:orange"
        if r.llc > 0:
            left.errorbar(r.lam, r.llc, yerr=2 * r.llc_std, fmt="o", color=color, capsize=3)
        else:
            left.plot(r.lam, lo * 1.1, "x", color="tab:red", ms=9, mew=2)
        if r.m > 1:
            left.plot(r.lam, r.target, marker="_", ms=14, color="k")
    if any(not r.llc > 0 for r in rows):
        left.plot([], [], "x", color="tab:red", ms=9, mew=2, label="λ̂ ≤ 0 or none (at the edge)")
    left.plot([], [], "o", color="tab:blue", label="m = 1")
    if any(r.m > 1 for r in rows):
        left.plot([], [], "o", color="tab:orange", label="m > 1")
        left.plot([], [], marker="_", ls="", ms=14, color="k", label="finite-nβ target (m > 1)")
    left.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="λ (theory)",
             ylabel="λ̂ (± 2 se)", title="λ̂ against the known λ")  # fmt: skip
    left.legend(loc="upper left", fontsize=8)

    y = range(len(rows))
    right.axvspan(-100 * TOLERANCE, 100 * TOLERANCE, color="0.9", label="pass band")
    right.axvline(0, color="0.6", lw=1)
    for i, r in enumerate(rows):
        color = "tab:blue" if r.passed else "tab:red"
        err = 100 * (r.llc / r.target - 1)
        if not math.isfinite(err):  # no λ̂: say why where its point would be
            right.text(0, i, r.note or "no λ̂", color="tab:red", ha="center", va="center",
                       fontsize=8)  # fmt: skip
            continue
        right.errorbar(err, i, xerr=200 * r.llc_std / r.target, fmt="o", color=color, capsize=3)
    names = [f"{r.name} ({r.target_kind})" + ("" if math.isfinite(r.llc_std) else ", no se")
             for r in rows]  # fmt: skip
    right.set_yticks(list(y), names, fontsize=8)
    right.invert_yaxis()
    right.set(xlabel="λ̂ / target − 1 (%), ± 2 se", title="error against the target")
    fig.suptitle("slt validate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def validate(
    cases: list[zoo.Case] | None = None,
    *,
    out: str | Path | None = None,
    seed: int = 0,
    step_size: float | str | None = None,
    microbatch: int | str | None = "auto",
    progress: bool = True,
) -> list[Row]:
    """Run the known-answer cases, print the table, and write ``table.json`` and
    ``validate.png`` to ``out`` (if given). ``step_size="auto"`` replaces every case's
    recommended ε by calibration; ``microbatch=m`` draws every case's batches as whole
    micro-batches of m samples with the control variates from their table (m must divide
    every case's n and batch size; "auto", the default, as :func:`slt.estimate_llc` decides
    per case, None never). Returns the rows; all passed iff every ``row.passed``."""
    if out is not None:  # before the cases, not after
        _check_out(Path(out))
    cases = default_cases() if cases is None else cases
    rows: list[Row] = []
    start = time.perf_counter()
    bar = tqdm(cases, desc="validate", unit="case", disable=not progress)
    for case in bar:
        bar.set_postfix_str(case.name)
        rows.append(run_case(case, seed=seed, step_size=step_size, microbatch=microbatch))
    bar.close()
    total = time.perf_counter() - start
    if microbatch not in (None, "auto"):
        print(f"microbatch={microbatch}: batches of whole micro-batches, control variates "
              "from their table")  # fmt: skip
    print(format_table(rows))
    print(f"{sum(r.passed for r in rows)}/{len(rows)} passed in {total:.0f} s")
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "slt_version": _version(),
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "seed": seed,
            "microbatch": microbatch,
            "seconds": total,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (out / "table.json").write_text(
            _json.dumps({"meta": meta, "rows": [r.to_dict() for r in rows]}, indent=2)
        )
        try:
            plot(rows, out / "validate.png")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install 'slt[plot]')")
        print(f"wrote {out / 'table.json'} and {out / 'validate.png'}")
    return rows


def _check_out(out: Path) -> None:
    """Raise ``ValueError`` unless ``out`` is, or can be made, a folder this process writes."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"out={str(out)!r}: {existing} is a file; give a folder (or a new path)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"out={str(out)!r}: cannot write in folder {existing}")


def _version() -> str:
    from slt import __version__

    return __version__
