"""The fenced code blocks of README.md and docs/**/*.md, and how each is run by the tests.

Every block names its language. ``python`` blocks of a page run in order in one namespace (a
page reads like one session); ``bash`` blocks run line by line, ``attnreg ...`` in-process
through the CLI's runner, anything else in a shell; ``yaml`` / ``json`` / ``toml`` blocks are
parsed (a config with a ``variant`` is validated; a yaml block whose first line is
``# NAME.yaml`` is written to that file for the page's later blocks); ``text`` blocks are
output and pictures, not code. A block that cannot run here is preceded by
``<!-- docs-test: skip (reason) -->``, and the reason is required.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = ("python", "bash", "yaml", "json", "toml", "text")
_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[^\s`]*)[^\n]*$")
_SKIP = re.compile(r"^\s*<!-- docs-test: skip \((?P<reason>[^)]{10,}.*)\) -->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its code, and why it is skipped (if it is)."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    """README.md and every page of the docs site (docs/_tools holds scripts and docs/bench
    results, not pages)."""
    pages = sorted(p for p in (ROOT / "docs").rglob("*.md") if not {"_tools", "bench"} & set(p.parts))
    return [ROOT / "README.md", *pages]


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, in order."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = len(m.group("indent")), i
        body = []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{{indent}}}```\s*$", lines[i]):
            body.append(lines[i][indent:])
            i += 1
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = _SKIP.match(prev)
        out.append(Block(path, start + 1, m.group("lang"), "\n".join(body) + "\n",
                         skip.group("reason") if skip else None))
        i += 1
    return out


def bash_commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blanks dropped,
    ``a && b`` split into ``a`` and ``b``."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        commands += [c.strip() for c in line.split("&&") if c.strip()]
    return commands
