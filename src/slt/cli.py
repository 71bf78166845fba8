"""The ``slt`` command line."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="slt: singular learning theory, measured on PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """slt: singular learning theory, measured on PyTorch models."""


_OUT = typer.Option(Path("validate-out"), help="Folder for table.json and validate.png.")
_SEED = typer.Option(0, help="Seed of every chain.")
_PROGRESS = typer.Option(True, help="Show a progress bar.")


@app.command()
def validate(out: Path = _OUT, seed: int = _SEED, progress: bool = _PROGRESS) -> None:
    """Estimate λ on models whose answer is known and print the table; exit 1 on a miss."""
    from slt.validate import validate as run

    rows = run(out=out, seed=seed, progress=progress)
    raise typer.Exit(0 if all(r.passed for r in rows) else 1)
