"""Hostile and careless config files: every malformed file is one quick ConfigError naming the
file and the problem (never a hang, RecursionError, UnicodeDecodeError or a silent choice)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnreg
from attnreg import ConfigError
from attnreg._config_files import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH
from attnreg.plugins.dot_product import DotProductConfig

# The classic "billion laughs": 9 levels of 9 aliases, 9**9 strings from ~500 bytes.
BOMB = "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
) + "variant: dot_product\n"


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _refused(path: Path, match: str) -> str:
    """Load ``path`` through both readers; each must raise a ConfigError naming the file."""
    with pytest.raises(ConfigError, match=match) as info:
        attnreg.load_config(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match=match) as again:
        attnreg.MultiHeadAttention(8, 2, attention=path)  # the other path into read_config_file
    assert str(path) in str(again.value)
    return str(info.value)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    path = _write(tmp_path, "bomb.yaml", BOMB)
    assert len(BOMB) < 600
    start = time.perf_counter()
    _refused(path, "anchors and aliases are not supported")
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("text,what", [
    ("base: &b 0.25\nvariant: dot_product\n", "anchor &b"),
    ("variant: dot_product\ndropout: *b\n", "could not be parsed|alias"),  # undefined alias
    ("variant: &v dot_product\n", "anchor &v"),
    ("variant: dot_product\n<<: {dropout: 0.25}\n", "merge key"),
])
def test_yaml_anchors_aliases_and_merge_keys_are_refused(tmp_path: Path, text: str, what: str) -> None:
    _refused(_write(tmp_path, "a.yaml", text), what)


@pytest.mark.parametrize("name,text", [
    ("a.yaml", "variant: dot_product\ndropout: 0.1\ndropout: 0.2\n"),
    ("a.json", '{"variant": "dot_product", "dropout": 0.1, "dropout": 0.2}'),
    ("a.toml", 'variant = "dot_product"\ndropout = 0.1\ndropout = 0.2\n'),
])
def test_duplicate_keys_are_refused(tmp_path: Path, name: str, text: str) -> None:
    msg = _refused(_write(tmp_path, name, text), "duplicate key 'dropout'|overwrite a value")
    if not name.endswith(".toml"):  # tomllib names the line, not the key
        assert "'dropout'" in msg


def test_duplicate_nested_keys_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "n.yaml", "variant: sparse\nx: {a: 1, a: 2}\n")
    _refused(path, "duplicate key 'a'")
    path = _write(tmp_path, "n.json", '{"variant": "sparse", "x": {"a": 1, "a": 2}}')
    _refused(path, "duplicate key 'a'")


def _deep(suffix: str, depth: int) -> str:
    if suffix == ".json":
        return '{"variant": "dot_product", "x": ' + "[" * depth + "]" * depth + "}"
    if suffix == ".toml":
        return 'variant = "dot_product"\nx = ' + "[" * depth + "]" * depth + "\n"
    return "variant: dot_product\nx: " + "[" * depth + "]" * depth + "\n"


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
@pytest.mark.parametrize("depth", [MAX_CONFIG_DEPTH + 1, 5000, 100_000])
def test_deep_nesting_is_refused(tmp_path: Path, suffix: str, depth: int) -> None:
    path = _write(tmp_path, "deep" + suffix, _deep(suffix, depth))
    _refused(path, "nested deeper than|could not be parsed")


def test_deep_block_yaml_is_refused(tmp_path: Path) -> None:
    text = "variant: dot_product\n" + "".join(" " * i + f"k{i}:\n" for i in range(200))
    _refused(_write(tmp_path, "block.yaml", text), f"nested deeper than {MAX_CONFIG_DEPTH} levels")


def test_nesting_within_the_limit_reaches_the_validator(tmp_path: Path) -> None:
    path = _write(tmp_path, "ok.json", _deep(".json", MAX_CONFIG_DEPTH - 2))
    _refused(path, "unknown field 'x'")  # read fine; the config itself is what is wrong


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_non_utf8_file_is_refused(tmp_path: Path, suffix: str) -> None:
    _refused(_write(tmp_path, "latin1" + suffix, "variant: 'd\xe9j\xe0'\n".encode("latin-1")), "not UTF-8")


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    for name, text in (("bom.json", '{"variant": "dot_product"}'), ("bom.yaml", "variant: dot_product\n")):
        path = _write(tmp_path, name, b"\xef\xbb\xbf" + text.encode())
        assert attnreg.load_config(path) == DotProductConfig()


def test_oversized_file_is_refused_without_parsing(tmp_path: Path) -> None:
    path = _write(tmp_path, "big.yaml", "variant: dot_product\n" + "#" * MAX_CONFIG_BYTES + "\n")
    _refused(path, "limited to")


def test_directory_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    _refused(tmp_path / "dir.yaml", "not a regular file")
    _refused(tmp_path / "missing.json", "cannot read config file")


@pytest.mark.parametrize("name,text", [
    ("huge.json", '{"variant": "dot_product", "dropout": ' + "9" * 5000 + "}"),
    ("huge.yaml", "variant: dot_product\ndropout: " + "9" * 5000 + "\n"),
    ("empty.json", ""),
    ("empty.yaml", ""),
    ("list.yaml", "- 1\n- 2\n"),
    ("two.yaml", "variant: dot_product\n---\nvariant: local\n"),
    ("tag.yaml", "variant: !custom dot_product\n"),
    ("key.yaml", "? [a, b]\n: 1\nvariant: dot_product\n"),
])
def test_other_malformed_files(tmp_path: Path, name: str, text: str) -> None:
    _refused(_write(tmp_path, name, text), ".")


def test_validation_errors_of_a_file_name_the_file_and_field(tmp_path: Path) -> None:
    msg = _refused(_write(tmp_path, "w.yaml", "variant: local\nwindow: yes\n"), "'window' = True")
    assert "true/false is not a number" in msg
    path = _write(tmp_path, "e.toml", "")
    with pytest.raises(ConfigError, match="has no 'variant' key") as info:
        attnreg.load_config(path)
    assert str(path) in str(info.value)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    suffix=st.sampled_from([".yaml", ".json", ".toml"]),
    body=st.one_of(
        st.binary(max_size=200),
        st.text(alphabet=st.sampled_from(list("[]{}:,-&*!<>|'\"\\ \n\tab01.#=?\u00e9")), max_size=200),
    ),
)
def test_any_file_content_is_a_config_or_a_config_error(tmp_path: Path, suffix: str, body) -> None:
    path = tmp_path / ("fuzz" + suffix)
    path.write_bytes(body if isinstance(body, bytes) else ("variant: dot_product\n" + body).encode())
    try:
        cfg = attnreg.load_config(path)
    except ConfigError as err:
        assert str(path) in str(err)
    else:
        assert isinstance(cfg, attnreg.AttentionConfig)
