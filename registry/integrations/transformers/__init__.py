"""attnreg variants inside HuggingFace transformers models (``pip install 'attnreg[hf]'``).

    import attnreg.integrations.transformers            # registers attnreg:<name> for every variant
    cfg = LlamaConfig(..., attnreg={"window": 64})      # variant config fields (optional)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnreg:local")
    model.generate(ids, attention_mask=mask)            # the variant's own decoding state per layer

Supported: transformers >=5.23,<5.25 (``SUPPORTED_TRANSFORMERS``); an older one is refused at
import, a newer one warns. ``CACHE_KWARG`` is the installed version's cache keyword of model
forwards, ``generate()`` and outputs: ``"cache"`` from 5.24, ``"past_key_values"`` in 5.23.

Importing this module registers ``attnreg:<name>`` in transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` for every registered variant (third-party plugins included), plus the
bare ``attnreg`` (variant named by ``config.attnreg["variant"]``). ``register(name, **fields)``
adds fields (or a new key) explicitly; call ``register()`` again after registering a plugin at
runtime. See docs/transformers.md.
"""

from __future__ import annotations

from typing import Any

try:
    import transformers as _transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "attnreg.integrations.transformers needs HuggingFace transformers (>=5.23,<5.25): "
        "pip install 'attnreg[hf]'"
    ) from err

# First: refuses an older transformers (before importing what it may lack), warns for a newer one,
# detects the cache keyword.
from ._compat import CACHE_KWARG, SUPPORTED_TRANSFORMERS  # noqa: E402

# isort: split
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from attnreg._plugins import REGISTRY  # noqa: E402

from ._attention import AttnregMask, attention_forward, mask_interface  # noqa: E402
from ._cache import AttnregCacheLayer, decoding_cache  # noqa: E402
from ._keys import BARE_KEY, CONFIG_FIELD, PREFIX, KeyEntry, add_key, registered_keys  # noqa: E402
from ._modules import attach, attention_modules, install_post_init  # noqa: E402

__all__ = [
    "CACHE_KWARG",
    "CONFIG_FIELD",
    "SUPPORTED_TRANSFORMERS",
    "AttnregCacheLayer",
    "AttnregMask",
    "KeyEntry",
    "attach",
    "attention_forward",
    "attention_modules",
    "decoding_cache",
    "mask_interface",
    "register",
    "registered_keys",
]


def _add(key: str, variant: str | None, fields: dict[str, Any]) -> str:
    add_key(key, variant, fields)
    AttentionInterface.register(key, attention_forward)
    AttentionMaskInterface.register(key, mask_interface)
    return key


def register(variant: str | None = None, /, *, key: str | None = None, **fields: Any) -> list[str]:
    """Register attnreg keys in transformers; returns the keys registered.

    ``register()`` registers ``attnreg:<name>`` for every variant registered in attnreg now (the
    config then comes from the model config's ``attnreg`` dict and the variant's defaults) and
    the bare ``attnreg``. ``register("local", window=64)`` registers ``attnreg:local`` with these
    config fields (``key="attnreg:local64"`` for another key); the model config may add fields,
    and a field given both ways must agree. ``dropout`` and ``scale`` are not config fields here:
    transformers passes the model's dropout and scaling per call.
    """
    if variant is None:
        if key is not None or fields:
            raise ValueError("key and config fields need a variant name: register('local', window=64)")
        keys = [_add(PREFIX + spec.name, spec.name, {}) for spec in REGISTRY.specs()]
        return [*keys, _add(BARE_KEY, None, {})]
    name = REGISTRY.get(variant).name
    return [_add(PREFIX + name if key is None else key, name, fields)]


register()
install_post_init()
