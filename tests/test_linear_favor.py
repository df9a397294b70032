"""linear / performer: FAVOR+ features (seeding, caching, approximation), configs, registry,
benchmark hooks (baselines, flops)."""

from __future__ import annotations

import pytest
import torch

import attnreg
from attnreg.core import ConfigError, check_inputs
from attnreg.plugins.linear import LinearAttention, PerformerAttention
from attnreg.plugins.linear.features import favor_projection
from attnreg.plugins.linear.reference import linear_reference


def _qkv(lq: int, e: int = 8, ev: int = 5, std: float = 1.0, seed: int = 0, heads: int = 2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, lq, e, generator=g, dtype=torch.float64) * std  # (B, H, L, E)
    k = torch.randn(1, heads, lq, e, generator=g, dtype=torch.float64) * std  # (B, H, L, E)
    v = torch.randn(1, heads, lq, ev, generator=g, dtype=torch.float64)  # (B, H, L, Ev)
    return q, k, v


# -- registry and configs ------------------------------------------------------------------------
def test_names_aliases_and_defaults() -> None:
    lin = attnreg.build("linear_attention")
    assert type(lin) is LinearAttention and lin.feature_map == "elu" and lin.config.eps is None
    assert lin.eps == 1e-20 and attnreg.build("linear", feature_map="relu").eps == 1e-6  # None: per map
    assert attnreg.build("linear", eps=1e-3).eps == 1e-3
    perf = attnreg.build("performer")
    assert perf.eps == 1e-20
    assert type(perf) is PerformerAttention and perf.feature_map == "favor"
    assert perf.config.num_features == 256 and perf.variant == "performer"
    assert attnreg.get_variant("performer").capabilities.approximates == "dot_product"
    assert attnreg.get_variant("linear").capabilities.approximates is None
    assert attnreg.build({"variant": "linear", "feature_map": "favor"}).feature_map == "favor"


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"variant": "linear", "scale": 0.5}, "scale"),  # elu: no logit scale
        ({"variant": "linear", "feature_map": "relu", "scale": 0.5}, "scale"),
        ({"variant": "performer", "feature_map": "elu"}, "feature_map"),
        ({"variant": "linear", "feature_map": "softmax"}, "feature_map"),
        ({"variant": "linear", "num_features": 0}, "num_features"),
        ({"variant": "linear", "eps": 0.0}, "eps"),
        ({"variant": "linear", "eps": 1.5}, "eps"),  # a relative floor: at most 1
        ({"variant": "linear", "chunk_size": 0}, "chunk_size"),
        ({"variant": "performer", "seed": -1}, "seed"),
    ],
)
def test_bad_configs_are_config_errors(fields: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        attnreg.build(fields)


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_config_round_trip_builds_the_same_module(name: str) -> None:
    m = attnreg.build(name, feature_map="favor", num_features=48, seed=7, chunk_size=5)
    q, k, v = _qkv(13)
    again = attnreg.build(m.config.model_dump())
    assert again.config == m.config
    assert torch.equal(m(q, k, v, is_causal=True), again(q, k, v, is_causal=True))


def test_state_dict_round_trip_and_forward_does_not_mutate_the_module() -> None:
    from attnreg.plugins.linear import attention as lin

    m = attnreg.build("performer", num_features=40, seed=3)
    q, k, v = _qkv(9)
    out = m(q, k, v)
    q16, k16, v16 = _qkv(9, e=16)
    m(q16, k16, v16)  # a second head dim
    # The projection is a pure function of (seed, m, E): forward adds no buffer, nothing to save.
    assert dict(m.named_buffers()) == {} and m.state_dict() == {}
    fresh = attnreg.build(m.config.model_dump())
    fresh.load_state_dict(m.state_dict(), strict=True)
    assert torch.equal(fresh(q, k, v), out)
    m.half()  # a dtype cast of the module is harmless
    assert torch.equal(m(q, k, v), out)
    # Returned projections are fresh tensors: writing into one leaves the memo and later calls intact.
    p = m.projection(8, q.device, torch.float64)
    assert torch.equal(p, favor_projection(40, 8, seed=3))
    p.zero_()
    assert torch.equal(m(q, k, v), out)
    # The process-wide memo is bounded.
    for e in range(1, 3 * lin._PROJ_ENTRIES):
        lin.cached_favor_projection(4, e, seed=1)
    assert len(lin._projections) <= lin._PROJ_ENTRIES


def test_projection_is_seeded_orthogonal_and_gaussian_sized() -> None:
    w = favor_projection(40, 16, seed=5)  # (m, E): blocks of 16, 16, 8 rows
    assert torch.equal(w, favor_projection(40, 16, seed=5))
    assert not torch.allclose(w, favor_projection(40, 16, seed=6))
    for block in (w[:16], w[16:32], w[32:]):
        unit = block / block.norm(dim=1, keepdim=True)
        assert torch.allclose(unit @ unit.T, torch.eye(len(block), dtype=w.dtype), atol=1e-12)
    assert 2.0 < w.norm(dim=1).mean().item() < 6.0  # chi_16 row norms, mean ~ 3.9


def test_different_seeds_give_different_features() -> None:
    q, k, v = _qkv(10)
    a = attnreg.build("performer", seed=1)(q, k, v)
    b = attnreg.build("performer", seed=2)(q, k, v)
    assert (a - b).abs().max().item() > 1e-6


def test_scale_applies_to_favor() -> None:
    q, k, v = _qkv(12)
    m = attnreg.build("performer", scale=0.2, num_features=16)
    masks = check_inputs("performer", m.capabilities, q, k, v, None, None, False)
    ref, _ = linear_reference(q, k, v, masks, "favor", m.eps, m.projection(8, q.device, q.dtype), 0.2)
    assert (m(q, k, v) - ref).abs().max().item() <= 1e-10
    assert (attnreg.build("performer", num_features=16)(q, k, v) - ref).abs().max().item() > 1e-6


# -- FAVOR+ approximates softmax attention -----------------------------------------------------
def _favor_rel_rmse(m_features: int, std: float) -> float:
    q, k, v = _qkv(256, e=64, ev=64, std=std, seed=11, heads=4)
    exact = attnreg.build("dot_product")(q, k, v)
    approx = attnreg.build("performer", num_features=m_features, seed=11)(q, k, v)
    return ((approx - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item()


def test_favor_error_decreases_with_num_features() -> None:
    errs = [_favor_rel_rmse(m, std=0.25) for m in (16, 64, 256, 1024, 4096)]
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 0.05 and errs[-1] < errs[0] / 8, errs  # ~1/sqrt(m): 256x features, ~16x less


def test_favor_unbiased_on_average_over_seeds() -> None:
    """Averaging the (normalised) estimates of independent feature draws approaches softmax."""
    q, k, v = _qkv(32, e=16, ev=4, std=0.5, seed=2)
    exact = attnreg.build("dot_product")(q, k, v)
    draws = [attnreg.build("performer", num_features=64, seed=s)(q, k, v) for s in range(64)]
    mean = torch.stack(draws).mean(0)  # (B, H, L, Ev)
    one = attnreg.build("performer", num_features=64, seed=0)(q, k, v)
    assert (mean - exact).abs().max() < (one - exact).abs().max() / 3


# -- benchmark hooks -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmap", ["elu", "relu", "favor"])
@pytest.mark.parametrize("causal", [False, True])
def test_benchmark_baselines_match_fast_path(fmap: str, causal: bool) -> None:
    m = attnreg.build("linear", feature_map=fmap, num_features=32, chunk_size=8)
    q, k, v = _qkv(37)
    fast = m(q, k, v, is_causal=causal)
    base = m.benchmark_baselines()
    assert set(base) == {"cumsum", "quadratic"}
    for name, fn in base.items():
        assert (fn(q, k, v, causal) - fast).abs().max().item() <= 1e-10, name


def test_flops_grow_linearly_in_length() -> None:
    m = attnreg.build("linear")
    f1 = m.flops(1, 8, 4096, 4096, 64, 64, True)
    f2 = m.flops(1, 8, 8192, 8192, 64, 64, True)
    assert f1 > 0 and f2 == pytest.approx(2 * f1)
    assert m.flops(1, 8, 4096, 4096, 64, 64, False) < f1  # no intra-chunk work
    perf = attnreg.build("performer")
    assert perf.flops(1, 8, 4096, 4096, 64, 64, False) > m.flops(1, 8, 4096, 4096, 64, 64, False)
