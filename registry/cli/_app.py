"""The typer application and the error-to-exit-code policy shared by every command."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from attnreg.core import AttnRegError, ConfigError

app = typer.Typer(
    name="attnreg",
    help="A registry of attention variants for PyTorch: list, inspect, check and benchmark them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


@contextmanager
def user_errors() -> Iterator[None]:
    """Print attnreg errors as one clear message and exit: 2 for bad user input
    (unknown variant, bad config), 1 for everything else (e.g. a broken plugin)."""
    try:
        yield
    except ConfigError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    except AttnRegError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_FAILURE) from None


def _version_callback(value: bool) -> None:
    if value:
        from attnreg import __version__

        console.print(f"attnreg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """attnreg: one attention interface, many variants, all verified."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="attnreg")
