"""The ``slt`` command line."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import NoReturn

import numpy as np
import typer

from slt import _json
from slt.cli_inputs import (
    _absolute,
    _build,
    _is_dataset,
    _is_module,
    _load_checkpoint,
    _loss,
    _LossSpec,
    _ModelSpec,
    _output_file,
    _output_folder,
    _parse_microbatch,
    _parse_step_size,
    _plot_file,
    first_loss,
    spec_digest,
)
from slt.compiled import CompileError

_FITS = "--model, --data, --loss"  # what the first batch's loss checks fit together

app = typer.Typer(
    help="slt: singular learning theory, measured on PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@app.callback()
def _root() -> None:
    """slt: singular learning theory, measured on PyTorch models."""


_OUT = typer.Option(Path("validate-out"), help="Folder for table.json and validate.png.")
_SEED = typer.Option(0, min=0, help="Seed of every chain.")
_PROGRESS = typer.Option(True, help="Show a progress bar.")
_VALIDATE_STEP = typer.Option(
    None, help='"auto" to calibrate every case\'s step size instead of using its recommended one.'
)


_VALIDATE_MICROBATCH = typer.Option(
    "auto",
    help="Draw every case's batches as whole micro-batches of this many samples, "
    'the control variates from their table (as `slt llc --microbatch`); "auto" as '
    'estimate_llc decides per case, "none" never.',
)


_ONLY = typer.Option(
    None, help="Only these families of cases, comma-separated: regular, reduced_rank, "
    "deep_linear, potential, tanh (a quick check: regular takes seconds).",
)  # fmt: skip


@app.command()
def validate(
    out: Path = _OUT, seed: int = _SEED, step_size: str | None = _VALIDATE_STEP,
    microbatch: str = _VALIDATE_MICROBATCH, only: str | None = _ONLY,
    progress: bool = _PROGRESS,
) -> None:  # fmt: skip
    """Estimate λ on models whose answer is known and print the table; exit 1 on a miss."""
    from slt.validate import default_cases
    from slt.validate import validate as run

    if step_size not in (None, "auto"):
        raise typer.BadParameter(f'--step-size must be "auto" or absent, got {step_size!r}')
    cases = None
    if only is not None:
        cases = default_cases()
        families = sorted({c.family for c in cases})
        wanted = [w for w in only.replace(" ", "").split(",") if w]
        unknown = [w for w in wanted if w not in families]
        if not wanted or unknown:
            raise typer.BadParameter(
                f"expected families among {', '.join(families)}, got {only!r}",
                param_hint="--only",
            )
        cases = [c for c in cases if c.family in wanted]
    _output_folder(out, "--out")
    try:
        rows = run(cases, out=out, seed=seed, step_size=step_size,
                   microbatch=_parse_microbatch(microbatch),
                   progress=progress)  # fmt: skip
    except ValueError as err:  # e.g. a microbatch that does not divide a case's n
        typer.echo(f"Error: {_in_option_words(err)}", err=True)
        raise typer.Exit(2) from err
    raise typer.Exit(0 if all(r.passed for r in rows) else 1)


_MODEL = typer.Option(
    ...,
    help='"pkg.module:factory" or "path/to/file.py:factory": a zero-argument callable '
    "returning the nn.Module (or an nn.Module instance). The current folder is importable.",
)
_DATA = typer.Option(
    ...,
    help='"pkg.module:dataset" or "path/to/file.py:dataset": a map-style torch Dataset, '
    "or a zero-argument callable returning one.",
)
_CHECKPOINT = typer.Option(
    None,
    exists=True,
    dir_okay=False,
    help="Weights at w*: .safetensors, or a torch.save state dict (read with "
    "weights_only=True; files that would run code are refused). Loaded with strict=True, "
    "after a wrapper's key prefix (model., module., _orig_mod.) where that makes the keys fit.",
)
_LOSS = typer.Option(
    "gaussian",
    help='Mean per-sample NLL: "gaussian" (slt.gaussian_nll(sigma)), "cross_entropy" '
    '(slt.supervised(F.cross_entropy)) or "pkg.module:loss_fn" with loss_fn(model, batch).',
)
_SIGMA = typer.Option(1.0, help="σ of the gaussian loss.")
_BATCH = typer.Option(128, min=1, help="Minibatch size (the loader shuffles).")
_STEP = typer.Option("1e-4", help='ε of the sampler, or "auto" to calibrate it.')
_LOCALIZATION = typer.Option(1.0, help="γ, the pull toward w*.")
_NBETA = typer.Option(None, help="nβ; default n / log n.")
_CHAINS = typer.Option(4, min=1, help="Number of chains.")
_DRAWS = typer.Option(1000, min=1, help="Draws per chain after burn-in.")
_BURNIN = typer.Option(250, min=0, help="Burn-in steps per chain.")
_SAMPLER = typer.Option("sgld", help='Sampler, e.g. "sgld" or "rmsprop_sgld".')
_CV = typer.Option("gradient", help='Control variate: "gradient", "loss" or "none".')
_LLC_SEED = typer.Option(0, min=0, help="Seed; chain c is seeded from (seed, c).")
_CHAIN_METHOD = typer.Option(
    "auto", help='"auto", "loop" or "vmap" (all chains in one batched step); see estimate_llc.'
)
_COMPILE = typer.Option(
    False, help="Run the batched step under torch.compile (with --chain-method auto, vmap is "
    "used): seconds of compiling once per model shape, then faster steps.",
)  # fmt: skip
_MICROBATCH = typer.Option(
    "auto", help="Draw batches as whole micro-batches of this many samples and read the "
    "control variates from a table over them (see estimate_llc's microbatch; a "
    'TensorDataset only); "auto" (default) where the gradient control variate would '
    'otherwise run a pass at w* on every batch, "none" never.',
)  # fmt: skip
_LLC_OUT = typer.Option(Path("llc.nc"), help="netCDF file for the result (slt.load reads it).")


def _chain_method(chain_method: str, compile: bool, sampler: str) -> str:
    """--compile means the batched step: "auto" becomes "vmap" (an explicit "loop" is left
    for estimate_llc to refuse, by name); a sampler it does not run is refused here, by the
    options' names."""
    from slt.vmapped import VMAP_SAMPLERS

    if compile and sampler not in VMAP_SAMPLERS:
        raise ValueError(
            f"--compile runs the batched step, which supports --sampler "
            f"{' or '.join(VMAP_SAMPLERS)}, got {sampler!r}; drop --compile"
        )
    return "vmap" if compile and chain_method == "auto" else chain_method


