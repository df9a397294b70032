"""``attnreg bench`` (measure every registered variant) and ``attnreg bench-plot`` (re-render a run)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ._app import EXIT_FAILURE, app, console, err_console, user_errors

if TYPE_CHECKING:  # the bench (and torch) load only when a command runs
    from attnreg.bench import ResultsDoc

EXIT_INTERRUPTED = 130


def _progress_bar() -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err_console, transient=False)
    task = bar.add_task("starting", total=None)

    def update(desc: str, done: int, total: int) -> None:
        bar.update(task, description=desc[:60], completed=done, total=total or None)

    return bar, update


@app.command("bench")
def bench_cmd(
    names: list[str] = typer.Argument(
        None, help="Variants: name, alias, or name:field=value,... (default: all but dot_product = sdpa)."
    ),
    lengths: str = typer.Option(None, "--lengths", help="Sequence lengths, e.g. 1024,4K,16384."),
    batch: int = typer.Option(None, "--batch", help="Batch size B (default 1)."),
    heads: int = typer.Option(None, "--heads", help="Heads H (default 8)."),
    head_dim: int = typer.Option(None, "--head-dim", help="Head dim E = Ev (default 64)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float64, bfloat16 or float16."),
    threads: int = typer.Option(None, "--threads", help="torch threads (default: torch's default)."),
    modes: str = typer.Option(
        "fwd,fwdbwd", "--modes", help="Comma list of fwd, fwdbwd, decode (one token at context L)."
    ),
    causal: bool | None = typer.Option(
        None, "--causal/--no-causal", help="Only causal / only non-causal (default: both)."
    ),
    quick: bool = typer.Option(False, "--quick", help="Smoke test: tiny sizes, seconds."),
    ci: bool = typer.Option(
        False, "--ci", help="The speed guard's fixed preset (about 2 minutes on 2 cores); use with --compare."
    ),
    out: Path = typer.Option(Path("bench-out"), "--out", help="Folder for results.json and the PNG plots."),
    compare: Path = typer.Option(
        None, "--compare",
        help="A baseline results.json: compare speedups over SDPA and peak memory, write compare.json, "
        "exit 1 on a regression.",
    ),
    max_slowdown: float = typer.Option(
        1.5, "--max-slowdown", help="--compare fails where a speedup over SDPA fell by more than this factor."
    ),
    max_memory_growth: float = typer.Option(
        1.5, "--max-memory-growth", help="--compare fails where peak memory grew by more than this factor."
    ),
    guard_from: int = typer.Option(
        2048, "--guard-from", help="--compare gates only points at lengths >= this (shorter ones are shown)."
    ),
    max_memory: str = typer.Option(
        None, "--max-memory", help="Per-point memory budget, e.g. 8G (default: half the RAM)."
    ),
    point_budget: float = typer.Option(
        None, "--point-budget", help="Skip variant points whose single call takes longer, in s (default 30)."
    ),
    baseline_budget: float = typer.Option(
        None, "--baseline-budget", help="The same for baseline points (dense SDPA, naive forms; default 20)."
    ),
    repeat_time: float = typer.Option(None, "--repeat-time", help="Seconds of repeats per point (def. 0.5)."),
    time_limit: float = typer.Option(
        None, "--time-limit", help="Minutes for the whole run; later points are skipped (default: none)."
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write time.png and memory.png."),
) -> None:
    """Correctness-gate, then time and measure memory of variants against SDPA baselines."""
    from attnreg.bench import BenchSettings, GuardSettings, load_results, parse_variant, run_bench
    from attnreg.bench.report import print_report
    from attnreg.bench.settings import parse_bytes, parse_lengths

    with user_errors():
        import torch

        previous = load_results(compare) if compare is not None else None
        guard = GuardSettings(max_slowdown=max_slowdown, max_memory_growth=max_memory_growth,
                              min_length=guard_from)
        opts: dict[str, Any] = dict(
            batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, threads=threads, causal=causal,
            modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
            lengths=parse_lengths(lengths) if lengths else None,
            max_memory=parse_bytes(max_memory) if max_memory else None,
            max_call_s=point_budget, max_baseline_call_s=baseline_budget, target_s=repeat_time,
            time_limit_s=None if time_limit is None else time_limit * 60.0,
        )
        if ci:
            settings, choices = _ci_preset(names, quick, opts)
        elif quick:
            settings = BenchSettings.quick_settings(**opts)
        else:
            keep = ("causal", "time_limit_s")
            settings = BenchSettings(**{k: v for k, v in opts.items() if v is not None or k in keep})
        torch.set_num_threads(settings.threads)
        if not ci:
            if not names:
                import attnreg

                # dot_product IS the `sdpa` baseline of every run (the same kernel); name it to time
                # it through the module as well. Decoding times its KV cache: the reference there.
                names = [n for n in attnreg.list_variants()
                         if n != "dot_product" or "decode" in settings.modes]
            choices = [parse_variant(n, settings.heads, settings.head_dim) for n in names]
        bar, update = _progress_bar()
        with bar:
            doc = run_bench(settings, choices, out=out, progress=update)
        print_report(doc, console, brief=quick)
        comparison = None
        if previous is not None:
            comparison = _compare(doc, previous, guard, out, compare, settings, choices)
        if plots:
            _plot(doc, out)
        console.print(f"results: {out / 'results.json'}")
    failed = [label for label, v in doc["variants"].items() if v.get("status") == "failed"]
    if doc["status"] == "interrupted":
        err_console.print("[yellow]interrupted: partial results written[/]")
        raise typer.Exit(EXIT_INTERRUPTED)
    if failed:
        err_console.print(f"[red]failed the correctness gate (not timed):[/] {', '.join(failed)}")
        raise typer.Exit(EXIT_FAILURE)
    if comparison is not None and not comparison.ok:
        err_console.print(f"[red]speed guard: {len(comparison.regressions)} regression(s) against "
                          f"{compare}[/] (details in {out / 'compare.json'})")
        raise typer.Exit(EXIT_FAILURE)


def _ci_preset(names: list[str] | None, quick: bool, opts: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The CI preset's settings and variants; any option that would change them is a usage error."""
    from attnreg.bench import ci_choices, ci_settings
    from attnreg.core import ConfigError

    given = [k for k, v in opts.items() if v is not None and k not in ("dtype", "modes")]
    if opts.get("dtype") not in (None, "float32"):
        given.append("dtype")
    if opts.get("modes") != ("fwd", "fwdbwd"):
        given.append("modes")
    if names or quick or given:
        what = ", ".join((["variant names"] if names else []) + (["--quick"] if quick else []) + given)
        raise ConfigError(f"--ci runs a fixed preset (its baseline was measured with it); "
                          f"do not combine it with: {what}")
    settings = ci_settings()
    return settings, ci_choices(settings)


