"""The transformers versions the integration supports, and the names that differ between them.

Tested: transformers 5.23 and 5.24 (``SUPPORTED_TRANSFORMERS``). 5.24 renamed the cache keyword
from ``past_key_values`` to ``cache`` everywhere the integration meets it: the models' forwards
(attention modules included), ``generate()``, the key under which generate's cache preparation
stores the cache in ``model_kwargs``, the mask functions, and the field of model and generate
outputs. 5.24 still accepts the old keyword with a ``FutureWarning`` (until 5.40 / 6.0), but
its models pass the cache on as ``cache``, so the integration must read that name.

The name is detected once, at import, from transformers' own signatures (they must agree, or the
import fails naming the supported range); an older transformers is refused, a newer one warns.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings

import transformers

__all__ = ["CACHE_KWARG", "OTHER_CACHE_KWARG", "PREPARE_CACHE_SIGNATURE", "SUPPORTED_TRANSFORMERS",
           "check_version", "detect_cache_kwarg"]

OLDEST, NEWEST = (5, 23), (5, 24)  # the (major, minor) range tested
SUPPORTED_TRANSFORMERS = ">=5.23,<5.25"
_NAMES = ("cache", "past_key_values")  # 5.24 on, up to 5.23


def _minor(version: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ImportError(f"attnreg.integrations.transformers: cannot read the transformers version "
                          f"{version!r} (supported: transformers{SUPPORTED_TRANSFORMERS})")
    return int(found[1]), int(found[2])


def check_version(version: str) -> None:
    """ImportError for a transformers older than the supported range (its attention, mask and
    cache interfaces differ); a ``UserWarning`` naming the range for a newer, untested one."""
    got = _minor(version)
    if got < OLDEST:
        raise ImportError(
            f"attnreg.integrations.transformers supports transformers{SUPPORTED_TRANSFORMERS} "
            f"(tested with 5.23 and 5.24), found {version}: pip install 'attnreg[hf]'")
    if got > NEWEST:
        warnings.warn(
            f"attnreg.integrations.transformers was tested with transformers{SUPPORTED_TRANSFORMERS} "
            f"(5.23 and 5.24), found {version}; the cache keyword detected from its signatures is "
            "used, but this version is untested", UserWarning, stacklevel=2)


check_version(transformers.__version__)  # before importing interfaces an older one may lack

from transformers import GenerationMixin  # noqa: E402
from transformers.masking_utils import create_causal_mask  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402


def _cache_name(where: str, names: object) -> str:
    found = [n for n in _NAMES if n in names]  # type: ignore[operator]
    if len(found) != 1:
        raise ImportError(
            f"attnreg.integrations.transformers supports transformers{SUPPORTED_TRANSFORMERS}: "
            f"{where} (transformers {transformers.__version__}) names "
            f"{'both' if found else 'neither'} of the cache keywords {list(_NAMES)}")
    return found[0]


def detect_cache_kwarg() -> str:
    """The installed transformers' cache keyword (``"cache"`` from 5.24, ``"past_key_values"``
    before), read from generate's model inputs, the causal-mask function and the model outputs;
    ImportError naming the supported range if they do not agree on one."""
    sources = {
        "GenerationMixin.prepare_inputs_for_generation":
            inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters,
        "masking_utils.create_causal_mask": inspect.signature(create_causal_mask).parameters,
        "CausalLMOutputWithPast": [f.name for f in dataclasses.fields(CausalLMOutputWithPast)],
    }
    seen = {where: _cache_name(where, names) for where, names in sources.items()}
    if len(set(seen.values())) != 1:
        raise ImportError(f"attnreg.integrations.transformers supports transformers{SUPPORTED_TRANSFORMERS}: "
                          f"transformers {transformers.__version__} names its cache differently in {seen}")
    return next(iter(seen.values()))


def _prepare_cache_signature() -> inspect.Signature:
    sig = inspect.signature(GenerationMixin._prepare_cache_for_generation)
    missing = [p for p in ("model_kwargs", "max_cache_length") if p not in sig.parameters]
    if missing:
        raise ImportError(f"attnreg.integrations.transformers supports transformers{SUPPORTED_TRANSFORMERS}: "
                          f"GenerationMixin._prepare_cache_for_generation of transformers "
                          f"{transformers.__version__} has no {missing}")
    return sig


# The keyword of the cache in model forwards and generate(), generate's model_kwargs key, and
# the field of model/generate outputs (one name in each supported version).
CACHE_KWARG = detect_cache_kwarg()
OTHER_CACHE_KWARG = next(n for n in _NAMES if n != CACHE_KWARG)  # the other supported version's
# generate() calls _prepare_cache_for_generation positionally with the base class's parameters.
PREPARE_CACHE_SIGNATURE = _prepare_cache_signature()

