"""One rank of the multi-process context-parallel tests (``test_distributed.py`` launches P of them
with ``attnreg.distributed.launch_local``: gloo over 127.0.0.1, torchrun's environment).

Every rank builds the same full inputs (seeded), runs the single-process module on them, and
compares its shard of ``forward_sharded``'s output and of the q/k/v gradients with the matching
rows of the single-process ones. Writes ``{case: result}`` as JSON to ``OUT/rank<r>.json``.

    python tests/dist_worker.py OUT            # every case
    python tests/dist_worker.py OUT torch_cp   # dot_product vs torch's context_parallel only
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

_T0 = time.perf_counter()

import torch  # noqa: E402 (the import time is reported)
import torch.distributed as dist  # noqa: E402

import attnreg  # noqa: E402
import attnreg.distributed as ad  # noqa: E402

B, E, EV = 2, 8, 6


def _key_mask(kind: str | None, n: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind is None:
        return None
    km = torch.ones(B, n, dtype=torch.bool)
    if kind == "padded":  # item 0 right-padded with holes, item 1 entirely padding
        km[0, n - 5:] = False
        km[0, torch.randint(1, n - 5, (3,), generator=gen)] = False
        km[1] = False
    elif kind == "left":  # left padding (a batch of prompts), item 1 mostly padding
        km[0, :3] = False
        km[1, : n - 2] = False
    return km


def run_case(variant: str, cfg: dict[str, Any], n: int, causal: bool, mask: str | None,
             h: int = 2, hkv: int = 2, lq: int | None = None) -> dict[str, Any]:
    """Max |sharded - single process| of this rank's output and q/k/v gradient rows."""
    lq = n if lq is None else lq
    gen = torch.Generator().manual_seed(1000 * n + 10 * lq + h)
    q = torch.randn(B, h, lq, E, dtype=torch.float64, generator=gen)
    k = torch.randn(B, hkv, n, E, dtype=torch.float64, generator=gen)
    v = torch.randn(B, hkv, n, EV, dtype=torch.float64, generator=gen)
    g = torch.randn(B, h, lq, EV, dtype=torch.float64, generator=gen)
    km = _key_mask(mask, n, gen)
    kw: dict[str, Any] = {"is_causal": causal, "key_mask": km}
    if lq != n and causal:
        kw["causal_alignment"] = "lower_right"
    m = attnreg.build(variant, **cfg)
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = m(*ref, **kw)
    (want * g).sum().backward()
    mine = [ad.shard(t).requires_grad_(True) for t in (q, k, v)]
    skw = {**kw, "key_mask": None if km is None else ad.shard(km)}
    ad.reset_comm_stats()
    got = m.forward_sharded(*mine, **skw)
    (got * ad.shard(g)).sum().backward()
    sent = ad.comm_stats().bytes_sent
    errors = [float((a.detach() - ad.shard(b.detach())).abs().max()) for a, b in
              zip((got, *(t.grad for t in mine)), (want, *(t.grad for t in ref)), strict=True)]
    full = ad.gather(got)  # every rank sees the whole output
    errors.append(float((full - want.detach()).abs().max()))
    return {"errors": errors, "bytes_sent": sent}


def main_cases(world: int) -> dict[str, tuple[Any, ...]]:
    cases: dict[str, tuple[Any, ...]] = {}
    variants = [("dot_product", {}), ("local", {"window": 3, "block_size": 4}), ("local", {"window": 9}),
                ("linear", {"chunk_size": 4, "segment_size": 8}),
                ("linear", {"chunk_size": 4, "feature_map": "favor", "num_features": 16}),
                ("performer", {"chunk_size": 4, "num_features": 16})]
    # P = 2: every mask at two lengths; P = 4 (4 processes on the CI's cores): fewer combinations.
    lengths = (29, 37) if world == 2 else (29,)
    masks = (None, "padded", "left") if world == 2 else (None, "padded")
    for variant, cfg in variants:
        for n in lengths:
            for causal in (False, True):
                for mask in masks:
                    label = ",".join(f"{a}={b}" for a, b in cfg.items())
                    cases[f"{variant}[{label}]-L{n}-{'causal' if causal else 'full'}-{mask}"] = (
                        variant, cfg, n, causal, mask)
    for causal in (False, True):  # grouped-query and cross / lower-right on the ring
        cases[f"dot_product-gqa-L29-{causal}"] = ("dot_product", {}, 29, causal, "padded", 4, 2)
        cases[f"dot_product-lq23-lk29-{causal}"] = ("dot_product", {}, 29, causal, "padded", 2, 1, 23)
    return cases


