"""Reading config files: bounded size and nesting, no YAML aliases, no duplicate keys.

A config file is read by people's tools and by ours alike, and may come from anywhere: every way
it can be malformed ends in one ``ConfigError`` that names the file and the problem, quickly and
in bounded memory (never a hang, a ``RecursionError`` or a ``UnicodeDecodeError``).
"""

from __future__ import annotations

import json
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from attnreg.core import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "read_config_file"]

# Attention configs are a few hundred bytes; 1 MiB leaves room for a custom block layout written
# out in the file (a 512 x 512 0/1 matrix) and bounds the work: PyYAML (libyaml) took ~5 s for a
# 0.8 MB YAML of numbers on a busy 2-core machine, JSON 0.03 s. Larger layouts belong in Python
# (a bool tensor as custom_matrix).
MAX_CONFIG_BYTES = 1 << 20
# Nesting levels of mappings/lists, the top-level mapping being level 1 (a per-head custom
# matrix is level 4). Deeper files are refused before they reach a recursive parser or validator.
MAX_CONFIG_DEPTH = 32

_SUFFIXES = (".yaml", ".yml", ".json", ".toml")


class _Refused(Exception):
    """A file the parser could read but attnreg refuses (alias, duplicate key, too deep)."""


def _line(mark: Any) -> str:
    return f"line {mark.line + 1}" if mark is not None else "unknown line"


_YamlBase: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present (5x faster)


class _YamlLoader(_YamlBase):  # type: ignore[misc, valid-type]
    """The safe loader (plain data only), refusing duplicate and merge keys."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, str] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused(f"merge key '<<' ({_line(key_node.start_mark)}) is not supported; "
                               "write the keys out")
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
            except TypeError:
                continue  # unhashable: the base constructor reports it
            if dup:
                raise _Refused(f"duplicate key {key!r} ({seen[key]} and {_line(key_node.start_mark)}); "
                               "each key may appear once")
            seen[key] = _line(key_node.start_mark)
        return super().construct_mapping(node, deep)


def _scan_yaml(text: str) -> None:
    """Refuse anchors/aliases and deep nesting from the event stream, before anything is built.

    An alias lets a few hundred bytes stand for billions of values (a "billion laughs" file), and
    configs have no need for them.
    """
    depth = 0
    for event in yaml.parse(text, Loader=_YamlLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise _Refused(
                f"YAML {kind}{event.anchor} ({_line(event.start_mark)}): anchors and aliases are not "
                "supported (they let a small file expand into a huge one); write the value out"
            )
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise _Refused(f"nested deeper than {MAX_CONFIG_DEPTH} levels ({_line(event.start_mark)})")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _load_yaml(text: str) -> Any:
    _scan_yaml(text)
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key!r}; each key may appear once")
        out[key] = value
    return out


def _load_json(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_json_object)


_PARSERS: dict[str, Callable[[str], Any]] = {
    ".yaml": _load_yaml, ".yml": _load_yaml, ".json": _load_json, ".toml": tomllib.loads,
}


def _check_depth(data: Any) -> None:
    """Refuse nesting deeper than ``MAX_CONFIG_DEPTH`` (iterative: no recursion on hostile data)."""
    stack = [(data, 1)]
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, Mapping):
            children: Any = obj.values()
        elif isinstance(obj, list):
            children = obj
        else:
            continue
        if depth > MAX_CONFIG_DEPTH:
            raise _Refused(f"nested deeper than {MAX_CONFIG_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def _read_bytes(p: Path, where: str) -> bytes:
    try:
        info = p.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where} is not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where} is {info.st_size} bytes; config files are limited to "
                              f"{MAX_CONFIG_BYTES} bytes (1 MiB)")
        with p.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)  # never more, even if the file grew meanwhile
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is larger than the limit of config files, {MAX_CONFIG_BYTES} bytes")
    return raw


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a config file (.yaml/.yml with the safe loader, .json, .toml), not yet
    validated (``attnreg.MultiHeadAttention`` fills in the head sizes first).

    Refused with a ``ConfigError`` naming the file: other extensions, files over
    ``MAX_CONFIG_BYTES``, text that is not UTF-8, syntax errors, YAML anchors/aliases/merge keys,
    duplicate keys, nesting deeper than ``MAX_CONFIG_DEPTH``, anything but a mapping at the top.
    """
    p = Path(path)
    where = f"config file {str(p)!r}"
    suffix = p.suffix.lower()
    if suffix not in _PARSERS:
        raise ConfigError(f"{where}: unknown extension {suffix!r}; expected {', '.join(_SUFFIXES)}")
    raw = _read_bytes(p, where)
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte order mark (some Windows editors) is fine
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{where} is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
            "save it as UTF-8"
        ) from None
    try:
        data = _PARSERS[suffix](text)
        _check_depth(data)
    except _Refused as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    except (yaml.YAMLError, ValueError) as exc:  # JSONDecodeError / TOMLDecodeError are ValueErrors
        raise ConfigError(f"{where} could not be parsed: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must hold a mapping with a 'variant' key, got {type(data).__name__}")
    return dict(data)
