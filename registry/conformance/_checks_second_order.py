"""Second-order gradients (``Capabilities.double_backward``), verified both ways."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call

from attnreg.core import UnsupportedFeatureError

from ._asserts import assert_close, expect_raises, sizes_of
from ._framework import Subject, check
from ._outcomes import CheckFailure, NotApplicable

# Tiny float64 sizes: gradgradcheck builds full second-order Jacobians.
_L, _E, _EV = 5, 3, 2


def _cases(s: Subject) -> list[tuple[str, dict[str, Any], int]]:
    """(label, call kwargs, key length) for no mask, each declared mask kind, their combination,
    and the declared alignments with Lq != Lk (query length 5)."""
    caps = s.caps
    hole = torch.tensor([[True, False, True, True, True]], device=s.device)  # (1, Lk)
    out: list[tuple[str, dict[str, Any], int]] = [("no mask", {}, _L)]
    if caps.key_mask:
        out.append(("key_mask", {"key_mask": hole}, _L))
    if caps.causal:
        out.append(("is_causal", {"is_causal": True}, _L))
    if caps.attn_mask:
        out.append(("bool attn_mask", {"attn_mask": s.bool_mask(_L, _L, seed=5)}, _L))
    if caps.float_mask:
        out.append(("float attn_mask", {"attn_mask": s.randn(_L, _L, seed=6)}, _L))
    if caps.causal and caps.key_mask:
        out.append(("is_causal + key_mask", {"is_causal": True, "key_mask": hole}, _L))
    if caps.cross_attention:
        out.append(("Lq=5, Lk=7", {}, 7))
    if caps.decoding:
        out.append(("lower_right, Lq=5, Lk=7", {"is_causal": True, "causal_alignment": "lower_right"}, 7))
    return out


def _gradgradcheck(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], what: str,
                   fast: bool = False) -> None:
    try:
        torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=fast)
    except Exception as err:  # noqa: BLE001 - gradgradcheck raises GradcheckError / RuntimeError
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""  # not the Jacobians
        raise CheckFailure(f"gradgradcheck of {what} failed: {type(err).__name__}: {first}") from None


def _decode_all(m: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """init_state + decode in calls of 2, 1 and 2 positions: (B, H, L, Ev)."""
    state = m.init_state(q.shape[0], k.shape[1], q.shape[-1], v.shape[-1], dtype=q.dtype,
                         device=q.device, max_length=q.shape[2])
    outs = []
    for a, z in ((0, 2), (2, 3), (3, q.shape[2])):
        out, state = m.decode(q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], state)
        outs.append(out)
    return torch.cat(outs, dim=2)


@check("double_backward", "gradients")
def double_backward(s: Subject) -> None:
    """``double_backward`` verified both ways. True: ``torch.autograd.gradgradcheck`` in float64
    on tiny sizes (B=1, H=1, Lq=5, E=3, Ev=2) for query, key and value with no mask, every
    declared mask kind (a padded key, causal, bool and float ``attn_mask``, causal + padding),
    Lq != Lk (cross attention) and lower-right alignment (decoding), through ``init_state`` +
    ``decode`` (calls of 2, 1 and 2 positions) where declared, and for learnable variants for
    the parameters; every Jacobian entry without masks, random projections (fast mode)
    otherwise. False: a gradient taken with ``create_graph=True`` equals the plain one and
    requires grad (a gradient penalty is never silently dropped), and differentiating it again
    raises ``UnsupportedFeatureError``."""
    if s.caps.double_backward and s.ref_dtype != torch.float64:
        raise NotApplicable("float64 is not a declared dtype (gradgradcheck needs it)")
    m = s.build(heads=1, head_dim=_E)
    if not s.caps.double_backward:
        _refuses(s, m)
        return
    for i, (label, kw, lk) in enumerate(_cases(s)):
        q, k, v = s.inputs(1, 1, _L, lk, e=_E, ev=_EV, seed=17 + lk, grad=True)
        what = f"query, key, value ({sizes_of(q, k, v)}, {label})"
        # Every Jacobian entry once (no mask), random projections for the rest (fast mode).
        _gradgradcheck(lambda q, k, v, kw=kw: m(q, k, v, **kw), (q, k, v), what, fast=i > 0)
        params = {n: p.detach().clone().requires_grad_(True) for n, p in m.named_parameters()}
        if params:
            names = list(params)

            def by_params(*ps: torch.Tensor, kw: dict[str, Any] = kw, q: torch.Tensor = q,
                          k: torch.Tensor = k, v: torch.Tensor = v, names: list[str] = names
                          ) -> torch.Tensor:
                inputs = (q.detach(), k.detach(), v.detach())
                return functional_call(m, dict(zip(names, ps, strict=True)), inputs, kw)

            _gradgradcheck(by_params, tuple(params.values()), f"parameters {names} ({label})", fast=True)
    if s.caps.decoding:
        q, k, v = s.inputs(1, 1, _L, e=_E, ev=_EV, seed=29, grad=True)
        _gradgradcheck(lambda q, k, v: _decode_all(m, q, k, v), (q, k, v),
                       f"init_state + decode ({sizes_of(q, k, v)})", fast=True)


def _refuses(s: Subject, m: Any) -> None:
    q, k, v = s.inputs(1, 1, _L, e=_E, ev=_EV, seed=17, grad=True)
    kw = {"is_causal": True} if s.caps.causal else {}
    sz = sizes_of(q, k, v)
    probe = s.randn(1, 1, _L, _EV, seed=3)
    plain = torch.autograd.grad((m(q, k, v, **kw) * probe).sum(), (q, k, v))
    try:
        graph = torch.autograd.grad((m(q, k, v, **kw) * probe).sum(), (q, k, v), create_graph=True)
    except UnsupportedFeatureError:
        return  # refusing create_graph itself is clear too
    for name, a, b in zip(("query", "key", "value"), graph, plain, strict=True):
        assert_close(a, b, what=f"gradient w.r.t. {name} taken with create_graph=True vs without",
                     sizes=sz, dtype=s.dtype)
        if not a.requires_grad:
            raise CheckFailure(f"double_backward=False, but the gradient w.r.t. {name} taken with "
                               f"create_graph=True does not require grad ({sz}): a gradient penalty "
                               "on it would silently be 0")
    expect_raises(UnsupportedFeatureError,
                  lambda: torch.autograd.grad(sum(g.square().sum() for g in graph), (q, k, v)),
                  what=f"differentiating a gradient taken with create_graph=True ({sz})",
                  names=("second-order",))