def bad_shards() -> dict[str, Any]:
    """Rank 1 passes one position too few: every rank must raise ValueError (none hangs)."""
    q = torch.randn(B, 2, 13, E, dtype=torch.float64)
    mine = [ad.shard(q) for _ in range(3)]
    if dist.get_rank() == 1:
        mine = [t[:, :, :-1] for t in mine]
    try:
        attnreg.build("dot_product").forward_sharded(*mine)
    except ValueError as err:
        return {"raised": "ValueError", "message": str(err)}
    return {"raised": None}


def torch_cp(world: int) -> dict[str, Any]:
    """torch.distributed.tensor.experimental.context_parallel on CPU/gloo vs dot_product's ring."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}
    for causal in (False, True):
        for backward in (False, True):
            gen = torch.Generator().manual_seed(7)
            q, k, v = (torch.randn(B, 2, 16, E, dtype=torch.float64, generator=gen) for _ in range(3))
            want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            ours = ad.gather(attnreg.build("dot_product").forward_sharded(
                *(ad.shard(t) for t in (q, k, v)), is_causal=causal))
            key = f"{'causal' if causal else 'full'}-{'backward' if backward else 'forward'}"
            bufs = [t.clone() for t in (q, k, v)]
            try:
                with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2],
                                      no_restore_buffers=set(bufs)):
                    a, b, c = (t.detach().clone().requires_grad_(backward) for t in bufs)
                    o = F.scaled_dot_product_attention(a, b, c, is_causal=causal)
                    if backward:
                        o.sum().backward()
                    theirs = context_parallel_unshard(mesh, [o.detach()], [2])[0]
                out[key] = {"ran": True, "torch_vs_sdpa": float((theirs - want).abs().max()),
                            "ours_vs_torch": float((ours - theirs).abs().max())}
            except Exception as err:  # noqa: BLE001 - what torch does on CPU is the finding
                out[key] = {"ran": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    return out


def docs_example() -> dict[str, Any]:
    """Run the first python block of docs/distributed.md as written (it initialises the process
    group itself) and compare its gathered output with the single-process forward."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    ns: dict[str, Any] = {}
    exec(compile(code, "docs/distributed.md", "exec", dont_inherit=True), ns)
    want = ns["attn"](ns["q"], ns["k"], ns["v"], is_causal=True, key_mask=ns["pad"])
    return {"error": float((ns["full"] - want).abs().max()), "grad": ns["qs"].grad is not None}


def main() -> None:
    out_dir, suite = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "main"
    example = docs_example() if suite == "main" and int(os.environ["WORLD_SIZE"]) == 2 else None
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    started = time.perf_counter()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    if suite == "torch_cp":
        results["torch_cp"] = torch_cp(world)
    for name, args in main_cases(world).items() if suite == "main" else ():
        t0 = time.perf_counter()
        try:
            results[name] = run_case(*args)
            results[name]["seconds"] = time.perf_counter() - t0
        except Exception:  # noqa: BLE001 - reported per case; the other ranks see the same
            results[name] = {"crash": traceback.format_exc()[-2000:]}
    if suite == "main":
        results["bad_shards"] = bad_shards()
    if example is not None:
        results["docs_example"] = example
    results["seconds"] = {"import": started - _T0, "run": time.perf_counter() - started}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
