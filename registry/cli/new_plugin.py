"""``attnreg new-plugin``: scaffold a plugin distribution that passes ``attnreg check``."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app, console, user_errors


@app.command("new-plugin")
def new_plugin_cmd(
    name: str = typer.Argument(..., help="The new variant's name (lower case, e.g. cosine_attn)."),
    directory: Path = typer.Option(
        None, "--dir", help="Folder to create (must not exist or be empty; default ./attnreg-NAME)."),
) -> None:
    """Write a plugin distribution: pyproject with the entry point, config, module, float64
    reference, tests (its own and the shipped conformance suite) and a README.

    As generated it is softmax attention with a temperature and passes `attnreg check NAME`;
    replace the math with yours.
    """
    from attnreg.scaffold import write_plugin

    with user_errors():
        target, written = write_plugin(name, directory)
    for path in written:
        console.print(f"  {path}", highlight=False, markup=False)
    console.print(f"\nNext: pip install -e '{target}[test]' && attnreg check {name} "
                  f"&& python -m pytest {target / 'tests'}", highlight=False, markup=False)
