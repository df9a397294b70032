"""``attnreg check``: run the conformance suite and print a variant x check-group table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from attnreg.core import AttnRegError

from ._app import EXIT_FAILURE, EXIT_USAGE, app, console, err_console, user_errors

_STYLE = {"passed": "green", "failed": "bold red", "error": "bold red", "xpassed": "bold red",
          "xfailed": "yellow", "n.a.": "dim"}


_DTYPES_LABEL = {"reference": "float64", "each": "every declared", "low": "each below float64"}


def _cell(results: list[Any]) -> str:
    """One table cell: the worst outcome of a variant's checks in one group."""
    if not results:
        return "[dim]-[/]"
    ran = [r for r in results if r.outcome != "n.a."]
    bad = [r for r in ran if r.outcome in ("failed", "error", "xpassed")]
    if bad:
        return f"[bold red]FAIL {len(bad)}/{len(ran)}[/]"
    if any(r.outcome == "xfailed" for r in ran):
        n = sum(r.outcome == "xfailed" for r in ran)
        return f"[yellow]xfail {n}[/][green]/{len(ran)}[/]"
    if ran:
        return f"[green]pass {len(ran)}[/]"
    return "[dim]n.a.[/]"


def _table(report: Any, groups: tuple[str, ...]) -> Table:
    table = Table(title="attnreg conformance", show_lines=False)
    table.add_column("variant", style="bold", overflow="fold")  # keep check_configs labels whole
    for g in groups:
        table.add_column(g, justify="center")
    table.add_column("total", justify="right")
    for variant in report.subjects:  # each variant, then its check_configs subjects
        mine = [r for r in report.results if r.subject == variant]
        if not mine:
            continue
        by_group = [_cell([r for r in mine if r.group == g]) for g in groups]
        ok = sum(r.outcome == "passed" for r in mine)
        ran = sum(r.outcome != "n.a." for r in mine)
        table.add_row(escape(variant), *by_group, f"{ok}/{ran}")  # "[k=v]" is not rich markup
    return table


def _list_checks() -> None:
    from attnreg.conformance import CHECKS

    table = Table(title=f"attnreg conformance checks ({len(CHECKS)})", show_lines=True)
    for col in ("check", "group", "applies when", "dtypes", "what it guarantees"):
        table.add_column(col)
    for c in CHECKS.values():
        table.add_row(c.name, c.group, " and ".join(f"{r}=True" for r in c.requires) or "always",
                      _DTYPES_LABEL[c.dtypes],
                      c.doc)
    console.print(table)


@app.command("check")
def check_cmd(
    names: list[str] = typer.Argument(
        None, help="Variant names or aliases (default: every registered variant)."),
    json_path: Path = typer.Option(None, "--json", help="Write a JSON report to this path."),
    junit_path: Path = typer.Option(None, "--junit", help="Write a JUnit XML report to this path."),
    dtype: list[str] = typer.Option(None, "--dtype", help="Only the checks at this dtype (repeatable)."),
    keyword: str = typer.Option(None, "-k", help="pytest -k expression on 'check[variant-dtype]' names."),
    xfail: list[str] = typer.Option(
        None, "--xfail",
        help="Expected failure (strict) with its reason: [VARIANT:]CHECK=REASON (repeatable)."),
    device: str = typer.Option("cpu", "--device", help="torch device to run the checks on."),
    list_checks: bool = typer.Option(False, "--list-checks", help="List the checks and exit."),
) -> None:
    """Run the conformance suite on registered variants; exit 1 on any failure.

    Every check is derived from the attention interface and the variant's declared
    capabilities (both ways: declared True must work, declared False must raise).
    """
    with user_errors():
        if list_checks:
            _list_checks()
            return
        import torch

        import attnreg
        from attnreg.conformance import GROUPS
        from attnreg.conformance.runner import check_device, run

        try:
            check_device(device)  # before anything is loaded: `--device cuda` on a CPU-only torch
        except ValueError as err:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
        attnreg.list_variants()  # load the plugins first, so that the bar only counts checks
        progress = Progress(TextColumn("[bold]checking[/] {task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), console=err_console, transient=True)
        task = progress.add_task("(starting pytest)", total=None)

        def on_start(case: Any) -> None:  # the case running now, not the last one that ended
            progress.update(task, description=escape(f"{case.subject}: {case.check} [{case.dtype}]"))

        try:
            with progress:
                report = run(names or None, dtypes=dtype or None, keyword=keyword, xfails=xfail or (),
                             device=device, junit_path=junit_path, json_path=json_path,
                             on_total=lambda n: progress.update(task, total=n),
                             on_start=on_start, on_result=lambda r: progress.advance(task))
        except ValueError as err:
            if isinstance(err, AttnRegError):  # unknown variant: the shared policy prints it
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
        for msg in report.collection_errors:
            err_console.print(f"[bold red]collection error:[/] {msg}", highlight=False)
        if not report.results and not report.collection_errors:
            err_console.print("[bold red]error:[/] no conformance check selected (check the names, -k and "
                              "--dtype)")
            raise typer.Exit(EXIT_USAGE)
        wide = console  # a terminal's own width; PIPE_WIDTH in a pipe or CI log
        wide.print(_table(report, GROUPS))
        for r in report.failed:
            wide.print(f"\n[bold red]{r.outcome.upper()}[/] {escape(f'{r.subject} / {r.check} [{r.dtype}]')}",
                       highlight=False)
            wide.print(r.message, highlight=False, markup=False)
        counts = report.counts()
        summary = ", ".join(f"[{_STYLE.get(k, '')}]{v} {k}[/]" for k, v in sorted(counts.items()))
        wide.print(f"\n{len(report.results)} results of {len({r.check for r in report.results})} distinct "
                   f"checks on {len(report.variants)} variant(s) "
                   f"({len(report.subjects) - len(report.variants)} check_configs): {summary} "
                   f"in {report.duration_s:.1f} s "
                   f"(torch {torch.__version__}, {torch.get_num_threads()} threads)", highlight=False)
        if json_path:
            console.print(f"JSON report: {json_path}")
        if junit_path:
            console.print(f"JUnit report: {junit_path}")
        if not report.ok:
            raise typer.Exit(EXIT_FAILURE)
