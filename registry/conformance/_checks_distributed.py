"""Checks of context parallelism (``Capabilities.context_parallel``): ``forward_sharded`` under a
process group equals ``forward`` on one process, or is refused.

The P = 2 ranks run as two threads of this process, each with its own gloo process group over an
in-memory store (``attnreg.distributed.simulate``): no process is started, nothing outlives the
check, and a rank stuck in a collective fails at the groups' timeout instead of hanging the
suite. The multi-process runs (P = 2 and 4 processes) are in the project's tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnreg.core import UnsupportedFeatureError
from attnreg.core.parallel import SequenceLayout, shard_tensor, unshard_tensors

from ._asserts import TOLERANCES, assert_close, sizes_of
from ._framework import EV, LONG, B, E, Subject, check, heads_for
from ._outcomes import CheckFailure, NotApplicable

WORLD = 2
_TIMEOUT_S = 30.0
_LENGTHS = (13, LONG)  # 13 = 3 * 4 + 1 and 131: not multiples of 2P, chunks of unequal length


def _simulate(fn: Any) -> list[Any]:
    from attnreg.distributed import simulate

    return simulate(WORLD, fn, timeout=_TIMEOUT_S)


def _cpu_only(s: Subject) -> None:
    if s.device.type != "cpu":
        raise NotApplicable(f"the simulated ranks use gloo on the CPU; on {s.device.type} run "
                            "forward_sharded under torchrun with NCCL")


def _tol(s: Subject) -> tuple[float, float]:
    return (1e-10, 1e-10) if s.dtype == torch.float64 else TOLERANCES[s.dtype]


def _mask_cases(s: Subject, n: int, b: int) -> list[tuple[str, dict[str, Any]]]:
    cases: list[tuple[str, dict[str, Any]]] = [("no mask", {})]
    if s.caps.key_mask:
        km = s.key_mask(b, n, seed=n, dead_item=1)
        cases.append(("key_mask with a fully padded item", {"key_mask": km}))
    if s.caps.causal:
        cases.append(("is_causal", {"is_causal": True}))
        if s.caps.key_mask:
            km = s.key_mask(b, n, seed=n + 1)
            cases.append(("is_causal + key_mask", {"is_causal": True, "key_mask": km}))
    return cases


def _sharded_run(m: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor, g: Tensor, kw: dict[str, Any]
                 ) -> list[Tensor]:
    """Output and q/k/v gradients of ``forward_sharded`` on WORLD simulated ranks, unsharded."""
    lay = SequenceLayout(q.shape[2], WORLD)

    def rank_fn(rank: int, group: Any) -> list[Tensor]:
        qs, ks, vs = (shard_tensor(t.detach(), lay, rank).requires_grad_(True) for t in (q, k, v))
        kws = dict(kw)
        if "key_mask" in kws:
            kws["key_mask"] = shard_tensor(kws["key_mask"], lay, rank)
        out = m.forward_sharded(qs, ks, vs, group=group, **kws)  # type: ignore[operator]
        (out * shard_tensor(g, lay, rank)).sum().backward()
        return [out.detach(), qs.grad, ks.grad, vs.grad]  # type: ignore[list-item]

    per_rank = _simulate(rank_fn)
    for rank, res in enumerate(per_rank):
        for name, t in zip(("query", "key", "value"), res[1:], strict=True):
            if t is None:
                raise CheckFailure(f"forward_sharded on {WORLD} ranks: no gradient w.r.t. the {name} "
                                   f"shard of rank {rank} ({sizes_of(q, k, v)})")
    return [unshard_tensors([r[i] for r in per_rank], lay) for i in range(4)]


@check("context_parallel_matches", "context_parallel", requires=("context_parallel",))
def context_parallel_matches(s: Subject) -> None:
    """On 2 ranks (threads with gloo groups), ``forward_sharded`` on the layout's shards
    (``SequenceLayout``: 2P chunks, rank r holds chunks r and 2P-1-r) gives the shards of
    ``forward`` on the whole sequence, and its gradients w.r.t. the query, key and value shards
    are the shards of the single-process gradients: lengths 13 (H=2) and 131 (H=1), neither a
    multiple of 2P, with no mask, key_mask (one item fully padded), is_causal and both, where
    declared; key/value with H/2 heads where ``grouped_query`` is declared too (1e-10 in
    float64)."""
    _cpu_only(s)
    m = s.build()
    shapes = [(n, heads_for(n), heads_for(n)) for n in _LENGTHS]
    if s.caps.grouped_query:
        shapes.append((13, 4, 2))
    for n, h, hkv in shapes:
        q = s.randn(B, h, n, E, seed=n)  # (B, H, L, E)
        k = s.randn(B, hkv, n, E, seed=n + 1)  # (B, Hkv, L, E)
        v = s.randn(B, hkv, n, EV, seed=n + 2)  # (B, Hkv, L, Ev)
        g = s.randn(B, h, n, EV, seed=n + 3)  # (B, H, L, Ev) upstream gradient
        s.last_sizes = sz = sizes_of(q, k, v) + (f" Hkv={hkv}" if hkv != h else "")
        for label, kw in _mask_cases(s, n, B):
            qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            want = m(qr, kr, vr, **kw)
            (want * g).sum().backward()
            got = _sharded_run(m, q, k, v, g, kw)
            names = ("output", "gradient w.r.t. query", "gradient w.r.t. key", "gradient w.r.t. value")
            for name, a, b in zip(names, got, (want, qr.grad, kr.grad, vr.grad), strict=True):
                assert_close(a, b, what=f"forward_sharded on {WORLD} ranks: {name} vs one process ({label})",
                             sizes=sz, dtype=s.dtype, tol=_tol(s))


def _outcomes(fn: Any) -> list[BaseException | None]:
    """Each simulated rank's exception from ``fn(rank, group)`` (None if it returned)."""

    def wrapped(rank: int, group: Any) -> BaseException | None:
        try:
            fn(rank, group)
        except Exception as err:  # noqa: BLE001 - the outcome is the finding
            return err
        return None

    return _simulate(wrapped)


