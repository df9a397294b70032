"""Read-only commands: ``list``, ``show``, ``schema``, ``doctor``."""

from __future__ import annotations

import json
import os
import platform
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.markup import escape
from rich.table import Table

from ._app import EXIT_FAILURE, app, console, user_errors

_KEY_CAPS = ("causal", "key_mask", "attn_mask", "cross_attention", "dropout", "learnable", "decoding",
             "grouped_query", "context_parallel", "double_backward")


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[dim]no[/]"


@app.command("list")
def list_cmd() -> None:
    """Table of registered variants; plugins that failed to load are listed below it."""
    import attnreg
    from attnreg._plugins import REGISTRY

    with user_errors(), _plugin_warnings_printed_here():
        table = Table(title="attnreg variants")
        table.add_column("name", no_wrap=True, style="bold")
        for col in ("aliases", "provider", "complexity", "supports"):
            table.add_column(col, overflow="fold")
        for spec in REGISTRY.specs():
            caps = spec.capabilities
            supports = " ".join(c for c in _KEY_CAPS if getattr(caps, c))
            table.add_row(escape(spec.name), escape(", ".join(spec.aliases)),
                          escape(REGISTRY.provider(spec.name)), escape(caps.complexity), supports)
        console.print(table)
        records = attnreg.plugin_records()
        failed = [r for r in records if r.status == "failed"]
        for r in failed:
            console.print(f"[red]failed plugin[/] {escape(f'{r.name} ({r.provider}): {r.error}')}",
                          highlight=False)
        _print_warnings(records, REGISTRY.unmatched_allow_list())
        if failed or any(r.warnings for r in records):
            console.print("Run `attnreg doctor` for details.")


@app.command("show")
def show_cmd(name: str = typer.Argument(..., help="Variant name or alias.")) -> None:
    """Summary, reference, config fields (type, default, bounds, description) and capabilities."""
    import attnreg
    from attnreg._plugins import REGISTRY

    with user_errors():
        spec = attnreg.get_variant(name)
        # Everything below comes from a plugin's spec and config: printed as written, never as
        # rich markup (``[[query_block, key_block], ...]`` is not a style tag).
        console.print(f"[bold]{escape(spec.name)}[/]  {escape(spec.summary)}", highlight=False)
        if spec.aliases:
            console.print(f"aliases: {escape(', '.join(spec.aliases))}", highlight=False)
        console.print(f"provider: {escape(REGISTRY.provider(spec.name))}", highlight=False)
        console.print(f"reference: {escape(spec.reference)}", highlight=False)
        fields = Table(title="config fields")
        for col in ("field", "type", "default", "bounds", "description"):
            fields.add_column(col)
        for fname, info in spec.config.model_fields.items():
            bounds = " ".join(_bound_text(m) for m in info.metadata if _bound_text(m))
            default = "(required)" if info.is_required() else repr(info.default)
            fields.add_row(*(escape(t) for t in (fname, _type_text(info.annotation), default, bounds,
                                                 info.description or "")))
        console.print(fields)
        caps = Table(title="capabilities")
        caps.add_column("capability")
        caps.add_column("value")
        for cname, value in spec.capabilities.__dict__.items():
            text = _yes(value) if isinstance(value, bool) else escape(str(value))
            caps.add_row(cname, text)
        console.print(caps)
        if spec.expected_failures:
            console.print("expected conformance failures:")
            for check, reason in spec.expected_failures.items():
                console.print(f"  {escape(f'{check}: {reason}')}", highlight=False)


def _type_text(annotation: object) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def _bound_text(meta: object) -> str:
    ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    for attr, op in ops.items():
        value = getattr(meta, attr, None)
        if value is not None:
            return f"{op} {value}"
    return ""


@app.command("schema")
def schema_cmd(
    name: str = typer.Argument(None, help="One variant; default: the union of all registered configs."),
) -> None:
    """JSON Schema of the config union (or of one variant's config), for editor completion."""
    import attnreg

    with user_errors():
        if name:
            schema = attnreg.get_variant(name).config.model_json_schema()
        else:
            from pydantic import TypeAdapter

            schema = TypeAdapter(attnreg.config_type()).json_schema()
        print(json.dumps(schema, indent=2))


@app.command("doctor")
def doctor_cmd() -> None:
    """Environment report: torch, threads, plugins found / loaded / failed and why, env switches.

    Also what plugins did while loading that they must not (changes to torch's global state),
    and names in ATTNREG_PLUGINS that match no installed plugin.
    """
    import torch

    import attnreg
    from attnreg import _plugins

    threads_before = torch.get_num_threads()
    try:
        with _plugin_warnings_printed_here():
            records = attnreg.plugin_records()
        unmatched = _plugins.REGISTRY.unmatched_allow_list()
        strict_error = None
    except attnreg.PluginLoadError as exc:  # strict mode: report it, fail
        records, unmatched = _plugins.REGISTRY.loading_report()
        strict_error = exc
    threads = torch.get_num_threads()
    before = f" ({threads_before} before plugins loaded)" if threads != threads_before else ""
    console.print(f"attnreg {attnreg.__version__}, python {platform.python_version()}, "
                  f"torch {torch.__version__}, threads {threads}{before}, "
                  f"cpus {os.cpu_count()}", highlight=False)
    for key, value in _plugins.env_switches().items():
        console.print(f"{key}={value if value is not None else '(unset)'}", highlight=False)
    _print_records(records)
    _print_warnings(records, unmatched)
    if strict_error is not None:
        console.print(f"[red]strict plugin loading failed:[/] {escape(str(strict_error))}", highlight=False)
        raise typer.Exit(EXIT_FAILURE)
    failed = sum(r.status == "failed" for r in records)
    console.print(f"{len(records)} entry points found, "
                  f"{sum(r.status == 'loaded' for r in records)} loaded, {failed} failed, "
                  f"{sum(r.status == 'filtered' for r in records)} filtered, "
                  f"{sum(bool(r.warnings) for r in records)} with warnings")


def _print_records(records: list) -> None:
    table = Table(title="plugins (entry-point group 'attnreg')")
    for col in ("entry point", "distribution", "target", "status", "variants / error"):
        table.add_column(col, overflow="fold")
    colours = {"loaded": "green", "failed": "red", "filtered": "yellow"}
    for r in records:
        detail = ", ".join(r.variants) if r.status == "loaded" else (r.error or "")
        status = f"[{colours.get(r.status, 'white')}]{r.status}[/]"
        table.add_row(escape(r.name), escape(r.provider), escape(r.target), status, escape(detail))
    console.print(table)


@contextmanager
def _plugin_warnings_printed_here() -> Iterator[None]:
    """Silence ``PluginWarning``: ``list`` and ``doctor`` print the same notes themselves."""
    from attnreg._errors import PluginWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        yield


def _print_warnings(records: list, unmatched: tuple[str, ...]) -> None:
    """What plugins did while loading that they must not (an error under strict mode)."""
    from attnreg._plugins import ENV_ALLOW

    for r in records:
        for note in r.warnings:
            console.print(f"[yellow]warning:[/] {escape(f'plugin {r.name} ({r.provider}) {note}')}",
                          highlight=False)
    if unmatched:
        console.print(f"[yellow]warning:[/] {ENV_ALLOW} names no installed plugin: "
                      f"{escape(', '.join(unmatched))}", highlight=False)
