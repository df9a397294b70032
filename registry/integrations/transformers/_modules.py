"""One attnreg module per attention layer, created with the model.

Every HF attention module (a module with an integer ``layer_idx``, a ``scaling`` and the
model's ``config``) whose config selects an attnreg key gets the variant as its submodule
``attnreg``: learnable variants' parameters are then in ``state_dict`` from construction on, so
optimizers, ``save_pretrained`` and ``from_pretrained`` see them. This happens in
``PreTrainedModel.post_init`` (which every transformers model calls at the end of ``__init__``),
wrapped once when the integration is imported; ``attach(model)`` does the same by hand after
``model.set_attn_implementation(...)``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from attnreg._configs import build
from attnreg.core import Attention

from ._cache import forget_cache, prepare_generation_cache, remember_cache
from ._keys import is_attnreg_key, layer_config

__all__ = ["attach", "attached", "attention_modules", "install_post_init"]

ATTACHED = "attnreg"  # submodule name: state_dict keys read "...self_attn.attnreg.<param>"
_KEY = "_attnreg_key"  # the attn_implementation the attached module was built for
_HOOKED = "_attnreg_hooked"
_OURS = "_attnreg_hf"  # marks attnreg modules attached here (for _init_weights)


def attention_modules(model: nn.Module) -> Iterator[nn.Module]:
    """The modules transformers' attention function is called with: an integer ``layer_idx``,
    a ``scaling`` and a ``PreTrainedConfig`` as ``config`` (Llama, GPT-2, Mistral, Qwen, ...)."""
    for m in model.modules():
        if isinstance(m, PreTrainedModel) or isinstance(m, Attention):
            continue
        if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "scaling") and \
                isinstance(getattr(m, "config", None), PreTrainedConfig):
            yield m


def _head_sizes(module: nn.Module) -> tuple[int, int]:
    cfg = module.config
    heads = getattr(module, "num_heads", None) or getattr(cfg, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"cannot tell the number of heads of {type(module).__name__} (no num_heads, "
                         "no config.num_attention_heads)")
    head_dim = getattr(module, "head_dim", None) or getattr(cfg, "head_dim", None) or \
        cfg.hidden_size // heads
    return heads, head_dim


def _build(module: nn.Module, key: str) -> Attention:
    """The variant of ``key`` for this layer, on the layer's device and dtype."""
    heads, head_dim = _head_sizes(module)
    attn = build(layer_config(key, module.config, heads, head_dim))
    like = next((p for p in module.parameters() if p.is_floating_point()), None)
    if like is not None:
        attn.to(device=like.device, dtype=like.dtype)
    attn.__dict__[_OURS] = True
    return attn


def _install(module: nn.Module, key: str, attn: Attention) -> Attention:
    if ATTACHED in module.__dict__:
        raise ValueError(f"{type(module).__name__} already has a non-module attribute {ATTACHED!r}")
    module.add_module(ATTACHED, attn)
    module.__dict__[_KEY] = key
    if not module.__dict__.get(_HOOKED):
        module.register_forward_pre_hook(remember_cache, with_kwargs=True)
        module.register_forward_hook(forget_cache, always_call=True)
        module.__dict__[_HOOKED] = True
    return attn


def attach(model: nn.Module) -> int:
    """Give each attention module of ``model`` whose config selects an attnreg key its variant
    (submodule ``attnreg``); returns how many were (re)built. Idempotent: a module already
    holding the variant of its current key is left alone (parameters kept)."""
    count = 0
    for m in attention_modules(model):
        key = m.config._attn_implementation
        if is_attnreg_key(key) and not (m._modules.get(ATTACHED) is not None
                                        and m.__dict__.get(_KEY) == key):
            _install(m, key, _build(m, key))
            count += 1
    if any(m._modules.get(ATTACHED) is not None for m in attention_modules(model)):
        for sub in model.modules():
            if isinstance(sub, PreTrainedModel) and "_init_weights" not in sub.__dict__:
                sub.__dict__["_init_weights"] = functools.partial(_init_weights, sub)
            prepare = "_prepare_cache_for_generation"  # generate()'s: decoding states
            if hasattr(type(sub), prepare) and prepare not in sub.__dict__:
                sub.__dict__[prepare] = functools.partial(prepare_generation_cache, sub)
    return count


def attached(module: nn.Module) -> Attention:
    """The variant attached to ``module`` for its current key.

    A module without one (not found at construction, or whose key changed with
    ``set_attn_implementation``) gets it now if the variant has no parameters; a learnable one
    must be attached before training and loading, so that is an error naming ``attach``.
    """
    attn = module._modules.get(ATTACHED)
    key = module.config._attn_implementation
    if isinstance(attn, Attention) and module.__dict__.get(_KEY) == key:
        return attn
    if not hasattr(module, "layer_idx"):
        raise ValueError(f"{type(module).__name__} has no layer_idx: attnreg attends only inside "
                         "transformers attention layers")
    attn = _build(module, key)
    if any(True for _ in attn.parameters()):
        raise RuntimeError(
            f"'{attn.variant}' has parameters, and {type(module).__name__} (layer {module.layer_idx}) "
            f"has none for {key!r}: call attnreg.integrations.transformers.attach(model) after "
            "set_attn_implementation (and before building the optimizer or loading weights)")
    return _install(module, key, attn)


def _init_weights(model: PreTrainedModel, module: nn.Module) -> None:
    """transformers' per-module init, plus attnreg modules: their parameters that were not
    loaded from a checkpoint (no ``_is_hf_initialized`` flag) get ``reset_parameters()``."""
    if not (isinstance(module, Attention) and module.__dict__.get(_OURS)):
        type(model)._init_weights(model, module)
        return
    # transformers 5.24 dropped the no_grad of _init_weights (its initialize_weights keeps one); the
    # in-place writes below need it whoever calls.
    with torch.no_grad():
        _reset_missing(module)


def _reset_missing(module: Attention) -> None:
    """``reset_parameters()`` for a module with parameters not loaded, keeping the loaded ones."""
    params = dict(module.named_parameters())
    kept = {n: p.detach().clone() for n, p in params.items() if getattr(p, "_is_hf_initialized", False)}
    if len(kept) == len(params):
        return
    reset = getattr(module, "reset_parameters", None)
    if not callable(reset):
        missing = sorted(set(params) - set(kept))
        raise RuntimeError(f"attnreg variant '{module.variant}' has parameters {missing} to initialise "
                           "but no reset_parameters() method")
    reset()
    for name, value in kept.items():  # a partly loaded module keeps what was loaded
        params[name].copy_(value)


def install_post_init() -> None:
    """Wrap ``PreTrainedModel.post_init`` once so every model attaches its attnreg modules (a
    no-op for models whose configs select no attnreg key)."""
    original = PreTrainedModel.post_init
    if getattr(original, "_attnreg", False):
        return

    @functools.wraps(original)
    def post_init(self: PreTrainedModel) -> None:
        attach(self)
        original(self)

    post_init._attnreg = True  # type: ignore[attr-defined]
    PreTrainedModel.post_init = post_init  # type: ignore[method-assign]
