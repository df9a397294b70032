"""``attnreg plot``: a variant's allowed pattern and one head's weights, as a PNG."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import EXIT_USAGE, app, console, err_console, user_errors


@app.command("plot")
def plot_cmd(
    name: str = typer.Argument(..., help="Variant name or alias (any registered variant)."),
    fields: list[str] = typer.Argument(
        None, help="Config fields as FIELD=VALUE, values typed like YAML (e.g. window=8 block_size=4)."),
    out: Path = typer.Option(..., "--out", help="The PNG file to write."),
    length: list[int] = typer.Option(
        None, "--length", help="Sequence length L (default 128); repeat it for several lengths."),
    causal: bool = typer.Option(False, "--causal", help="Under is_causal=True (default: not causal)."),
    grid: bool = typer.Option(
        False, "--grid", help="Not causal and causal side by side, for each --length (default 64 and 256)."),
    heads: int = typer.Option(2, "--heads", help="Heads H of the random inputs (head 0 is shown)."),
    head_dim: int = typer.Option(16, "--head-dim", help="Head size E of the random inputs."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs and of the module."),
    dpi: int = typer.Option(100, "--dpi", min=30, max=600, help="Resolution of the PNG."),
) -> None:
    """Plot a variant's allowed pattern and one head's attention weights on random inputs.

    The title names the variant and its config. The pattern is the module's pattern_mask(L)
    where it has one (ANDed with the causal mask), else the weights' support on random inputs.
    """
    from attnreg.pictures import parse_fields, pattern_picture, plot_pictures

    if name.endswith(".json") and Path(name).is_file():
        err_console.print(f"[bold red]error:[/] {name} is a file: `attnreg plot` draws a variant's "
                          f"pattern; re-render a benchmark with `attnreg bench-plot {name}`", highlight=False)
        raise typer.Exit(EXIT_USAGE)
    with user_errors():
        variant, _, inline = name.partition(":")  # also "local:window=8,block_size=4", as in bench
        given = parse_fields([f for f in inline.split(",") if f.strip()] + list(fields or ()))
        lengths = list(length or ([64, 256] if grid else [128]))
        if grid:  # a variant without causal is drawn not causal only
            import attnreg

            flags = [False, True] if attnreg.get_variant(variant).capabilities.causal else [False]
        else:
            flags = [causal]
        pictures = [pattern_picture(variant, given, length=n, causal=c, heads=heads, head_dim=head_dim,
                                    seed=seed)
                    for n in lengths for c in flags]
        path = plot_pictures(pictures, out, dpi=dpi)
        console.print(f"plot: {path} ({pictures[0].variant}, {pictures[0].config_text}; "
                      f"pattern from {pictures[0].source})", highlight=False)
