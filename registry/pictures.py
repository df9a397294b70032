"""Pattern pictures: which keys each query may attend to, and one head's attention weights on
random inputs, for any registered variant (``attnreg plot``; the docs' pictures).

The allowed pattern comes from the module's ``pattern_mask`` where it provides one (the optional
benchmark hook, causal included); otherwise it is the support of the weights (where
``attention_weights`` is not 0) over a few random inputs, and the picture says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnreg.core import Attention, AttentionConfig, ConfigError, UnsupportedFeatureError

from ._plotting import pyplot

__all__ = ["PatternPicture", "parse_fields", "pattern_picture", "plot_pictures"]

SUPPORT_DRAWS = 3  # random inputs whose weights' support is united when there is no pattern_mask


@dataclass(frozen=True)
class PatternPicture:
    """What one panel pair shows: the allowed pattern and one head's weights at one length."""

    variant: str
    config: AttentionConfig
    length: int
    causal: bool
    allowed: torch.Tensor  # (L, L) bool: query i may attend to key j
    weights: torch.Tensor  # (L, L) float64, head 0 of batch item 0
    source: str  # "pattern_mask" or "weights support (N random inputs)"

    @property
    def config_text(self) -> str:
        """The fields that differ from the variant's defaults (``defaults`` if none)."""
        fields = {k: v for k, v in self.config.model_dump(exclude_defaults=True).items() if k != "variant"}
        return ", ".join(f"{k}={v}" for k, v in fields.items()) or "defaults"


def parse_fields(items: Sequence[str]) -> dict[str, Any]:
    """``["window=8", "layout=bigbird"]`` -> ``{"window": 8, "layout": "bigbird"}`` (values typed
    like YAML: ``8`` is an int, ``true`` a bool, ``[1, 2]`` a list)."""
    import yaml

    fields: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"expected FIELD=VALUE (e.g. window=8), got {item!r}")
        try:
            fields[key.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError as exc:
            raise ConfigError(f"field {key.strip()!r}: cannot read value {value!r}: {exc}") from None
    return fields


def _sized_config(name: str, fields: Mapping[str, Any], heads: int, head_dim: int) -> AttentionConfig:
    """The validated config; variants with parameters get ``num_heads`` / ``head_dim`` from the
    picture's sizes unless given."""
    import attnreg

    spec = attnreg.get_variant(name)
    sized = dict(fields)
    for key, value in (("num_heads", heads), ("head_dim", head_dim)):
        if key in spec.config.model_fields and key not in sized:
            sized[key] = value
    return attnreg.validate_config({**sized, "variant": spec.name})


def _pattern(module: Attention, length: int, heads: int, causal: bool) -> torch.Tensor | None:
    """Head 0 of ``module.pattern_mask`` as (L, L) bool, or None where it provides none."""
    mask = module.pattern_mask(length, is_causal=causal, num_heads=heads)  # (H|1, L, L) bool
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[1:] != (length, length):
        raise ConfigError(f"pattern_mask({length}, num_heads={heads}) returned {mask.dtype} "
                          f"{tuple(mask.shape)}, expected bool (H|1, {length}, {length})")
    return mask[0].cpu()  # (L, L)


def pattern_picture(name: str, fields: Mapping[str, Any] | None = None, *, length: int = 128,
                    causal: bool = False, heads: int = 2, head_dim: int = 16,
                    seed: int = 0) -> PatternPicture:
    """Build variant ``name`` with ``fields`` and compute its allowed pattern and the weights of
    head 0 on seeded standard-normal query/key of shape (1, heads, length, head_dim)."""
    import attnreg

    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= 4096:
        raise ConfigError(f"length must be an integer in 1..4096 (the picture is dense), got {length!r}")
    config = _sized_config(name, fields or {}, heads, head_dim)
    spec = attnreg.get_variant(config.variant)
    caps = spec.capabilities
    if causal and not caps.causal:
        raise ConfigError(f"variant '{spec.name}' does not declare causal; plot it without --causal")
    dtype = next(d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16) if d in caps.dtypes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = attnreg.build(config).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(SUPPORT_DRAWS):
        q, k = (torch.randn(1, heads, length, head_dim, generator=gen, dtype=torch.float64).to(dtype)
                for _ in range(2))  # (B, H, L, E)
        with torch.no_grad():
            try:
                w = module.attention_weights(q, k, is_causal=causal)  # (B, H, L, L)
            except UnsupportedFeatureError as exc:
                raise ConfigError(f"cannot plot '{spec.name}': {exc}") from None
        draws.append(w[0, 0].detach().to(torch.float64).cpu())  # (L, L)
    allowed = _pattern(module, length, heads, causal)
    source = "pattern_mask"
    if allowed is None:
        allowed = torch.stack([d != 0 for d in draws]).any(0)
        source = f"weights support ({SUPPORT_DRAWS} random inputs)"
    return PatternPicture(spec.name, config, length, causal, allowed, draws[0], source)


def plot_pictures(pictures: Sequence[PatternPicture], out: Path | str, *, dpi: int = 100) -> Path:
    """Write a PNG: one column per picture, the allowed pattern above the weights (log colour
    scale; exact zeros white). The title names the variant and its non-default config."""
    from matplotlib.colors import ListedColormap, LogNorm

    if not pictures:
        raise ValueError("plot_pictures needs at least one picture")
    plt = pyplot()
    first = pictures[0]
    n = len(pictures)
    fig, axes = plt.subplots(2, n, figsize=(max(3.3 * n + 0.8, 5.2), 7.2), squeeze=False,
                             layout="constrained")
    pattern_cmap = ListedColormap(["#f4f4f4", "#1f4e9a"])
    weights_cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # white: exactly 0
    positive = torch.cat([p.weights[p.weights > 0] for p in pictures])
    low = max(float(positive.min()) if positive.numel() else 1e-6, 1e-6)
    norm = LogNorm(vmin=low, vmax=max(float(positive.max()) if positive.numel() else 1.0, low * 10))
    image = None
    for col, pic in enumerate(pictures):
        top, bottom = axes[0, col], axes[1, col]
        where = f"L={pic.length}, {'causal' if pic.causal else 'not causal'}"
        top.imshow(pic.allowed.numpy(), cmap=pattern_cmap, vmin=0, vmax=1, interpolation="nearest")
        density = pic.allowed.float().mean().item()
        top.set_title(f"allowed: {where}\n{density:.0%} of pairs", fontsize=9)
        image = bottom.imshow(torch.where(pic.weights > 0, pic.weights, float("nan")).numpy(),
                              cmap=weights_cmap, norm=norm, interpolation="nearest")
        bottom.set_title(f"weights, head 0: {where}", fontsize=9)
        for ax in (top, bottom):
            ax.set_xlabel("key position j", fontsize=8)
            ax.set_ylabel("query position i", fontsize=8)
            ax.tick_params(labelsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes[1, :].tolist(), shrink=0.85, label="weight (log scale)")
    fig.suptitle(f"{first.variant} ({first.config_text})\npattern from {first.source}", fontsize=10)
    path = Path(out)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
