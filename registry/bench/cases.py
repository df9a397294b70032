"""The measured calls: one ``Job`` describes a point, ``prepare`` turns it into a zero-argument
callable. The same code runs in the measuring subprocess, in ``attnreg bench`` and in the
pytest-benchmark cases, so every path measures exactly the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnreg.core import Attention, AttentionConfig
from attnreg.core.dtypes import DTYPE_NAMES

from .decode import DECODE_REPEATS, prepare_decode_call

__all__ = ["MASKED", "Job", "Prepared", "prepare", "sdpa_flops", "variant_flops", "pattern_of",
           "build_module"]

# Dense SDPA with a variant's pattern: as a precomputed additive float mask, and as the bool mask.
MASKED = ("sdpa_masked", "sdpa_masked_bool")
KINDS = ("variant", "sdpa", *MASKED, "baseline", "gemm")


@dataclass(frozen=True)
class Job:
    """One measured call. ``factory``/``config`` build the variant (also for its baselines);
    for ``gemm`` the length is the square matrix size."""

    kind: str
    length: int
    batch: int
    heads: int
    head_dim: int
    dtype: str
    mode: str = "fwd"
    causal: bool = False
    factory: Callable[[AttentionConfig], Attention] | None = None
    config: AttentionConfig | None = None
    baseline: str | None = None
    seed: int = 0
    # Timed alternately with this job in the same process (the speed guard's paired timing).
    reference: Job | None = None

    def at_length(self, length: int) -> Job:
        """The same job at another length (for warm-up and calibration; without its reference)."""
        return replace(self, length=length, reference=None)


@dataclass
class Prepared:
    """A ready-to-run point: ``call()`` runs it once; ``keep`` holds its inputs alive; ``info``
    is reported with the measurement (e.g. a decoding state's size)."""

    call: Callable[[], None]
    keep: tuple[Any, ...]
    info: dict[str, Any] = field(default_factory=dict)
    max_repeats: int = 50  # most timed repeats (decoding steps are short: more)


def build_module(job: Job) -> Attention:
    """The variant module of ``job`` in eval mode, in the job's dtype."""
    assert job.factory is not None and job.config is not None, "a variant job needs factory and config"
    module = job.factory(job.config)
    return module.to(DTYPE_NAMES[job.dtype]).eval()


def pattern_of(module: Attention, length: int, heads: int, causal: bool) -> Tensor | None:
    """The variant's ``pattern_mask`` (causal included) as a 4-D SDPA mask (1, 1|H, L, L); None
    where the variant provides none."""
    mask = module.pattern_mask(length, is_causal=causal, num_heads=heads)  # (1|H, L, L) bool
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[1:] != (length, length) \
            or mask.shape[0] not in (1, heads):
        raise ValueError(f"{module.variant}.pattern_mask({length}, num_heads={heads}) must be a bool "
                         f"(1|H, L, L) tensor, got {mask.dtype} {tuple(mask.shape)}")
    return mask[None]  # (1, 1|H, L, L)


def sdpa_flops(batch: int, heads: int, length: int, head_dim: int, causal: bool) -> float:
    """Dense attention forward FLOPs: Q K^T and P V, 2 FLOPs per multiply-add (half when causal)."""
    pairs = length * (length + 1) / 2 if causal else float(length) * length
    return 2.0 * batch * heads * pairs * (head_dim + head_dim)


def variant_flops(module: Attention, job: Job, dense: bool) -> float | None:
    """Useful forward FLOPs of a variant: its ``flops()`` if provided, the dense count for SDPA."""
    flops = module.flops(job.batch, job.heads, job.length, job.length, job.head_dim, job.head_dim,
                         is_causal=job.causal)
    if flops is not None:
        return float(flops)
    if dense:
        return sdpa_flops(job.batch, job.heads, job.length, job.head_dim, job.causal)
    return None


def make_inputs(job: Job, requires_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded query, key, value (B, H, L, E) in the job's dtype."""
    gen = torch.Generator().manual_seed(job.seed)
    shape = (job.batch, job.heads, job.length, job.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(DTYPE_NAMES[job.dtype]) for _ in range(3))  # (B, H, L, E)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))  # type: ignore[return-value]


def _attention_fn(job: Job) -> tuple[Callable[[Tensor, Tensor, Tensor], Tensor], tuple[Any, ...]]:
    """The function of (q, k, v) that the job measures, and objects to keep alive."""
    causal = job.causal
    if job.kind == "sdpa":
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)), ()
    module = build_module(job)
    if job.kind == "variant":
        return (lambda q, k, v: module(q, k, v, is_causal=causal)), (module,)
    if job.kind in MASKED:
        allowed = pattern_of(module, job.length, job.heads, causal)  # (1, 1|H, L, L) bool
        if allowed is None:
            raise ValueError(f"variant {module.variant!r} provides no pattern_mask")
        mask = allowed  # sdpa_masked_bool: the mask as a user passes it
        if job.kind == "sdpa_masked":
            # SDPA's own fast form of a mask: additive 0 / -inf, precomputed. A bool mask is
            # converted to exactly this inside every call (more time, and memory for both copies).
            mask = torch.full(allowed.shape, float("-inf"), dtype=DTYPE_NAMES[job.dtype])
            mask.masked_fill_(allowed, 0.0)
            del allowed  # (1, 1|H, L, L) float
        scale = module.softmax_scale(job.head_dim)

        def masked(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, H, L, Ev)

        return masked, (module, mask)
    if job.kind == "baseline":
        fn = module.benchmark_baselines()[job.baseline]
        return (lambda q, k, v: fn(q, k, v, causal)), (module, fn)
    raise ValueError(f"unknown job kind {job.kind!r}; expected one of {KINDS}")


