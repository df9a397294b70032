"""The typed config base model every variant's config subclasses."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AttentionConfig"]


class AttentionConfig(BaseModel):
    """Base of every variant config: frozen, unknown fields rejected.

    Subclasses narrow ``variant`` to ``Literal["<name>"]`` (the discriminator of config files)
    and add their own bounded, documented fields.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str = Field(description="Name of the attention variant.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout probability on the attention weights, applied only in train() mode.",
    )
    scale: float | None = Field(
        None, gt=0.0,
        description="Multiplier of the logits; None means 1/sqrt(E) (E = query head dim).",
    )
