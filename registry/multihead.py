"""``MultiHeadAttention``: projections and heads around any registered attention variant.

    mha = attnreg.MultiHeadAttention(64, num_heads=4, num_kv_heads=2,
                                     attention={"variant": "local", "window": 16})
    out = mha(x, key_mask=real, is_causal=True)               # x (B, L, 64) -> (B, L, 64)
    state = mha.init_state(B, max_length=L + 20)              # variants declaring decoding
    y, state = mha.decode(prompt, state, key_mask=real)       # prefill, then one token at a time

The variant only ever sees (B, H, L, E) heads: this module owns the projections, the head
split and merge, grouped-query key/value heads, and the config fields that size a variant
(``num_heads``, ``head_dim``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn

from attnreg.core import (
    AttentionConfig,
    CausalAlignment,
    ConfigError,
    DecodeState,
    UnsupportedFeatureError,
    canonical_device,
    repeat_kv,
)

from ._configs import build, read_config_file, validate_config
from ._plugins import REGISTRY

__all__ = ["AttentionSpec", "MultiHeadAttention", "attention_config"]

AttentionSpec = Union[str, Mapping[str, Any], AttentionConfig, os.PathLike]  # noqa: UP007 (runtime alias)


def attention_config(attention: AttentionSpec, num_heads: int, head_dim: int) -> AttentionConfig:
    """The config of ``attention`` (a variant name, a config mapping, a config model or the
    ``pathlib.Path`` of a config file) with the fields a variant sizes itself with,
    ``num_heads`` and ``head_dim``, set from the module.

    Only fields the variant's config declares are set (``additive``: both; ``sparse``:
    ``num_heads``). A value given by the user that differs from the module's raises
    ``ConfigError``: the module decides the head count and size, the config may only agree.
    """
    if isinstance(attention, os.PathLike) and not isinstance(attention, Mapping):
        raw_file = read_config_file(attention)  # its errors name the file already
        try:
            return attention_config(raw_file, num_heads, head_dim)
        except ConfigError as err:
            raise type(err)(f"config file {os.fspath(attention)!r}: {err}") from None
    from_model = isinstance(attention, AttentionConfig)
    if from_model:
        raw: dict[str, Any] = dict(attention)
    elif isinstance(attention, str):
        raw = {"variant": attention}
    elif isinstance(attention, (Mapping, os.PathLike)):
        raw = dict(attention) if isinstance(attention, Mapping) else read_config_file(attention)
        if not isinstance(raw.get("variant"), str):
            validate_config(raw)  # raises the ConfigError that names the missing 'variant'
    else:
        raise ConfigError("attention must be a variant name, a config mapping, an AttentionConfig or "
                          f"a config file's pathlib.Path, got {type(attention).__name__}")
    spec = REGISTRY.get(raw["variant"])
    fill = {}
    for field, want in (("num_heads", num_heads), ("head_dim", head_dim)):
        if field not in spec.config.model_fields:
            continue
        given = raw.get(field)
        if given is None:
            fill[field] = want
        elif given != want:
            raise ConfigError(
                f"attention config of '{spec.name}' sets {field}={given!r}, but this "
                f"MultiHeadAttention has {field}={want} (num_heads={num_heads}, head_dim = "
                f"embed_dim // num_heads = {head_dim}); drop {field} from the config (the module "
                "fills it in) or make them agree"
            )
    if from_model and not fill:
        return attention  # type: ignore[return-value]
    if from_model:
        raw = attention.model_dump()  # type: ignore[union-attr]
    return validate_config({**raw, **fill})


def _check_positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class MultiHeadAttention(nn.Module):
    """Multi-head attention with any registered variant inside: input and output (B, L, D).

    ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` are ``nn.Linear`` (``bias`` for all four).
    ``num_kv_heads`` (default ``num_heads``) gives grouped-query attention (1 = multi-query):
    query head h reads key/value head ``h // (num_heads // num_kv_heads)``; variants declaring
    ``grouped_query`` get the Hkv heads as they are, the others a per-head copy.
    ``attention`` is a variant name, a config mapping (the config-file form), a config model or
    a config file's ``pathlib.Path``; config fields ``num_heads``/``head_dim`` are filled in
    from the module, so learnable variants own all their parameters from construction on.
    ``kdim``/``vdim`` (default ``embed_dim``) are the feature sizes of ``key``/``value`` for
    cross-attention.

    Masks follow attnreg, not ``torch.nn.MultiheadAttention``: ``key_mask`` True = real token,
    bool ``attn_mask`` True = may attend. ``from_torch`` loads a torch module's weights.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        attention: AttentionSpec = "dot_product",
        *,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_positive("embed_dim", embed_dim)
        _check_positive("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_positive("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else _check_positive("kdim", kdim)
        self.vdim = embed_dim if vdim is None else _check_positive("vdim", vdim)
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(self.kdim, kv_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(self.vdim, kv_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.attention = build(attention_config(attention, num_heads, self.head_dim))
        if device is not None or dtype is not None:
            self.attention.to(device=device, dtype=dtype)
        # Hkv heads reach the variant uncopied only where it declares it can read them.
        self.grouped = num_kv_heads != num_heads and self.attention.capabilities.grouped_query
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections as in ``torch.nn.MultiheadAttention``: q/k/v weights Xavier-uniform
        (over the stacked q/k/v matrix when kdim == vdim == embed_dim, as torch does), out
        weight ``nn.Linear``'s default, biases zero. The variant's own parameters are left alone."""
        q, k, v = self.q_proj.weight, self.k_proj.weight, self.v_proj.weight
        if q.shape[1] == k.shape[1] == v.shape[1]:
            # Same bound as one Xavier over torch's (3D, D) in_proj_weight (D = embed_dim).
            bound = math.sqrt(6.0 / (q.shape[1] + q.shape[0] + k.shape[0] + v.shape[0]))
            for w in (q, k, v):
                nn.init.uniform_(w, -bound, bound)
        else:
            for w in (q, k, v):
                nn.init.xavier_uniform_(w)
        self.out_proj.reset_parameters()
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    @property
    def variant(self) -> str:
        """The registered name of the attention variant inside."""
        return self.attention.variant

    # -- shapes ---------------------------------------------------------------------------
    def _check(self, name: str, x: object, dim: int, batch: int | None = None) -> Tensor:
        p = self.q_proj.weight
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            hint = " (heads are split inside: pass (B, L, H*E), not (B, L, H, E))" \
                if isinstance(x, Tensor) and x.dim() == 4 else ""
            raise ValueError(f"{name} must be a tensor (B, L, {dim}), got {got}{hint}")
        if batch is not None and x.shape[0] != batch:
            raise ValueError(f"{name} has batch {x.shape[0]}, query has {batch}")
        if x.dtype != p.dtype or x.device != p.device:
            raise ValueError(f"{name} is {x.dtype} on {x.device}, the module's parameters are "
                             f"{p.dtype} on {p.device}")
        return x

    def _split(self, x: Tensor, heads: int) -> Tensor:
        """(B, L, heads*E) -> (B, heads, L, E)."""
        b, n, _ = x.shape
        return x.view(b, n, heads, self.head_dim).transpose(1, 2)  # (B, heads, L, E)

    def _kv_heads(self, x: Tensor) -> Tensor:
        """Projected keys/values (B, S, Hkv*E) -> (B, Hkv, S, E), or (B, H, S, E) copies for
        variants that cannot read grouped heads."""
        t = self._split(x, self.num_kv_heads)  # (B, Hkv, S, E)
        if self.num_kv_heads == self.num_heads or self.grouped:
            return t
        return repeat_kv(t, self.num_heads)  # (B, H, S, E)

    def _merge(self, out: Tensor) -> Tensor:
        """(B, H, L, E) -> out_proj of (B, L, D)."""
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))  # (B, L, D)

    # -- full sequences -------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        causal_alignment: CausalAlignment = "upper_left",
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Output (B, L, D) for query (B, L, D); key (B, S, kdim) and value (B, S, vdim)
        default to query (self-attention) and key.

        ``key_mask`` (B, S) bool, True = real token; ``attn_mask`` bool (True = may attend) or
        float (added to the logits), broadcastable to (B, H, L, S); ``is_causal``: query i sees
        keys j <= i, or with ``causal_alignment="lower_right"`` keys j <= i + S - L (the L
        queries are the last positions of the keys' sequence; variants declaring decoding).
        With ``need_weights`` returns ``(out, weights)``, weights (B, H, L, S) per head
        (``attention_weights`` of the variant; no dropout).
        """
        if key is None and value is not None:
            raise ValueError("value was given without key: pass key too (or neither for self-attention)")
        query = self._check("query", query, self.embed_dim)
        b, n, _ = query.shape
        key = query if key is None else self._check("key", key, self.kdim, b)
        value = key if value is None else self._check("value", value, self.vdim, b)
        if value.shape[1] != key.shape[1]:
            raise ValueError(f"value length {value.shape[1]} differs from key length {key.shape[1]}")
        q = self._split(self.q_proj(query), self.num_heads)  # (B, H, L, E)
        k = self._kv_heads(self.k_proj(key))  # (B, Hkv|H, S, E)
        v = self._kv_heads(self.v_proj(value))  # (B, Hkv|H, S, E)
        masks = {"attn_mask": attn_mask, "key_mask": key_mask, "is_causal": is_causal,
                 "causal_alignment": causal_alignment}
        out = self._merge(self.attention(q, k, v, **masks))  # (B, L, D)
        if not need_weights:
            return out
        return out, self.attention.attention_weights(q, k, **masks)  # (B, H, L, S)

    # -- incremental decoding -------------------------------------------------------------
    def _require_decoding(self) -> None:
        if not self.attention.capabilities.decoding:
            raise UnsupportedFeatureError(
                self.variant, "decoding (MultiHeadAttention.init_state / decode)",
                "its capabilities declare decoding=False; run forward(x, is_causal=True) over the "
                "whole sequence instead",
            )

    def init_state(
        self,
        batch: int,
        *,
        max_length: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> DecodeState:
        """An empty decoding state for ``batch`` sequences (causal self-attention).

        It holds ``num_kv_heads`` heads where the variant declares ``grouped_query``,
        ``num_heads`` otherwise. ``max_length`` bounds the total length (prompt plus generated
        tokens; variants with length-dependent patterns need it). The state has the dtype and
        device of the module's parameters (``decode`` projects x with them); ``dtype`` /
        ``device``, if given, must be those (``ValueError`` otherwise: move the module with
        ``.to()`` instead). ``UnsupportedFeatureError`` if the variant cannot decode.
        """
        self._require_decoding()
        p = self.q_proj.weight
        if dtype is not None and dtype != p.dtype:
            raise ValueError(f"init_state: dtype={dtype} differs from the module's parameters ({p.dtype}); "
                             "decode needs x and the state in the parameters' dtype: move the module "
                             "with .to(dtype) instead")
        if device is not None and canonical_device(device) != p.device:
            raise ValueError(f"init_state: device={device} differs from the module's parameters "
                             f"({p.device}); decode needs x and the state on the parameters' device: "
                             "move the module with .to(device) instead")
        heads = self.num_kv_heads if self.grouped else self.num_heads
        return self.attention.init_state(batch, heads, self.head_dim, dtype=p.dtype, device=p.device,
                                         max_length=max_length)

    def decode(
        self, x: Tensor, state: DecodeState, *, key_mask: Tensor | None = None
    ) -> tuple[Tensor, DecodeState]:
        """Outputs (B, T, D) of the next T positions x (B, T, D) and the updated state.

        Position t of the call attends causally to every earlier position (cached or new): the
        outputs equal ``forward(whole_sequence, is_causal=True, key_mask=...)`` at those
        positions. ``key_mask`` (B, T) bool marks the new positions' real tokens (left padding
        of a batch of prompts). ``state`` is consumed.
        """
        self._require_decoding()
        x = self._check("x", x, self.embed_dim)
        if isinstance(state, DecodeState) and x.shape[0] != state.batch:
            raise ValueError(f"decode: x has batch {x.shape[0]}, the state {state.batch}")
        q = self._split(self.q_proj(x), self.num_heads)  # (B, H, T, E)
        k = self._kv_heads(self.k_proj(x))  # (B, Hkv|H, T, E)
        v = self._kv_heads(self.v_proj(x))  # (B, Hkv|H, T, E)
        out, state = self.attention.decode(q, k, v, state, key_mask=key_mask)  # (B, H, T, E)
        return self._merge(out), state

    # -- torch.nn.MultiheadAttention --------------------------------------------------------
    @classmethod
    def from_torch(
        cls, module: nn.MultiheadAttention, attention: AttentionSpec | None = None
    ) -> MultiHeadAttention:
        """A copy of ``module``'s weights (same device and dtype), computing the same function.

        ``attention`` defaults to ``dot_product`` with the torch module's dropout. The result
        is batch-first whatever ``module.batch_first`` is, and takes attnreg masks: pass
        ``key_mask=~key_padding_mask`` and ``attn_mask=~mask`` for torch's bool masks.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"from_torch needs a torch.nn.MultiheadAttention, got {type(module).__name__}")
        p = module.out_proj.weight
        if attention is None:
            attention = {"variant": "dot_product", "dropout": float(module.dropout)}
        mha = cls(module.embed_dim, module.num_heads, attention=attention,
                  bias=module.in_proj_bias is not None, kdim=module.kdim, vdim=module.vdim,
                  device=p.device, dtype=p.dtype)
        mha.load_torch_weights(module)
        return mha

    @torch.no_grad()
    def load_torch_weights(self, module: nn.MultiheadAttention) -> None:
        """Copy the projections of a ``torch.nn.MultiheadAttention`` of the same sizes into this
        module (torch's ``in_proj_weight`` rows are q, k, v in that order)."""
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("torch modules with add_bias_kv or add_zero_attn have no MultiHeadAttention "
                             "equivalent")
        ours = (self.embed_dim, self.num_heads, self.num_kv_heads, self.kdim, self.vdim,
                self.q_proj.bias is not None)
        theirs = (module.embed_dim, module.num_heads, module.num_heads, module.kdim, module.vdim,
                  module.in_proj_bias is not None)
        if ours != theirs:
            names = "(embed_dim, num_heads, num_kv_heads, kdim, vdim, bias)"
            raise ValueError(f"torch module sizes {names} = {theirs} differ from this module's {ours}")
        d = self.embed_dim
        if module.in_proj_weight is not None:
            weights = module.in_proj_weight.split(d)  # 3 x (D, D)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = module.in_proj_bias.split(d) if module.in_proj_bias is not None else (None,) * 3
        for lin, w, b in zip((self.q_proj, self.k_proj, self.v_proj), weights, biases, strict=True):
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        self.out_proj.weight.copy_(module.out_proj.weight)
        if module.out_proj.bias is not None:
            self.out_proj.bias.copy_(module.out_proj.bias)

    def extra_repr(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        cross = f", kdim={self.kdim}, vdim={self.vdim}" if self.kdim != self.embed_dim or \
            self.vdim != self.embed_dim else ""
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}{kv}{cross}, variant={self.variant!r}"