def prepare(job: Job) -> Prepared:
    """Inputs and a zero-argument callable running one forward (under ``no_grad``), one
    forward+backward (gradients of inputs and parameters, cleared before each call), or one
    decoded token at context ``length`` (``mode="decode"``, see ``decode.py``)."""
    torch.manual_seed(job.seed)
    if job.kind == "gemm":
        gen = torch.Generator().manual_seed(job.seed)
        a = torch.randn(job.length, job.length, generator=gen).to(DTYPE_NAMES[job.dtype])  # (n, n)
        b = torch.randn(job.length, job.length, generator=gen).to(DTYPE_NAMES[job.dtype])  # (n, n)

        def gemm() -> None:
            torch.mm(a, b)  # (n, n)

        return Prepared(call=gemm, keep=(a, b))
    if job.mode == "decode":
        if job.kind not in ("variant", "sdpa"):
            raise ValueError(f"decode mode measures variants and sdpa only, not {job.kind!r}")
        module = build_module(job) if job.kind == "variant" else None
        call, keep, info = prepare_decode_call(job.kind, module, job.batch, job.heads, job.head_dim,
                                               job.length, DTYPE_NAMES[job.dtype], job.seed)
        return Prepared(call=call, keep=keep, info=info, max_repeats=DECODE_REPEATS)
    fn, keep = _attention_fn(job)
    backward = job.mode == "fwdbwd"
    q, k, v = make_inputs(job, requires_grad=backward)
    params = [p for obj in keep if isinstance(obj, torch.nn.Module) for p in obj.parameters()]
    if not backward:
        for p in params:
            p.requires_grad_(False)

        def call() -> None:
            with torch.no_grad():
                fn(q, k, v)

        return Prepared(call=call, keep=(q, k, v, *keep))
    grad_out = torch.randn_like(v)  # (B, H, L, Ev); a fixed upstream gradient

    def call_bwd() -> None:
        for t in (q, k, v, *params):
            t.grad = None
        fn(q, k, v).backward(grad_out)

    return Prepared(call=call_bwd, keep=(q, k, v, grad_out, *keep))
