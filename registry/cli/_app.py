"""The typer application and the error-to-exit-code policy shared by every command."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from attnreg.core import AttnRegError, ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

PIPE_WIDTH = 10_000
"""Columns of output that is not a terminal (a pipe, a file, a CI log) when ``COLUMNS`` is unset:
rich's default of 80 would wrap every table of ``list``, ``show`` and ``doctor`` there, and any
fixed width is exceeded by some plugin's provider or config text; tables take their natural
width (nothing here expands to the console's width)."""

_METAVARS = {"str": "TEXT", "text": "TEXT", "int": "INT", "integer": "INT", "float": "FLOAT", "path": "PATH"}


def _value_metavar(option: Any) -> str:
    """``PATH``, ``INT``, ``TEXT``, ... for an option that takes a value."""
    try:
        label = str(option.display_type(None))  # typer >= 0.26: "<path>", "<list[str]>"
    except Exception:  # noqa: BLE001 - older typer: click's parameter types
        label = str(getattr(getattr(option, "type", None), "name", "value"))
    label = label.strip("<>").removeprefix("list[").removesuffix("]")
    return _METAVARS.get(label, label.upper())


class _PipeAwareConsole(Console):
    """A rich console that is :data:`PIPE_WIDTH` wide when its output is not a terminal and
    ``COLUMNS`` does not say otherwise; a terminal keeps its own width."""

    @property
    def size(self) -> ConsoleDimensions:
        dims = Console.size.fget(self)  # type: ignore[attr-defined]
        if self._width is None and not self.is_terminal and not self._environ.get("COLUMNS", "").isdigit():
            return ConsoleDimensions(PIPE_WIDTH, dims.height)
        return dims

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


def _plain_params(params: list[Any]) -> None:
    """Plain-word metavars and help texts printed as written (see :class:`_Command`)."""
    for p in params:
        if getattr(p, "help", None):
            p.help = escape(p.help)
        if isinstance(p, TyperArgument) and p.metavar is None:
            name = (p.name or "arg").upper()
            p.metavar = f"{name.removesuffix('S')}..." if p.nargs != 1 else name
            p.display_type_rich = lambda ctx: None  # NAME says it
        elif isinstance(p, TyperOption) and p.metavar is None:
            p.metavar = "" if p.is_flag else _value_metavar(p)


class _PlainHelpOption:
    """``--help`` shown without a value type after it."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Command(_PlainHelpOption, TyperCommand):
    """Help in plain words: ``NAME`` / ``[NAME...]`` in the usage line (typer writes ``{name}``),
    value types as ``PATH``, ``INT``, ``TEXT``, nothing after a flag (typer writes ``<bool>``),
    and help texts printed as written (``[VARIANT:]CHECK`` is not rich markup)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.help:
            self.help = escape(self.help)
        _plain_params(self.params)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                pieces.append(p.metavar if p.required else f"[{p.metavar}]")
        return pieces


class _Group(_PlainHelpOption, TyperGroup):
    """The root command: the same plain help as :class:`_Command`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_params(self.params)


class _Typer(typer.Typer):
    """Every command gets :class:`_Command`'s help formatting."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _Typer(
    name="attnreg",
    cls=_Group,
    help="A registry of attention variants for PyTorch: list, inspect, check, plot and benchmark them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = _PipeAwareConsole()
err_console = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Print attnreg errors as one clear message and exit: 2 for bad user input
    (unknown variant, bad config), 1 for everything else (e.g. a broken plugin)."""
    try:
        yield
    except ConfigError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    except AttnRegError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
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