def _compile_error(err: Exception) -> str:
    """An error about compiling in the command's words (--compile, --chain-method)."""
    return (
        str(err)
        .replace("compile=True needs chain_method", "--compile needs --chain-method")
        .replace(", got chain_method=", ", got --chain-method ")
        .replace("compile=True: ", "--compile: ")
        .replace("pass compile=False", "drop --compile")
    )


# the library's argument names that are this command line's options (--step-size, ...)
_OPTIONS = ("step_size", "nbeta", "localization", "control_variate", "chain_method",
            "microbatch", "sampler", "num_chains", "num_draws", "num_burnin", "batch_size",
            "prior_std", "num_rungs", "max_workers", "executor", "overwrite")  # fmt: skip


def _options_in(text: str) -> str:
    """``text`` with each library argument that is an option of the command in the
    command's words (step_size -> --step-size)."""
    names = "|".join(_OPTIONS)
    return re.sub(rf"(?<![\w.-])({names})(?![\w(])", lambda m: "--" + m[1].replace("_", "-"),
                  text)  # fmt: skip


def _in_option_words(err: BaseException) -> str:
    """An error of the library in the command's words, on one line."""
    return _options_in(
        " ".join(_compile_error(err).replace("overwrite=True", "--overwrite").split())
    )


def _with_option_warnings(summary: str) -> str:
    """A result's printout with its warning lines' advice in the command's words."""
    return "\n".join(_options_in(line) if line.lstrip().startswith("warning:") else line
                     for line in summary.splitlines())  # fmt: skip


def _unused(ctx: typer.Context, loss: str, executor: str) -> None:
    """Refuse an option given that the others make moot (it was silently ignored)."""
    given = {name for name in ("sigma", "max_workers")
             if ctx.get_parameter_source(name) is not None
             and ctx.get_parameter_source(name).name != "DEFAULT"}  # fmt: skip
    if "sigma" in given and loss != "gaussian":
        raise typer.BadParameter(
            f"--sigma is σ of --loss gaussian; with --loss {loss} it would be ignored: drop it",
            param_hint="--sigma",
        )
    if "max_workers" in given and executor != "process":
        raise typer.BadParameter(
            f"--max-workers sizes --executor process's pool; with --executor {executor} it "
            "would be ignored: drop it",
            param_hint="--max-workers",
        )


