"""Custom block layouts: the two config forms, their validation, and the layout tensor.

Two fields that cannot be confused (a 2x2 0/1 matrix is also a list of two pairs):

- ``custom_blocks``: ``[[query_block, key_block], ...]`` integer pairs; the largest query block
  fixes ``nb`` and every query block needs at least one pair.
- ``custom_matrix``: ``(nb, nb)`` or ``(H, nb, nb)`` nested lists of ``true``/``false`` or 0/1
  (or a bool tensor from Python); every row needs at least one true.

The former single field ``custom_layout`` is refused with a message that says which field to
write (both when the value reads either way).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "MAX_CUSTOM_BLOCKS",
    "MAX_CUSTOM_HEADS",
    "custom_layout_tensor",
    "layout_digest",
    "legacy_custom_layout_message",
    "parse_custom_blocks",
    "parse_custom_matrix",
]

# A custom layout is held dense, (H|1, nb, nb) bools: 4096 blocks per side is 16 MB per head,
# lengths up to 4096 * block_size tokens (256K at block_size 64). Pairs are expanded into that
# dense form, so without a bound a short list ([[10**9, 0]]) could ask for exabytes.
MAX_CUSTOM_BLOCKS = 4096
MAX_CUSTOM_HEADS = 4096


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_pair(p: object) -> bool:
    return isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(x) for x in p)


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_custom_blocks(value: object) -> list[list[int]]:
    """Validate ``custom_blocks``: a non-empty list of ``[query_block, key_block]`` int pairs.

    Returns the sorted, de-duplicated pairs. Raises ``ValueError`` naming what is wrong.
    """
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            "custom_blocks must be a non-empty list of [query_block, key_block] integer pairs, "
            f"e.g. [[0, 0], [1, 0], [1, 1]]; got {_short(value)}"
        )
    bad = [p for p in value if not _is_pair(p)]
    if bad:
        raise ValueError(
            f"custom_blocks entries must be [query_block, key_block] integer pairs; got {_short(bad[0])} "
            "(for a true/false matrix use custom_matrix)"
        )
    pairs = sorted({(int(q), int(k)) for q, k in value})
    neg = [list(p) for p in pairs if p[0] < 0 or p[1] < 0]
    if neg:
        raise ValueError(f"custom_blocks pairs must be non-negative block indices, got {neg[:5]}")
    nb = 1 + max(q for q, _ in pairs)  # every query block must be present, so the last fixes nb
    if nb > MAX_CUSTOM_BLOCKS:
        raise ValueError(
            f"custom_blocks: query block {nb - 1} gives nb={nb} blocks per side; at most "
            f"{MAX_CUSTOM_BLOCKS} are supported (the layout is held as an (nb, nb) bool matrix)"
        )
    far = [list(p) for p in pairs if p[1] >= nb]
    if far:
        raise ValueError(
            f"custom_blocks pair(s) {far[:5]} have key_block out of range: the query blocks "
            f"0..{nb - 1} give nb={nb} blocks, so key blocks must be in 0..{nb - 1}"
        )
    present = {q for q, _ in pairs}
    if len(present) != nb:
        empty = [i for i in range(nb) if i not in present][:10]
        raise ValueError(
            f"custom_blocks: query block(s) {empty} attend to nothing; every query block "
            f"0..{nb - 1} needs at least one [query_block, key_block] pair"
        )
    return [list(p) for p in pairs]


def _bool_leaves(obj: object, depth: int) -> bool:
    """Whether ``obj`` is nested lists ``depth`` deep whose leaves are bools or the ints 0 / 1."""
    if depth == 0:
        return isinstance(obj, bool) or (_is_int(obj) and obj in (0, 1))
    return isinstance(obj, (list, tuple)) and all(_bool_leaves(x, depth - 1) for x in obj)


def _list_depth(obj: object) -> int:
    d = 0
    while isinstance(obj, (list, tuple)) and obj:
        obj, d = obj[0], d + 1
    return d


def parse_custom_matrix(value: object) -> list:
    """Validate ``custom_matrix``: ``(nb, nb)`` or ``(H, nb, nb)`` of true/false or 0/1, or a bool
    tensor of those shapes.

    Returns the nested bool list. Raises ``ValueError`` naming what is wrong: ragged, not square,
    a row without a true entry, other entries than true/false/0/1.
    """
    if isinstance(value, Tensor):
        if value.dtype != torch.bool:
            raise ValueError(f"custom_matrix tensor must be bool (H, nb, nb) or (nb, nb), got {value.dtype}")
        if value.dim() not in (2, 3):
            raise ValueError(
                f"custom_matrix tensor must be (nb, nb) or (H, nb, nb), got shape {tuple(value.shape)}"
            )
        value = value.detach().cpu().tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            "custom_matrix must be a non-empty (nb, nb) or (H, nb, nb) nested list of true/false "
            f"(or 0/1), or a bool tensor; got {_short(value)}"
        )
    depth = _list_depth(value)
    if depth not in (2, 3):
        raise ValueError(f"custom_matrix must be (nb, nb) or (H, nb, nb), got nesting depth {depth}")
    if not _bool_leaves(value, depth):
        raise ValueError(
            "custom_matrix entries must be true/false or 0/1 in a (nb, nb) or (H, nb, nb) nested "
            f"list (rows of equal length); got {_short(value)}"
        )
    try:
        t = torch.tensor(value, dtype=torch.bool)
    except (ValueError, TypeError) as err:
        raise ValueError(f"custom_matrix is ragged (rows of different lengths): {err}") from None
    if t.shape[-1] != t.shape[-2]:
        raise ValueError(f"custom_matrix must be square (nb, nb) per head, got shape {tuple(t.shape)}")
    if t.shape[-1] > MAX_CUSTOM_BLOCKS or (t.dim() == 3 and t.shape[0] > MAX_CUSTOM_HEADS):
        raise ValueError(
            f"custom_matrix of shape {tuple(t.shape)}: at most {MAX_CUSTOM_HEADS} heads of "
            f"{MAX_CUSTOM_BLOCKS} x {MAX_CUSTOM_BLOCKS} blocks are supported"
        )
    rows = t.any(dim=-1)  # (H|., nb)
    if not bool(rows.all()):
        empty = (~rows).nonzero().tolist()
        raise ValueError(
            f"custom_matrix: row(s) {empty[:10]} (as [head, query_block] or [query_block]) allow no "
            "key block; every query block needs at least one true"
        )
    return t.tolist()


def custom_layout_tensor(blocks: Sequence | None, matrix: Sequence | None) -> Tensor:
    """The ``(H|1, nb, nb)`` bool layout of validated ``custom_blocks`` or ``custom_matrix``."""
    if blocks is not None:
        nb = 1 + max(q for q, _ in blocks)
        layout = torch.zeros(1, nb, nb, dtype=torch.bool)
        index = torch.tensor([list(p) for p in blocks], dtype=torch.long)  # (n, 2)
        layout[0, index[:, 0], index[:, 1]] = True
        return layout
    if matrix is None:
        raise ValueError("a custom layout needs custom_blocks or custom_matrix")
    t = torch.tensor(matrix, dtype=torch.bool)
    return t if t.dim() == 3 else t[None]  # (H|1, nb, nb)


def layout_digest(layout: Tensor) -> str:
    """A short digest of a ``(H|1, nb, nb)`` bool layout: equal layouts (written as pairs or as
    a matrix) give equal digests, so decoding-state fingerprints compare the layout itself."""
    h = hashlib.sha1(repr(tuple(layout.shape)).encode())
    h.update(layout.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def legacy_custom_layout_message(value: object) -> str:
    """The error for the former ``custom_layout`` field: which field to write instead."""
    head = (
        "custom_layout was replaced by two fields that cannot be confused: custom_blocks "
        "([[query_block, key_block], ...] integer pairs) and custom_matrix (an (nb, nb) or "
        "(H, nb, nb) matrix of true/false or 0/1)"
    )
    if isinstance(value, Tensor):
        return f"{head}. Pass the tensor as custom_matrix=..."
    depth = _list_depth(value)
    is_pairs = isinstance(value, (list, tuple)) and bool(value) and all(_is_pair(p) for p in value)
    is_matrix = depth in (2, 3) and _bool_leaves(value, depth) and (
        depth == 3 or all(len(row) == len(value) for row in value)  # type: ignore[arg-type]
    )
    shown = _short(value)
    if is_pairs and is_matrix:  # e.g. [[0, 1], [1, 0]]: two pairs, or a 2x2 matrix
        return (
            f"{head}. {shown} reads both ways: as [query_block, key_block] pairs write "
            f"custom_blocks: {shown}; as a matrix write custom_matrix: {shown}"
        )
    if is_matrix:
        return f"{head}. This value is a matrix: write custom_matrix: {shown}"
    if is_pairs:
        return f"{head}. This value is a list of pairs: write custom_blocks: {shown}"
    return f"{head}. Write one of them instead of custom_layout."
