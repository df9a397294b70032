"""Each built-in's ``check_configs`` really drive the tiny conformance inputs through its fast
path (blocked / chunked / multi-block), so the suite can catch a broken fast path.

The fast-path functions are wrapped with a recorder; a config that fell back to a dense path (or
ran a single chunk / block) at the suite's lengths fails here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import attnreg
import attnreg.plugins.additive.chunked as additive_chunked
import attnreg.plugins.linear.attention as linear_attention
import attnreg.plugins.local._blocked as local_blocked
from attnreg.conformance import run_check
from attnreg.plugins.sparse.attention import SparseAttention

B, H, E = 2, 2, 8
LENGTHS = (13, 131)  # conformance lengths that must reach the fast path (7 is too short for some)


def _record(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str,
            summarise: Callable[[tuple[Any, ...], Any], int]) -> list[int]:
    """Wrap ``owner.name``; each call appends ``summarise(args, result)`` (e.g. a chunk count)."""
    seen: list[int] = []
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        seen.append(summarise(args, result))
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return seen


def _probe(monkeypatch: pytest.MonkeyPatch, variant: str) -> list[int]:
    """Install the recorder of ``variant``'s fast path; entries are its block / chunk counts."""
    if variant == "local":
        return _record(monkeypatch, local_blocked, "_blocked", lambda a, r: -(-a[0].shape[2] // a[5]))
    if variant == "additive":
        return _record(monkeypatch, additive_chunked, "_chunks", lambda a, r: len(r))
    if variant in ("linear", "performer"):
        # linear_attention(q, k, v, fmap, key_allowed, thr, is_causal, chunk, acc, segment):
        # causal chunks, counted only when the segments are also several (two chunks each here).
        return _record(monkeypatch, linear_attention, "linear_attention",
                       lambda a, r: -(-a[0].shape[-2] // a[7])
                       if a[6] and a[0].shape[-2] > (a[9] or 1 << 30) else 0)
    if variant in ("sparse", "bigbird"):
        return _record(monkeypatch, SparseAttention, "_plan", lambda a, r: r.nb)
    raise AssertionError(f"no fast-path probe for {variant!r}")


BUILT_INS = [(name, i) for name in ("local", "additive", "linear", "performer", "sparse", "bigbird")
             for i in range(len(attnreg.get_variant(name).check_configs))]


def test_every_blocked_built_in_declares_check_configs() -> None:
    for name in ("local", "additive", "linear", "performer", "sparse", "bigbird"):
        assert attnreg.get_variant(name).check_configs, f"{name} has no check_configs"


@pytest.mark.parametrize(("variant", "index"), BUILT_INS)
@pytest.mark.parametrize("length", LENGTHS)
def test_check_configs_reach_the_fast_path(monkeypatch: pytest.MonkeyPatch, variant: str, index: int,
                                           length: int) -> None:
    spec = attnreg.get_variant(variant)
    overrides = dict(spec.check_configs[index])
    fields = {k: v for k, v in (("num_heads", H), ("head_dim", E)) if k in spec.config.model_fields}
    module = attnreg.build(variant, **fields, **overrides).double().eval()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, length, E, generator=g, dtype=torch.float64) for _ in range(3))
    seen = _probe(monkeypatch, variant)
    for causal in (False, True) if spec.capabilities.causal else (False,):
        module(q, k, v, is_causal=causal)
    assert seen, f"{variant}{overrides} at L={length}: the fast path was never called"
    assert max(seen) >= 3, f"{variant}{overrides} at L={length}: at most {max(seen)} blocks/chunks"


def test_check_configs_subjects_run_under_the_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_check`` with a check_configs entry builds modules with it (the fast path is reached)."""
    seen = _probe(monkeypatch, "local")
    run_check("local", "forward_matches_weights", overrides=attnreg.get_variant("local").check_configs[0])
    assert seen and max(seen) >= 3
    seen.clear()
    run_check("local", "forward_matches_weights")  # default window=128: dense at every suite length
    assert not seen


def test_invalid_check_configs_name_the_variant() -> None:
    import dataclasses

    spec = attnreg.get_variant("local")
    with pytest.raises(ValueError, match="local.*check_configs\\[0\\].*window"):
        dataclasses.replace(spec, check_configs=({"window": -1},))
    with pytest.raises(ValueError, match="local.*no_such_field"):
        dataclasses.replace(spec, check_configs=({"no_such_field": 1},))


def test_a_broken_fast_path_is_caught_only_under_check_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnreg.conformance import CheckFailure

    original = local_blocked._blocked
    monkeypatch.setattr(local_blocked, "_blocked", lambda *a, **kw: original(*a, **kw) * 1.01)
    run_check("local", "forward_matches_weights")  # default config: dense fallback, blind to it
    with pytest.raises(CheckFailure, match="forward vs attention_weights"):
        run_check("local", "forward_matches_weights", overrides=attnreg.get_variant("local").check_configs[0])