def _failed(err: RuntimeError) -> NoReturn:
    """A RuntimeError from torch or the user's code during the run (a batch after the
    first that does not collate, a model that fails on some input): one line, exit 1."""
    typer.echo(
        f"Error: {type(err).__name__}: {' '.join(str(err).split())} (run the same in Python "
        "for the traceback)",
        err=True,
    )
    raise typer.Exit(1) from err


@app.command()
def llc(
    ctx: typer.Context,
    model: str = _MODEL,
    data: str = _DATA,
    checkpoint: Path | None = _CHECKPOINT,
    loss: str = _LOSS,
    sigma: float = _SIGMA,
    batch_size: int = _BATCH,
    step_size: str = _STEP,
    localization: float = _LOCALIZATION,
    nbeta: float | None = _NBETA,
    num_chains: int = _CHAINS,
    num_draws: int = _DRAWS,
    num_burnin: int = _BURNIN,
    sampler: str = _SAMPLER,
    control_variate: str = _CV,
    seed: int = _LLC_SEED,
    chain_method: str = _CHAIN_METHOD,
    compile: bool = _COMPILE,
    microbatch: str = _MICROBATCH,
    out: Path = _LLC_OUT,
    progress: bool = _PROGRESS,
) -> None:
    """Estimate the local learning coefficient λ̂ of a model at w*; print and save it."""
    import torch

    import slt
    from slt import io

    try:
        io._xarray()  # fail before sampling, not after
    except ImportError as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from err
    step = _parse_step_size(step_size)
    _unused(ctx, loss, executor="serial")
    _output_file(out, "--out", make_folder=True)
    net = _build(model, "--model", _is_module, "a torch.nn.Module")
    dataset = _build(data, "--data", _is_dataset, "a map-style torch Dataset (with __len__)")
    loss_fn = _loss(loss, sigma)
    if checkpoint is not None:
        _load_checkpoint(net, checkpoint)
    first_loss(net, dataset, loss_fn, batch_size, _FITS)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    try:
        res = slt.estimate_llc(
            net,
            loader,
            loss_fn,
            nbeta=nbeta,
            localization=localization,
            step_size=step,
            num_chains=num_chains,
            num_draws=num_draws,
            num_burnin=num_burnin,
            sampler=sampler,
            control_variate=control_variate,
            seed=seed,
            chain_method=_chain_method(chain_method, compile, sampler),
            compile=compile,
            microbatch=_parse_microbatch(microbatch),
            progress=progress,
        )
    except (ValueError, TypeError, slt.DivergenceError) as err:
        typer.echo(f"Error: {_in_option_words(err)}", err=True)
        raise typer.Exit(1 if isinstance(err, slt.DivergenceError) else 2) from err
    except CompileError as err:
        typer.echo(f"Error: {_in_option_words(err)}", err=True)
        raise typer.Exit(1) from err
    except RuntimeError as err:
        _failed(err)
    typer.echo(_with_option_warnings(str(res)))
    out.parent.mkdir(parents=True, exist_ok=True)
    io.save(res, out)
    typer.echo(f"saved to {out}")


_FOLDER = typer.Argument(
    ..., exists=True, file_okay=False,
    help="Folder of checkpoints (*.pt, *.pth, *.bin, *.ckpt, *.safetensors, *.pth.tar); the "
    "step of each is the number after 'step' in its name (step=300, step_300), else its last "
    "whole number. A Hugging Face Trainer's output folder: the weights in each "
    "checkpoint-<step>/ folder. Read with weights_only=True: files that would run code are "
    "refused.",
)  # fmt: skip
_RESULTS = typer.Option(
    Path("trajectory.jsonl"),
    help="JSON-lines results file, one row per finished checkpoint; rerunning resumes it.",
)
_EXECUTOR = typer.Option(
    "serial", help='"serial", "process" (a spawn process pool) or "ray" (slt[ray]).'
)
_WORKERS = typer.Option(None, min=1, help="Processes for --executor process (default: CPUs).")
_OVERWRITE = typer.Option(False, help="Discard a results file written with other settings.")
_PLOT = typer.Option(
    None, help="PNG of λ̂ and loss against step (default: the results file with .png)."
)


