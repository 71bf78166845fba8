"""Entry point of the ``slt`` command: a clear message when the ``cli`` extra is missing."""

import sys


def main() -> None:
    try:
        from slt.cli import app
    except ModuleNotFoundError as err:
        if err.name != "typer":
            raise
        sys.exit("the slt command needs typer: pip install 'slt[cli]'")
    app()