def _compare(doc: ResultsDoc, previous: ResultsDoc, guard: Any, out: Path, source: Path,
             settings: Any, choices: list[Any]) -> Any:
    """Compare with the baseline (re-measuring failing points once to confirm them), print the
    table, write compare.json; return the comparison."""
    from attnreg.bench.guard import run_guard
    from attnreg.bench.report import write_json

    bar, update = _progress_bar()
    with bar:
        comparison = run_guard(doc, previous, guard, settings, choices, out, update,
                               lambda msg: err_console.print(f"[yellow]speed guard: {msg}[/]"))
    console.print(comparison.table())
    for line in comparison.not_compared:
        console.print(f"[yellow]not compared[/]: {line}")
    write_json({**comparison.as_json(), "baseline": str(source)}, out / "compare.json")
    return comparison


def _plot(doc: ResultsDoc, out: Path) -> None:
    from attnreg.bench import plot_results

    for path in plot_results(doc, out):
        console.print(f"plot: {path}")


@app.command("bench-plot")
def bench_plot_cmd(
    results: Path = typer.Argument(..., help="A results.json written by `attnreg bench`."),
    out: Path = typer.Option(None, "--out", help="Folder for the PNGs (default: next to the JSON)."),
    tables: bool = typer.Option(False, "--tables", help="Also print the result tables."),
) -> None:
    """Re-render time.png and memory.png (and optionally the tables) from a results.json."""
    from attnreg.bench import derive, load_results
    from attnreg.bench.report import print_report

    with user_errors():
        doc = derive(load_results(results))
        target = out if out is not None else results.parent
        target.mkdir(parents=True, exist_ok=True)
        if tables:
            print_report(doc, console)
        _plot(doc, target)
