"""The typed config base model every variant's config subclasses."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["SCALE_MAX", "AttentionConfig"]

# The largest logit ``scale``: float16's largest value. A larger scale is inf in float16 and
# overflows float32/bfloat16 logits (or their recomputation in SDPA's backward) into NaN on
# ordinary inputs: the failure ``inf`` itself is refused for.
SCALE_MAX = 65504.0


class AttentionConfig(BaseModel):
    """Base of every variant config: frozen, strict, unknown fields rejected.

    Subclasses narrow ``variant`` to ``Literal["<name>"]`` (the discriminator of config files)
    and add their own bounded, documented fields: every int field needs an upper bound (what
    torch can index, or a documented practical bound), every float field is finite.

    Values are not coerced (``strict``): ``True`` is not ``1``, ``"3"`` is not ``3`` and ``3.0``
    is not ``3`` (an int is accepted where a float is expected). A config file that says
    ``window: yes`` gets an error, not a window of 1. ``inf`` and ``nan`` are refused in every
    float field (``allow_inf_nan=False``), and ``scale`` above ``SCALE_MAX`` even where a
    subclass redeclares the field without that bound.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    variant: str = Field(description="Name of the attention variant.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout probability on the attention weights, applied only in train() mode.",
    )
    scale: float | None = Field(
        None, gt=0.0, le=SCALE_MAX,
        description="Multiplier of the logits, 0 < scale <= 65504; None means 1/sqrt(E) "
                    "(E = query head dim).",
    )

    @field_validator("scale")
    @classmethod
    def _scale_bounded(cls, value: float | None) -> float | None:
        """``scale <= SCALE_MAX`` also where a subclass redeclares ``scale`` (its own description)."""
        if value is not None and value > SCALE_MAX:
            raise ValueError(f"Input should be less than or equal to {SCALE_MAX:g} (bound: scale <= "
                             f"{SCALE_MAX:g}, float16's largest value)")
        return value
