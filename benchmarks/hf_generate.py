"""Generation speed per token inside a transformers model: attnreg variants vs transformers' sdpa.

    python benchmarks/hf_generate.py                        # 4096-token prompt, 32 new tokens
    python benchmarks/hf_generate.py --context 8192 --threads 2 --json out.json

A tiny randomly initialised Llama (4 layers, hidden 256, 4 heads of 64; no download) generates
greedily from one prompt of ``--context`` tokens with ``model.generate`` and its default cache
(for attnreg keys: the variant's decoding state per layer). A logits processor timestamps every
generated token, so the time per token is the median gap between consecutive tokens (the
prefill, and load spikes, do not enter it); it is the minimum over ``--repeats`` runs, and so is
the prefill (time to the first token). Every model is timed in the same process, alternating,
so the ratios come from one run. Also reported: the cache bytes one layer holds at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LogitsProcessor, LogitsProcessorList

from attnreg.integrations.transformers import CACHE_KWARG  # (the import registers attnreg:<name>)

# The implementations compared, and the attnreg config of each.
IMPLS: dict[str, dict[str, Any] | None] = {
    "sdpa": None,  # transformers' own: KV cache (DynamicCache) + torch SDPA
    "attnreg:dot_product": {},  # the variant's KV cache state
    "attnreg:local": {"window": 256},  # rolling window: O(window) per token and layer
    "attnreg:linear": {},  # recurrent state [S | z]: O(1) per token and layer
}


def _model(impl: str, fields: dict[str, Any] | None, context: int, new: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context + new + 1,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if fields is not None:
        cfg.attnreg = fields
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


class _Clock(LogitsProcessor):
    """Records when each new token's scores are ready (once per generated token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def _generate(model: torch.nn.Module, ids: torch.Tensor, new: int) -> tuple[float, float, Any]:
    """(seconds to the first token, median seconds per later token, generate's output)."""
    clock = _Clock()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                         logits_processor=LogitsProcessorList([clock]))
    gaps = sorted(b - a for a, b in zip(clock.times[:-1], clock.times[1:], strict=True))
    return clock.times[0] - start, gaps[len(gaps) // 2], out


def _layer_bytes(cache: Any) -> int:
    layer = cache.layers[0]
    if hasattr(layer, "nbytes"):  # attnreg's state layer
        return int(layer.nbytes)
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


def measure(context: int, new: int, repeats: int) -> list[dict[str, Any]]:
    """One row per implementation: seconds per new token, prefill seconds, bytes per layer."""
    ids = torch.randint(2, 512, (1, context), generator=torch.Generator().manual_seed(0))
    models = {impl: _model(impl, fields, context, new) for impl, fields in IMPLS.items()}
    best: dict[str, list[float]] = {impl: [float("inf"), float("inf")] for impl in models}
    sizes: dict[str, int] = {}
    for model in models.values():  # warm-up: first calls pay for allocations and dispatch caches
        _generate(model, ids[:, :64], 4)
    for _ in range(repeats):  # alternate implementations so load changes hit all of them alike
        for impl, model in models.items():
            prefill, step, out = _generate(model, ids, new)
            best[impl] = [min(best[impl][0], prefill), min(best[impl][1], step)]
            sizes[impl] = _layer_bytes(getattr(out, CACHE_KWARG))  # past_key_values before 5.24
    rows = []
    for impl, (prefill, step) in best.items():
        rows.append({"impl": impl, "config": IMPLS[impl], "ms_per_token": 1e3 * step,
                     "prefill_s": prefill, "layer_cache_bytes": sizes[impl]})
    ref = next(r["ms_per_token"] for r in rows if r["impl"] == "attnreg:dot_product")
    for r in rows:
        r["speedup_vs_dot_product"] = ref / r["ms_per_token"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="new tokens timed")
    parser.add_argument("--repeats", type=int, default=3, help="runs per point (minimum kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="write the rows and the setup here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.context, args.new, args.repeats)
    setup = {"context": args.context, "new": args.new, "repeats": args.repeats, "threads": args.threads,
             "torch": torch.__version__, "transformers": __import__("transformers").__version__,
             "machine": platform.processor() or platform.machine()}
    print(f"prompt {args.context} tokens, {args.new} new, {args.threads} threads, min of {args.repeats}")
    print("| implementation | ms / token | vs attnreg:dot_product | prefill s | cache bytes / layer |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['impl']}` | {r['ms_per_token']:.2f} | {r['speedup_vs_dot_product']:.2f}x | "
              f"{r['prefill_s']:.2f} | {r['layer_cache_bytes']:,} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
