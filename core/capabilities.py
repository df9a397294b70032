"""What a variant can do (``Capabilities``) and how it is registered (``VariantSpec``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from .config import AttentionConfig, declared_variant
from .dtypes import FLOAT_DTYPES

if TYPE_CHECKING:
    from .interface import Attention

__all__ = ["Capabilities", "VariantSpec"]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Capabilities:
    """The features a variant declares. The conformance suite verifies every one both ways:
    declared True -> its checks must pass; declared False -> using it must raise
    ``UnsupportedFeatureError``.

    ``decoding``: ``init_state`` / ``decode`` (incremental decoding, each query attending
    causally to everything before it) and ``causal_alignment="lower_right"`` with Lq != Lk (the
    queries are the last Lq positions of the keys' sequence). Requires ``causal``.
    ``grouped_query``: key/value may have fewer heads than the query (H a multiple of Hkv;
    grouped-query / multi-query attention) without being copied per query head.
    ``context_parallel``: ``Attention.forward_sharded`` runs the module on this process's shard
    of a sequence split along its length over a ``torch.distributed`` process group (layout:
    ``attnreg.core.parallel.SequenceLayout``), forward and backward, with the same result as one
    process: self-attention (Lq == Lk), ``is_causal`` and ``key_mask`` where declared. Never under
    a process group: ``attn_mask``, dropout, decoding. Variants without it raise
    ``UnsupportedFeatureError`` from ``forward_sharded``.
    ``double_backward``: ``forward`` (and ``decode``) can be differentiated twice: gradients taken
    with ``create_graph=True`` are correct functions of the inputs again (gradient penalties,
    ``torch.autograd.gradgradcheck``). Declared False, ``Attention`` guards query, key and value
    (``core/second_order.py``): first-order gradients work as before, differentiating one of them
    again raises ``UnsupportedFeatureError``.
    """

    causal: bool = False
    key_mask: bool = False
    attn_mask: bool = False
    float_mask: bool = False
    cross_attention: bool = False
    dropout: bool = False
    normalized: bool = True
    permutation_invariant: bool = True
    learnable: bool = False
    decoding: bool = False
    grouped_query: bool = False
    context_parallel: bool = False
    double_backward: bool = False
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    complexity: str = "O(L^2*E)"
    approximates: str | None = None

    def __post_init__(self) -> None:
        for name in ("causal", "key_mask", "attn_mask", "float_mask", "cross_attention",
                     "dropout", "normalized", "permutation_invariant", "learnable", "decoding",
                     "grouped_query", "context_parallel", "double_backward"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Capabilities.{name} must be a bool, got {getattr(self, name)!r}")
        if self.float_mask and not self.attn_mask:
            raise ValueError("Capabilities: float_mask=True requires attn_mask=True")
        if self.decoding and not self.causal:
            raise ValueError("Capabilities: decoding=True requires causal=True (decoding is causal)")
        bad = [d for d in self.dtypes if d not in FLOAT_DTYPES]
        if not self.dtypes or bad:
            raise ValueError(
                f"Capabilities.dtypes must be a non-empty subset of {FLOAT_DTYPES}, got {self.dtypes}"
            )

    def flags(self) -> dict[str, bool]:
        """The boolean feature flags, by name (for tables and reports)."""
        return {k: v for k, v in self.__dict__.items() if isinstance(v, bool)}


@dataclass(frozen=True, eq=False)  # identity equality: hashable although it holds mappings
class VariantSpec:
    """Everything the registry needs to know about one attention variant.

    Made from the module class with ``VariantSpec.of(MyAttention, summary=..., reference=...)``:
    name, config, factory and capabilities come from the class (its ``config_class`` and
    ``capabilities``), so each is written once. The explicit form ``VariantSpec(name=...,
    config=..., factory=..., capabilities=..., ...)`` is still accepted (``factory`` may then be
    any callable); the conformance check ``spec_metadata`` verifies that what the factory builds
    declares the spec's name and capabilities.

    ``factory(config)`` must return an ``attnreg.core.Attention``. ``expected_failures`` maps
    conformance check names to the reason the variant is known to fail them (strict xfail).
    ``check_configs`` are extra config overrides (e.g. ``{"window": 2, "block_size": 4}``) the
    conformance suite also runs its numeric checks against, each reported as its own subject
    ``name[window=2,block_size=4]``: small blocks/chunks make the tiny test inputs reach the fast
    paths (several blocks, a ragged last one) that the default config only takes at long lengths.
    Each must validate with ``config`` (checked here; a ``ValueError`` names the variant).
    """

    name: str
    config: type[AttentionConfig]
    factory: Callable[[Any], Attention]
    capabilities: Capabilities
    summary: str
    reference: str
    aliases: tuple[str, ...] = ()
    expected_failures: Mapping[str, str] = field(default_factory=dict)
    check_configs: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        where = f"VariantSpec(name={self.name!r})"
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"{where}: name must match {_NAME_RE.pattern}")
        aliases = tuple(self.aliases)
        for alias in aliases:
            if not isinstance(alias, str) or not _NAME_RE.match(alias):
                raise ValueError(f"{where}: alias {alias!r} must match {_NAME_RE.pattern}")
        if self.name in aliases or len(set(aliases)) != len(aliases):
            raise ValueError(f"{where}: aliases {aliases} repeat a name")
        object.__setattr__(self, "aliases", aliases)
        if not (isinstance(self.config, type) and issubclass(self.config, AttentionConfig)):
            raise TypeError(f"{where}: config must be a subclass of AttentionConfig, got {self.config!r}")
        if declared_variant(self.config) != self.name:
            raise TypeError(
                f"{where}: {self.config.__name__}.variant must be declared as "
                f"Literal[{self.name!r}] (it is the discriminator of config files)"
            )
        if not callable(self.factory):
            raise TypeError(f"{where}: factory must be callable, got {self.factory!r}")
        if not isinstance(self.capabilities, Capabilities):
            raise TypeError(f"{where}: capabilities must be a Capabilities, got {self.capabilities!r}")
        for label in ("summary", "reference"):
            if not isinstance(getattr(self, label), str) or not getattr(self, label).strip():
                raise ValueError(f"{where}: {label} must be a non-empty string")
        xfail = dict(self.expected_failures)
        for check, reason in xfail.items():
            if not isinstance(reason, str) or not reason.strip():
                raise ValueError(
                    f"{where}: expected failure {check!r} needs a non-empty reason string"
                )
        object.__setattr__(self, "expected_failures", MappingProxyType(xfail))
        object.__setattr__(self, "check_configs", self._validated_check_configs(where))

    @classmethod
    def of(cls, attention: type[Attention], *, summary: str, reference: str, aliases: tuple[str, ...] = (),
           expected_failures: Mapping[str, str] | None = None,
           check_configs: tuple[Mapping[str, Any], ...] = ()) -> VariantSpec:
        """The spec of an ``Attention`` subclass that declares ``config_class`` (and
        ``capabilities``): its name is the config's ``variant`` literal, the class is the
        factory. ``TypeError`` naming the class when it declares no ``config_class``."""
        from .interface import Attention

        if not (isinstance(attention, type) and issubclass(attention, Attention)):
            raise TypeError(f"VariantSpec.of: expected an Attention subclass, got {attention!r}")
        if attention.config_class is None:
            raise TypeError(f"VariantSpec.of({attention.__qualname__}): the class declares no config_class; "
                            f"set config_class = <its AttentionConfig subclass with variant: "
                            f"Literal[\"name\"]>")
        return cls(name=attention.variant, config=attention.config_class, factory=attention,
                   capabilities=attention.capabilities, summary=summary, reference=reference,
                   aliases=aliases, expected_failures=dict(expected_failures or {}),
                   check_configs=check_configs)

    def _validated_check_configs(self, where: str) -> tuple[Mapping[str, Any], ...]:
        """Each override validated with ``config`` now, so a typo fails at registration."""
        if isinstance(self.check_configs, Mapping):
            raise TypeError(f"{where}: check_configs must be a tuple of mappings, got one mapping")
        out = []
        for i, overrides in enumerate(self.check_configs):
            if not isinstance(overrides, Mapping) or not overrides:
                raise TypeError(f"{where}: check_configs[{i}] must be a non-empty mapping of config "
                                f"fields, got {overrides!r}")
            if "variant" in overrides:
                raise ValueError(f"{where}: check_configs[{i}] must not set 'variant'")
            try:
                self.config(**{**overrides, "variant": self.name})
            except Exception as err:  # pydantic ValidationError or a model validator's error
                # Required fields the suite fills per test (num_heads, head_dim) are not the
                # overrides' fault: then the build at check time validates the whole config.
                errs = err.errors() if hasattr(err, "errors") else [{"type": "other"}]
                if all(e["type"] == "missing" and e["loc"][0] not in overrides for e in errs):
                    out.append(MappingProxyType(dict(overrides)))
                    continue
                raise ValueError(f"{where}: check_configs[{i}] = {dict(overrides)!r} is not a valid "
                                 f"{self.config.__name__}: {err}") from None
            out.append(MappingProxyType(dict(overrides)))
        return tuple(out)

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical name followed by every alias."""
        return (self.name, *self.aliases)