def _expect_all(outcomes: list[BaseException | None], exc: type[BaseException], what: str) -> None:
    for rank, err in enumerate(outcomes):
        if err is None:
            raise CheckFailure(f"{what}: rank {rank} expected {exc.__name__}, but the call succeeded")
        if not isinstance(err, exc):
            raise CheckFailure(f"{what}: rank {rank} expected {exc.__name__}, "
                               f"got {type(err).__name__}: {err}")


@check("context_parallel_errors", "errors", requires=("context_parallel",))
def context_parallel_errors(s: Subject) -> None:
    """On 2 simulated ranks, every rank raises (none is left waiting in a collective): ``attn_mask``
    under a process group -> ``UnsupportedFeatureError``; shards that do not follow the layout (a
    rank holding one position too few) and ranks that disagree on ``is_causal`` (where declared)
    -> ``ValueError``."""
    _cpu_only(s)
    m = s.build()
    n = 13
    q, k, v = s.inputs(lq=n)
    lay = SequenceLayout(n, WORLD)

    def shards(rank: int) -> list[Tensor]:
        return [shard_tensor(t, lay, rank) for t in (q, k, v)]

    am = torch.ones(n, n, dtype=torch.bool, device=s.device)
    _expect_all(_outcomes(lambda r, grp: m.forward_sharded(*shards(r), group=grp, attn_mask=am)),
                UnsupportedFeatureError, "forward_sharded with attn_mask")

    def short(r: int, grp: Any) -> Tensor:
        a, b, c = shards(r)
        if r == 1:
            a, b, c = (t[:, :, :-1] for t in (a, b, c))
        return m.forward_sharded(a, b, c, group=grp)

    _expect_all(_outcomes(short), ValueError, "forward_sharded with rank 1's shards one position short")
    if s.caps.causal:
        _expect_all(_outcomes(lambda r, grp: m.forward_sharded(*shards(r), group=grp, is_causal=r == 0)),
                    ValueError, "forward_sharded with is_causal=True on rank 0 only")


@check("context_parallel_refused", "manifest")
def context_parallel_refused(s: Subject) -> None:
    """With ``context_parallel=False`` declared, ``forward_sharded`` raises
    ``UnsupportedFeatureError`` on every rank of a 2-rank (simulated) process group: a variant
    never runs on a shard as if it were the whole sequence."""
    if s.caps.context_parallel:
        raise NotApplicable("declares context_parallel=True (context_parallel_matches applies)")
    _cpu_only(s)
    m = s.build()
    q, k, v = s.inputs(lq=13)
    lay = SequenceLayout(13, WORLD)
    _expect_all(_outcomes(lambda r, grp: m.forward_sharded(*(shard_tensor(t, lay, r) for t in (q, k, v)),
                                                          group=grp)),
                UnsupportedFeatureError, "forward_sharded with context_parallel=False declared")
