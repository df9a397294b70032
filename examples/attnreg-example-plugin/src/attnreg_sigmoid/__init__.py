"""attnreg plugin: sigmoid attention (``sigmoid``), Ramapuram et al. 2024.

Registered through the ``attnreg`` entry point in this package's ``pyproject.toml``; attnreg
finds it after ``pip install``. Check it with ``attnreg check sigmoid``.
"""

from __future__ import annotations

from attnreg.core import VariantSpec, hookimpl

from .attention import SigmoidAttention, SigmoidConfig

__all__ = ["SPEC", "SigmoidAttention", "SigmoidConfig", "attnreg_variants"]

# Name, config, factory and capabilities come from the class (VariantSpec.of).
SPEC = VariantSpec.of(
    SigmoidAttention,
    summary="sigmoid(scale * Q K^T + b) V with b = -log(Lk): element-wise weights, rows not normalised",
    reference="Ramapuram et al. 2024, 'Theory, Analysis, and Best Practices for Sigmoid Self-Attention', "
    "arXiv:2409.04431",
    aliases=("sigmoid_attention",),
    # Known gaps would go here, each with its reason (shown as a strict xfail by `attnreg check`):
    # expected_failures={"low_precision[float16]": "why it fails"},
    # This variant passes every check that applies to it, so it declares none.
)


@hookimpl
def attnreg_variants() -> list[VariantSpec]:
    """Provide the variant."""
    return [SPEC]