@app.command()
def trajectory(
    ctx: typer.Context,
    folder: Path = _FOLDER,
    model: str = _MODEL,
    data: str = _DATA,
    loss: str = _LOSS,
    sigma: float = _SIGMA,
    batch_size: int = _BATCH,
    step_size: str = _STEP,
    localization: float = _LOCALIZATION,
    nbeta: float | None = _NBETA,
    num_chains: int = _CHAINS,
    num_draws: int = _DRAWS,
    num_burnin: int = _BURNIN,
    sampler: str = _SAMPLER,
    control_variate: str = _CV,
    seed: int = _LLC_SEED,
    chain_method: str = _CHAIN_METHOD,
    compile: bool = _COMPILE,
    microbatch: str = _MICROBATCH,
    results: Path = _RESULTS,
    executor: str = _EXECUTOR,
    max_workers: int | None = _WORKERS,
    overwrite: bool = _OVERWRITE,
    plot: Path | None = _PLOT,
    progress: bool = _PROGRESS,
) -> None:
    """λ̂ at every checkpoint in FOLDER (resumable), change points, and a plot."""
    import torch

    import slt
    from slt.trajectory import llc_trajectory

    step = _parse_step_size(step_size)
    _unused(ctx, loss, executor)
    _output_file(results, "--results")
    if plot is None:  # beside the results; never the results file itself (--results r.png)
        plot = results.with_suffix(".png")
        plot = plot if plot != results else results.with_name(results.name + ".png")
    plot = _plot_file(plot, "--plot")
    if plot.resolve() == results.resolve():
        raise typer.BadParameter(f"{plot} is the results file; give another", param_hint="--plot")
    factory = _ModelSpec(model)
    net = factory()  # a bad --model fails here, named, before any sampling
    dataset = _build(data, "--data", _is_dataset, "a map-style torch Dataset (with __len__)")
    first_loss(net, dataset, _loss(loss, sigma), batch_size, _FITS)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    # the results file records which --data (and its file's contents) the rows came from
    loader.slt_data_spec = f"--data {_absolute(data)} [{spec_digest(_absolute(data))}]"
    try:
        with warnings.catch_warnings(record=True) as caught:  # said below, in one line each
            warnings.simplefilter("always")
            traj = llc_trajectory(
                folder, factory, loader, _LossSpec(loss, sigma), results=results,
                executor=executor, max_workers=max_workers, overwrite=overwrite,
                progress=progress, nbeta=nbeta, localization=localization, step_size=step,
                num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin,
                sampler=sampler, control_variate=control_variate, seed=seed,
                chain_method=_chain_method(chain_method, compile, sampler), compile=compile,
                microbatch=_parse_microbatch(microbatch),
            )  # fmt: skip
    except (ValueError, TypeError, ImportError, FileNotFoundError, slt.DivergenceError,
            CompileError) as err:  # fmt: skip
        typer.echo(f"Error: {_in_option_words(err)}", err=True)
        # as `slt llc`: what the sampling could not do exits 1, a bad option or input 2
        failed = isinstance(err, (slt.DivergenceError, CompileError))
        raise typer.Exit(1 if failed else 2) from err
    except RuntimeError as err:
        _failed(err)
    for w in caught:  # the library's advice in the command's words (it has no --steps)
        text = str(w.message).replace("pass steps= to set them", "rename the files to set them")
        typer.echo(f"warning: {' '.join(text.split())}", err=True)
    typer.echo(str(traj))
    if not np.isfinite(traj.llc).any():  # as `slt llc` exits 1 when every chain diverged
        typer.echo(f"Error: no λ̂ at any of the {len(traj.steps)} checkpoints", err=True)
        raise typer.Exit(1)
    transitions = None
    try:
        from slt.transitions import detect_transitions

        transitions = detect_transitions(traj)
        typer.echo("\n" + str(transitions))
    except (ImportError, ValueError) as err:
        typer.echo(f"(no change points: {err})")
    try:
        fig = traj.plot(transitions)
    except ImportError as err:
        typer.echo(f"(no plot: {err})")
    else:
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        typer.echo(f"results in {results}, plot in {plot}")


