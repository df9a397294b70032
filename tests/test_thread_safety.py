"""Thread safety of every registered variant: one module shared by 8 threads.

A model serving several requests calls one attention module from many threads at once. Modules
keep derived data in caches (sparse layouts, plans and row tables; local's band masks, per module
and process-wide; linear's FAVOR+ projections, process-wide), all ``attnreg.core.LRUCache``. Each
thread here runs more shapes than any cache holds (and every cache is shrunk to 2 entries), in
its own order, so entries are evicted while other threads read them; every output must equal
the single-thread run bit for bit. Parametrized over the registry (every config of
``check_configs`` too): a new plugin is probed for free.
"""

from __future__ import annotations

import random
import sys
import threading
from typing import Any

import pytest
import torch
from threads import start_and_join

import attnreg
from attnreg.core import Attention, LRUCache

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-exact comparisons across threads

THREADS = 8
LENGTHS = list(range(1, 41))  # 40 shapes: more than any cache holds (sparse 16, local 32, FAVOR+ 8)
DECODE_LENGTHS = list(range(3, 23))  # 20 max_lengths (sparse decoding reads the layout of each)
HEAD_DIMS = (2, 3, 4, 5, 6, 7, 8, 9, 10, 11)  # 10 head dims: FAVOR+ projections are keyed by E


def _subjects() -> list[Any]:
    out = []
    for name in attnreg.list_variants():
        spec = attnreg.get_variant(name)
        for overrides in ({}, *spec.check_configs):
            label = ",".join(f"{k}={v}" for k, v in overrides.items())
            out.append(pytest.param(name, overrides, id=f"{name}[{label}]" if label else name))
    return out


def _build(name: str, overrides: dict[str, Any], heads: int, head_dim: int) -> Attention:
    fields = attnreg.get_variant(name).config.model_fields
    sized = {k: v for k, v in (("num_heads", heads), ("head_dim", head_dim)) if k in fields}
    torch.manual_seed(0)
    return attnreg.build(name, **sized, **overrides).double().eval()


def _shrink_caches(attn: Attention, monkeypatch: pytest.MonkeyPatch) -> int:
    """Every ``LRUCache`` of the module and of its plugin's package held to 2 entries, so that
    every call evicts; returns how many there are."""
    package = type(attn).__module__.rsplit(".", 1)[0]
    owners = [m for n, m in list(sys.modules.items()) if n == package or n.startswith(package + ".")]
    owners += list(attn.modules())
    caches = {id(v): v for o in owners for v in vars(o).values() if isinstance(v, LRUCache)}
    for cache in caches.values():
        monkeypatch.setattr(cache, "entries", 2)
    return len(caches)


def _run_everywhere(cases: list[Any], run: Any) -> None:
    """``run(case)`` for every case on one thread, then on 8 threads at once (each its own order):
    the same results, no exception."""
    want = [run(c) for c in cases]
    errors: list[BaseException] = []
    mismatches: list[str] = []
    barrier = threading.Barrier(THREADS)

    def work(seed: int) -> None:
        order = list(range(len(cases)))
        random.Random(seed).shuffle(order)
        barrier.wait()
        try:
            for i in order:
                got = run(cases[i])
                if not all(torch.equal(a, b) for a, b in zip(got, want[i], strict=True)):
                    mismatches.append(f"case {i} on thread {seed}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    start_and_join([threading.Thread(target=work, args=(s,)) for s in range(THREADS)])
    assert not errors, errors
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize(("name", "overrides"), _subjects())
def test_one_module_shared_by_threads_forward(name: str, overrides: dict[str, Any],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    caps = attnreg.get_variant(name).capabilities
    fixed_e = "head_dim" in attnreg.get_variant(name).config.model_fields
    attn = _build(name, overrides, 2, 4)
    _shrink_caches(attn, monkeypatch)
    cases = []
    for i, length in enumerate(LENGTHS):
        e = 4 if fixed_e else HEAD_DIMS[i % len(HEAD_DIMS)]
        g = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(2, 2, length, e, generator=g, dtype=torch.float64) for _ in range(3))
        key_mask = None
        if caps.key_mask and i % 3 == 1 and length > 1:
            key_mask = torch.ones(2, length, dtype=torch.bool)
            key_mask[1, : (i % length) or 1] = False  # left padding in the second row
        cases.append((q, k, v, key_mask, caps.causal and i % 2 == 0, i % 4 == 3))

    def run(case: Any) -> tuple[torch.Tensor, ...]:
        q, k, v, key_mask, causal, grad = case
        with torch.set_grad_enabled(grad):  # autograd on: the paths that keep no scratch
            q = q.detach().requires_grad_(grad)
            out = attn(q, k, v, key_mask=key_mask, is_causal=causal)
        return (out.detach(),)

    _run_everywhere(cases, run)


@pytest.mark.parametrize(("name", "overrides"), [
    p for p in _subjects() if attnreg.get_variant(p.values[0]).capabilities.decoding
])
def test_one_module_shared_by_threads_decode(name: str, overrides: dict[str, Any],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    attn = _build(name, overrides, 2, 4)
    _shrink_caches(attn, monkeypatch)
    cases = []
    for i, length in enumerate(DECODE_LENGTHS):
        g = torch.Generator().manual_seed(100 + i)
        cases.append(tuple(torch.randn(1, 2, length, 4, generator=g, dtype=torch.float64) for _ in range(3)))

    def run(case: Any) -> tuple[torch.Tensor, ...]:
        q, k, v = case
        length = q.shape[2]
        state = attn.init_state(1, 2, 4, dtype=torch.float64, max_length=length)
        outs = []
        with torch.no_grad():
            for start in range(0, length, 4):  # prefill-sized and single-token calls alike
                sl = slice(start, start + 4)
                out, state = attn.decode(q[:, :, sl], k[:, :, sl], v[:, :, sl], state)
                outs.append(out)
        return (torch.cat(outs, dim=2),)

    _run_everywhere(cases, run)


@pytest.mark.parametrize(("name", "count"), [("sparse", 3), ("local", 2), ("performer", 1)])
def test_the_caches_are_found(name: str, count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sparse's per-module layouts/plans/tables, local's shared and per-module band masks and
    the FAVOR+ projections are all shrunk above (a cache written another way would not be)."""
    assert _shrink_caches(_build(name, {}, 2, 4), monkeypatch) == count


def test_lru_cache_under_contention() -> None:
    """The shared helper itself: 8 threads hammering 4 entries over 50 keys, byte-bounded."""
    cache: LRUCache[torch.Tensor] = LRUCache(4, 4 * 8 * 3, lambda t: t.numel() * t.element_size())
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        try:
            for _ in range(2000):
                key = rng.randrange(50)
                got = cache.get_or_build(key, lambda k=key: torch.full((4,), float(k), dtype=torch.float64))
                assert got[0].item() == key
                assert len(cache) <= 4 and cache.nbytes <= 4 * 8 * 3
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    start_and_join([threading.Thread(target=work, args=(s,)) for s in range(THREADS)])
    assert not errors, errors
    assert len(cache) <= 3 and cache.nbytes == sum(t.numel() * 8 for t in cache.values())
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
