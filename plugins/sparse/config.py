"""Configs of ``sparse`` (default layout ``fixed``) and ``bigbird`` (default layout ``bigbird``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from attnreg.core import AttentionConfig

from .custom import legacy_custom_layout_message, parse_custom_blocks, parse_custom_matrix

__all__ = ["SparseConfig", "BigBirdConfig", "LayoutName"]

LayoutName = Literal["bigbird", "strided", "fixed", "custom"]

# A custom matrix as the config stores it: (nb, nb) or (H, nb, nb) nested bools.
CustomMatrix = list[list[bool]] | list[list[list[bool]]]


class SparseConfig(AttentionConfig):
    """Config of ``sparse``: exact softmax attention restricted to a block layout.

    Every size is in blocks of ``block_size`` tokens. Fields of layouts other than the selected
    one are ignored (they keep their defaults in dumps, so switching ``layout`` is one edit).
    """

    variant: Literal["sparse"] = Field("sparse", description="Variant name.")
    layout: LayoutName = Field(
        "fixed",
        description="Block layout: 'bigbird' (window + global + random blocks), 'strided' or "
        "'fixed' (Child et al. 2019), or 'custom' (custom_blocks or custom_matrix).",
    )
    block_size: int = Field(64, ge=1, le=4096, description="Tokens per block.")
    num_window_blocks: int = Field(
        3, ge=1, le=1023,
        description="bigbird: odd width of the sliding window, in blocks, centred on the query block.",
    )
    num_global_blocks: int = Field(
        2, ge=0, le=1024,
        description="bigbird: the first blocks that attend to and are attended by every block.",
    )
    num_random_blocks: int = Field(
        3, ge=0, le=1024,
        description="bigbird: extra random key blocks per query block (outside its window/global blocks).",
    )
    seed: int = Field(
        0, ge=0, le=2**62,
        description="bigbird: seed of the random blocks (drawn per head and length, never from "
        "the global RNG).",
    )
    stride: int | None = Field(
        None, ge=1, le=1 << 20,
        description="strided/fixed: Child et al.'s stride l, in blocks; None = ceil(sqrt(number of blocks)).",
    )
    c: int = Field(
        1, ge=1, le=1 << 20,
        description="fixed: Child et al.'s c, the last c blocks of every stride-l chunk are summary "
        "blocks every query attends to (c <= l).",
    )
    custom_blocks: list[list[int]] | None = Field(
        None,
        description="custom: the active blocks as [[query_block, key_block], ...] integer pairs; the "
        "largest query block fixes nb (at most 4096) and every query block needs a pair. Used for "
        "lengths L with ceil(L / block_size) == nb.",
    )
    custom_matrix: CustomMatrix | None = Field(
        None,
        description="custom: the layout as an (nb, nb) or (H, nb, nb) matrix of true/false or 0/1 "
        "(or a bool tensor), nb <= 4096; every row needs a true. Used for lengths L with "
        "ceil(L / block_size) == nb.",
    )
    num_heads: int | None = Field(
        None, ge=1, le=4096,
        description="Heads the layout is built for (checked against the inputs); None = any. "
        "Only needed for pattern_mask() of per-head layouts without an explicit num_heads.",
    )

    @model_validator(mode="before")
    @classmethod
    def _former_custom_layout(cls, data: Any) -> Any:
        if isinstance(data, dict) and "custom_layout" in data:
            raise ValueError(legacy_custom_layout_message(data["custom_layout"]))
        return data

    @field_validator("custom_blocks", mode="before")
    @classmethod
    def _parse_blocks(cls, value: Any) -> Any:
        return None if value is None else parse_custom_blocks(value)  # ValueError names the problem

    @field_validator("custom_matrix", mode="before")
    @classmethod
    def _parse_matrix(cls, value: Any) -> Any:
        return None if value is None else parse_custom_matrix(value)

    @model_validator(mode="after")
    def _check_layout_fields(self) -> SparseConfig:
        if self.num_window_blocks % 2 == 0:
            raise ValueError(
                f"num_window_blocks={self.num_window_blocks} must be odd (a window centred on the "
                "query block: 1, 3, 5, ...)"
            )
        given = [f for f in ("custom_blocks", "custom_matrix") if getattr(self, f) is not None]
        if self.layout == "custom" and not given:
            raise ValueError(
                "layout='custom' needs custom_blocks ([[query_block, key_block], ...] pairs) or "
                "custom_matrix (a true/false matrix)"
            )
        if len(given) == 2:
            raise ValueError("custom_blocks and custom_matrix are both given; give one of them")
        if self.layout != "custom" and given:
            raise ValueError(f"{given[0]} is given but layout={self.layout!r}; set layout='custom'")
        if self.layout == "fixed" and self.stride is not None and self.c > self.stride:
            raise ValueError(f"fixed layout: c={self.c} must be <= stride={self.stride} (c <= l)")
        if self.custom_matrix is not None and self.num_heads is not None:
            heads = _matrix_heads(self.custom_matrix)
            if heads is not None and heads != self.num_heads:
                raise ValueError(
                    f"custom_matrix has {heads} heads but num_heads={self.num_heads}"
                )
        return self


def _matrix_heads(layout: list) -> int | None:
    """Head count of a (H, nb, nb) bool layout; None for (nb, nb) layouts."""
    first = layout[0]
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple)):
        return len(layout)
    return None


class BigBirdConfig(SparseConfig):
    """Config of ``bigbird``: ``sparse`` whose layout defaults to ``bigbird``."""

    variant: Literal["bigbird"] = Field("bigbird", description="Variant name.")  # type: ignore[assignment]
    layout: LayoutName = Field(
        "bigbird",
        description="Block layout; defaults to 'bigbird' (see the 'sparse' variant for the others).",
    )
