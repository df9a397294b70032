"""Input validation and mask canonicalisation, shared by every variant.

``check_inputs`` turns the SDPA-style arguments into a ``Masks`` object once, so that a variant
never re-implements shape checks or mask semantics. Conventions (SDPA's):

- bool ``attn_mask``: True = may attend; broadcastable to ``(B, H, Lq, Lk)``.
- float ``attn_mask``: added to the logits (``-inf`` masks).
- ``key_mask (B, Lk)``: True = real token.
- ``is_causal``: query i sees keys j <= i (upper-left aligned when Lq != Lk), or, with
  ``causal_alignment="lower_right"``, keys j <= i + (Lk - Lq): the queries are the last Lq
  positions of the keys' sequence (a KV cache, a chunked prefill). ``Masks.q_offset`` carries
  that shift; every mask helper here honours it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .capabilities import Capabilities
from .errors import UnsupportedFeatureError
from .host import known

__all__ = [
    "CausalAlignment", "Masks", "and_attn_mask", "causal_mask", "causal_offset", "check_inputs",
    "sdpa_safe_mask",
]

CausalAlignment = Literal["upper_left", "lower_right"]
CausalAlignment.__doc__ = """Where the queries sit in the keys' sequence under ``is_causal``:
``"upper_left"`` (query i sees keys j <= i) or ``"lower_right"`` (the queries are the last Lq
positions: query i sees keys j <= i + Lk - Lq)."""
_ALIGNMENTS = ("upper_left", "lower_right")


def causal_mask(
    q_len: int, k_len: int, device: torch.device | str | None = None, offset: int = 0
) -> Tensor:
    """Causal mask ``(Lq, Lk)``: True where key j <= query i + ``offset``.

    ``offset=0`` is SDPA's upper-left alignment; ``offset=Lk-Lq`` puts the queries at the last
    Lq positions of the keys' sequence (lower-right, the decoding case).
    """
    rows = torch.arange(q_len, device=device)[:, None] + offset  # (Lq, 1) key position of query i
    cols = torch.arange(k_len, device=device)[None, :]  # (1, Lk)
    return cols <= rows  # (Lq, Lk)


@dataclass(frozen=True)
class Masks:
    """Validated masks of one call. ``attn_mask`` is 4-D (size-1 dims where broadcast)."""

    batch: int
    heads: int
    q_len: int
    k_len: int
    attn_mask: Tensor | None = None  # (B|1, H|1, Lq|1, Lk|1), bool or float
    key_mask: Tensor | None = None  # (B, Lk) bool
    is_causal: bool = False
    # Key position of query 0: under is_causal query i sees keys j <= i + q_offset. 0 unless
    # causal_alignment="lower_right" with Lq != Lk (then Lk - Lq).
    q_offset: int = 0
    # Keys/values at padded positions (key_mask False) are known to be zero: decoding states
    # write them so, and variants then need not screen them for NaN/inf (see core/nonfinite.py).
    padding_zeroed: bool = False

    @property
    def any(self) -> bool:
        """Whether any mask is in force."""
        return self.attn_mask is not None or self.key_mask is not None or self.is_causal

    @property
    def float_mask(self) -> Tensor | None:
        """The additive float mask, if one was given."""
        m = self.attn_mask
        return m if m is not None and m.is_floating_point() else None

    def allowed(self, device: torch.device | str | None = None) -> Tensor | None:
        """Dense bool mask (B|1, H|1, Lq, Lk) of every mask ANDed, None when nothing is masked.

        A float mask counts as masking where it is ``-inf``.
        """
        out: Tensor | None = None
        if self.attn_mask is not None:
            m = self.attn_mask
            out = m if m.dtype == torch.bool else m != float("-inf")  # (B|1, H|1, Lq|1, Lk|1)
            device = m.device
        if self.key_mask is not None:
            km = self.key_mask[:, None, None, :]  # (B, 1, 1, Lk)
            out = km if out is None else out & km
            device = km.device
        if self.is_causal:
            cm = causal_mask(self.q_len, self.k_len, device, self.q_offset)[None, None]  # (1, 1, Lq, Lk)
            out = cm if out is None else out & cm
        if out is None:
            return None
        shape = (out.shape[0], out.shape[1], self.q_len, self.k_len)
        return out.expand(shape)


def sdpa_safe_mask(
    allowed: Tensor | None, bias: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor | None, Tensor | None]:
    """One mask for ``F.scaled_dot_product_attention`` and the rows with nothing to attend.

    SDPA's result on an empty row differs across versions and kernels (NaN or 0, NaN gradients):
    such rows are opened fully here, and the caller zeroes their output with
    ``out.masked_fill(dead, 0)``, which also zeroes every gradient through them.

    Args:
        allowed: bool (..., Lq, Lk), True = may attend; None = nothing masked.
        bias: optional additive float mask broadcastable to ``allowed``.
        dtype: the query dtype (SDPA wants a float mask in it).

    Returns:
        (mask: bool, or float when ``bias`` is given; dead: (..., Lq, 1) bool or None).
    """
    if allowed is None:
        return (None if bias is None else bias.to(dtype)), None
    dead = ~allowed.any(dim=-1, keepdim=True)  # (..., Lq, 1)
    # On meta there are no values to test: keep the row-opening mask (same shapes either way).
    has_dead = known(dead.any(), on_meta=True)
    if bias is None:
        return (allowed | dead if has_dead else allowed), (dead if has_dead else None)
    mask = bias.to(dtype).masked_fill(~allowed, float("-inf"))  # (..., Lq, Lk)
    return (mask.masked_fill(dead, 0.0) if has_dead else mask), (dead if has_dead else None)


def and_attn_mask(allowed: Tensor | None, attn_mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """AND (a piece of) an ``attn_mask`` into a bool ``allowed`` pattern (None = all allowed).

    A bool mask is ANDed in; a float mask counts as masked where it is ``-inf`` (so that rows
    it leaves empty are still detected) and is also returned as the additive bias.

    Returns:
        (allowed, bias): bool broadcast of both inputs; the float mask, or None for a bool one.
    """
    if attn_mask.dtype == torch.bool:
        return (attn_mask if allowed is None else allowed & attn_mask), None
    finite = attn_mask != float("-inf")
    return (finite if allowed is None else allowed & finite), attn_mask


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, H, L, E), got shape {_shape(t)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    return t


def check_inputs(
    variant: str,
    caps: Capabilities,
    query: Tensor,
    key: Tensor,
    value: Tensor | None,
    attn_mask: Tensor | None,
    key_mask: Tensor | None,
    is_causal: bool,
    causal_alignment: CausalAlignment = "upper_left",
) -> Masks:
    """Validate SDPA-style arguments against the interface and ``caps``; return the masks.

    Raises ``ValueError`` (naming the argument and the shapes seen) for malformed input and
    ``UnsupportedFeatureError`` for a feature the variant declares unsupported.

    Key/value may have fewer heads than the query (grouped-query attention: H a multiple of
    Hkv) where ``caps.grouped_query``; ``Masks.heads`` is then the query's H.
    """
    q = _check_tensor("query", query)
    k = _check_tensor("key", key)
    b, h, lq, e = q.shape
    hk = k.shape[1]
    grouped = hk != h and hk > 0 and h % hk == 0
    if k.shape[0] != b or k.shape[3] != e or (hk != h and not grouped):
        raise ValueError(
            f"key shape {_shape(k)} does not match query shape {_shape(q)}: "
            "expected (B, H, Lk, E) with the same B, H and E as query "
            "(or, for grouped-query attention, H a multiple of key heads)"
        )
    if grouped and not caps.grouped_query:
        raise UnsupportedFeatureError(
            variant, "grouped-query attention",
            f"query has {h} heads, key {hk}; repeat key/value to {h} heads "
            "(attnreg.MultiHeadAttention does this for you)",
        )
    lk = k.shape[2]
    if lq == 0 or lk == 0 or e == 0:
        raise ValueError(f"query {_shape(q)} and key {_shape(k)} must have non-zero lengths and E")
    tensors = {"query": q, "key": k}
    if value is not None:
        v = _check_tensor("value", value)
        if v.shape[0] != b or v.shape[1] != hk or v.shape[2] != lk:
            raise ValueError(
                f"value shape {_shape(v)} does not match key shape {_shape(k)}: "
                "expected (B, Hkv, Lk, Ev) with the same B, heads and Lk as key"
            )
        tensors["value"] = v
    for name, t in tensors.items():
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from query dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but query is on {q.device}")
    if q.dtype not in caps.dtypes:
        raise UnsupportedFeatureError(variant, f"dtype {q.dtype}", f"supported: {caps.dtypes}")
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
    if causal_alignment not in _ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {_ALIGNMENTS}, got {causal_alignment!r}")
    if is_causal and not caps.causal:
        raise UnsupportedFeatureError(variant, "is_causal=True")
    offset = causal_offset(variant, caps, lq, lk, is_causal, causal_alignment)
    masks = Masks(b, h, lq, lk, is_causal=is_causal, q_offset=offset)
    if key_mask is not None:
        if not caps.key_mask:
            raise UnsupportedFeatureError(variant, "key_mask")
        if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
            got = key_mask.dtype if isinstance(key_mask, Tensor) else type(key_mask).__name__
            raise ValueError(f"key_mask must be a bool tensor (B, Lk) = ({b}, {lk}), got {got}")
        if tuple(key_mask.shape) != (b, lk):
            raise ValueError(
                f"key_mask shape {_shape(key_mask)} does not match (B, Lk) = ({b}, {lk})"
            )
        if key_mask.device != q.device:
            raise ValueError(f"key_mask is on {key_mask.device} but query is on {q.device}")
        masks = Masks(b, h, lq, lk, key_mask=key_mask, is_causal=is_causal, q_offset=offset)
    if attn_mask is not None:
        m = _check_attn_mask(variant, caps, attn_mask, q, (b, h, lq, lk))
        masks = Masks(b, h, lq, lk, attn_mask=m, key_mask=masks.key_mask, is_causal=is_causal,
                      q_offset=offset)
    return masks


def causal_offset(
    variant: str, caps: Capabilities, lq: int, lk: int, is_causal: bool, alignment: str
) -> int:
    """``Masks.q_offset`` of a call, after rejecting what the variant cannot do.

    A variant without cross attention attends within one sequence: Lq != Lk is then only
    meaningful as "the queries are the last Lq positions" (lower-right causal), which is what
    decoding-capable variants implement.
    """
    if not is_causal and alignment != "upper_left":
        raise ValueError("causal_alignment='lower_right' needs is_causal=True")
    if lq == lk:
        return 0  # both alignments coincide
    lower_right = is_causal and alignment == "lower_right"
    if lower_right and not caps.decoding:
        raise UnsupportedFeatureError(
            variant, "causal_alignment='lower_right' with Lq != Lk",
            f"query length {lq}, key length {lk}; only variants declaring decoding=True do",
        )
    if not caps.cross_attention:
        if not lower_right:
            raise UnsupportedFeatureError(
                variant, "cross attention (keys from another sequence)",
                f"query length {lq} != key length {lk}. If the queries are the last {lq} "
                f"positions of the keys' sequence (a KV cache, chunked prefill), pass "
                "is_causal=True, causal_alignment='lower_right', or use attn.decode()",
            )
        if lq > lk:
            raise ValueError(
                f"causal_alignment='lower_right' puts the {lq} queries at the last positions of the "
                f"{lk} keys' sequence: query length must be <= key length for '{variant}'"
            )
    return lk - lq if lower_right else 0


def _check_attn_mask(
    variant: str, caps: Capabilities, m: object, q: Tensor, full: tuple[int, int, int, int]
) -> Tensor:
    if not isinstance(m, Tensor):
        raise ValueError(f"attn_mask must be a torch.Tensor, got {type(m).__name__}")
    if m.dtype != torch.bool and not m.is_floating_point():
        raise ValueError(
            f"attn_mask must be bool (True = may attend) or a float additive mask, got {m.dtype}"
        )
    if not caps.attn_mask:
        raise UnsupportedFeatureError(variant, "attn_mask", "use key_mask / is_causal if declared")
    if m.is_floating_point():
        if not caps.float_mask:
            raise UnsupportedFeatureError(variant, "a float (additive) attn_mask")
        if m.dtype != q.dtype:
            raise ValueError(f"float attn_mask dtype {m.dtype} must match query dtype {q.dtype}")
    if m.device != q.device:
        raise ValueError(f"attn_mask is on {m.device} but query is on {q.device}")
    if not 1 <= m.dim() <= 4 or any(s not in (1, f) for s, f in zip(m.shape[::-1], full[::-1], strict=False)):
        raise ValueError(
            f"attn_mask shape {_shape(m)} is not broadcastable to (B, H, Lq, Lk) = {full}"
        )
    return m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))  # (B|1, H|1, Lq|1, Lk|1)