_EV_MODEL = typer.Option(
    None, help="Your model (as for `slt llc`); default: the zoo's singular potential."
)
_EV_DATA = typer.Option(None, help="Your dataset (as for `slt llc`); needed with --model.")
_EV_NS = typer.Option("100,300,1000,3000,10000", help="Sample sizes n, comma-separated.")
_EV_POTENTIAL = typer.Option(
    "1,2", help="Without --model: exponents k of the zoo potential K ∝ Π w_j^(2 k_j) (1,2: a²b⁴)."
)
_EV_PRIOR = typer.Option(1.0, help="σ of the prior N(0, σ² I).")
_EV_RUNGS = typer.Option(11, min=3, help="Temperatures on the thermodynamic-integration ladder.")
_EV_CHAINS = typer.Option(6, min=2, help="Chains per temperature.")
_EV_DRAWS = typer.Option(200, min=4, help="Draws per chain and temperature.")
_EV_BURNIN = typer.Option(50, min=0, help="Burn-in steps per chain and temperature.")
_EV_OUT = typer.Option(Path("evidence-out"), help="Folder for table.json and evidence.png.")
_EV_PROGRESS = typer.Option(False, help="Progress bars (one per method and n).")


@app.command()
def evidence(
    ctx: typer.Context,
    model: str | None = _EV_MODEL,
    data: str | None = _EV_DATA,
    checkpoint: Path | None = _CHECKPOINT,
    loss: str = _LOSS,
    sigma: float = _SIGMA,
    ns: str = _EV_NS,
    potential: str = _EV_POTENTIAL,
    prior_std: float = _EV_PRIOR,
    batch_size: int = _BATCH,
    num_rungs: int = _EV_RUNGS,
    num_chains: int = _EV_CHAINS,
    num_draws: int = _EV_DRAWS,
    num_burnin: int = _EV_BURNIN,
    seed: int = _LLC_SEED,
    out: Path = _EV_OUT,
    progress: bool = _EV_PROGRESS,
) -> None:
    """F_n (thermodynamic integration, and exactly for the zoo), WBIC, BIC and Laplace over n."""
    import slt
    from slt.evidence import evidence_curves

    sizes = _int_list(ns, "--ns")
    _output_folder(out, "--out")
    exponents = _int_list(potential, "--potential")
    net = dataset = loss_fn = None
    if model is None and data is None:  # the zoo's potential: options of a model are refused
        given = [f"--{name.replace('_', '-')}" for name in ("checkpoint", "loss", "sigma")
                 if ctx.get_parameter_source(name).name != "DEFAULT"]  # fmt: skip
        if given:
            raise typer.BadParameter(
                f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to your "
                "model: give --model and --data too",
                param_hint=given[0],
            )
    else:
        if model is None or data is None:
            raise typer.BadParameter("give --model and --data together", param_hint="--model")
        if ctx.get_parameter_source("potential").name != "DEFAULT":  # it was ignored
            raise typer.BadParameter(
                "--potential sets the zoo's model, used without --model; drop it",
                param_hint="--potential",
            )
        net = _build(model, "--model", _is_module, "a torch.nn.Module")
        dataset = _build(data, "--data", _is_dataset, "a map-style torch Dataset (with __len__)")
        loss_fn = _loss(loss, sigma)
        if checkpoint is not None:
            _load_checkpoint(net, checkpoint)
        first_loss(net, dataset, loss_fn, batch_size, _FITS)
    try:
        curves = evidence_curves(
            net, dataset, loss_fn, ns=sizes, potential=exponents, prior_std=prior_std,
            batch_size=batch_size, num_rungs=num_rungs, num_chains=num_chains,
            num_draws=num_draws, num_burnin=num_burnin, seed=seed, progress=progress,
            log=typer.echo,
        )  # fmt: skip
    except (ValueError, TypeError, slt.DivergenceError) as err:
        text = _in_option_words(err)  # and the zoo's exponents k, the sizes ns
        text = re.sub(
            r"^k(?:\[(\d+)\])?(?= )",
            lambda m: "--potential" + (f" entry {m[1]}" if m[1] else ""),
            text,
        )
        text = re.sub(r"^ns(?= )", "--ns", text)
        typer.echo(f"Error: {text}", err=True)
        raise typer.Exit(1 if isinstance(err, slt.DivergenceError) else 2) from err
    except RuntimeError as err:
        _failed(err)
    typer.echo("\n" + str(curves))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(_json.dumps(curves.to_dict(), indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        curves.plot().savefig(out / "evidence.png", dpi=120)
    except ImportError as err:
        typer.echo(f"(no plot: {err})")
        typer.echo(f"table in {out / 'table.json'}")
    else:
        typer.echo(f"table in {out / 'table.json'}, plot in {out / 'evidence.png'}")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        values = []
    if not values:
        raise typer.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=option
        )
    return values
