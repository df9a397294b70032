"""A tiny decoder-only language model on ``attnreg.MultiHeadAttention``.

The attention of every layer comes from ``config.yaml`` (attnreg's config form). The model
learns to continue a repeated random pattern (``make_batch``) in seconds on CPU, and generates
greedily two ways: ``generate`` keeps one decoding state per layer (prefill, then one token at a
time), ``generate_without_state`` recomputes the whole sequence at every step. Both give the
same tokens, for left-padded batches too.

    python examples/tiny_lm/tiny_lm.py                        # train, then generate
    python examples/tiny_lm/tiny_lm.py --config my.yaml --steps 100
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

import attnreg
from attnreg.core import DecodeState

HERE = Path(__file__).resolve().parent
PAD = 0  # padding token; patterns use tokens 1 .. vocab_size - 1


def load_config(path: str | Path = HERE / "config.yaml") -> dict[str, Any]:
    """The example's YAML config: ``attention``, ``model`` and ``train`` sections."""
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def positions(real: Tensor) -> Tensor:
    """Position of every token counted over real tokens only: a left-padded prompt gets the
    positions it would have alone. real (B, L) bool -> (B, L) int64."""
    return (real.long().cumsum(1) - 1).clamp(min=0)  # (B, L)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, attention: Any) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attnreg.MultiHeadAttention(dim, num_heads, num_kv_heads, attention)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, real: Tensor | None) -> Tensor:
        """Whole sequences: x (B, L, D), real (B, L) bool or None -> (B, L, D)."""
        x = x + self.attn(self.norm1(x), key_mask=real, is_causal=True)  # (B, L, D)
        return x + self.mlp(self.norm2(x))

    def step(self, x: Tensor, state: DecodeState, real: Tensor) -> tuple[Tensor, DecodeState]:
        """The next T positions x (B, T, D) given everything before them in ``state``."""
        h, state = self.attn.decode(self.norm1(x), state, key_mask=real)  # (B, T, D)
        x = x + h
        return x + self.mlp(self.norm2(x)), state


class TinyLM(nn.Module):
    """Token + learned position embeddings, pre-norm blocks, a linear head."""

    def __init__(self, vocab_size: int, dim: int, num_heads: int, num_kv_heads: int,
                 num_layers: int, max_len: int, attention: Any) -> None:
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, num_kv_heads, attention) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: Tensor, real: Tensor | None = None) -> Tensor:
        """Logits (B, L, V) of the next token at every position; tokens (B, L), real (B, L)."""
        pos = positions(real) if real is not None else torch.arange(tokens.shape[1])[None]
        x = self.tok(tokens) + self.pos(pos.to(tokens.device))  # (B, L, D)
        for block in self.blocks:
            x = block(x, real)
        return self.head(self.norm(x))  # (B, L, V)

    def init_states(self, batch: int, max_length: int) -> list[DecodeState]:
        """One empty decoding state per layer, for sequences of at most ``max_length`` tokens."""
        return [b.attn.init_state(batch, max_length=max_length) for b in self.blocks]

    def step(self, tokens: Tensor, pos: Tensor, states: list[DecodeState],
             real: Tensor) -> tuple[Tensor, list[DecodeState]]:
        """Logits (B, T, V) of the next T tokens (B, T) at positions ``pos`` (B, T); ``states``
        (consumed) hold every earlier token, the returned ones these too."""
        x = self.tok(tokens) + self.pos(pos)  # (B, T, D)
        new = []
        for block, state in zip(self.blocks, states, strict=True):
            x, state = block.step(x, state, real)
            new.append(state)
        return self.head(self.norm(x)), new  # (B, T, V)


def build_model(config: dict[str, Any]) -> TinyLM:
    """The model of a config dict (``load_config``): ``model`` sizes, ``attention`` variant."""
    return TinyLM(**config["model"], attention=config["attention"])


# -- data and training -----------------------------------------------------------------------
def make_batch(batch: int, seq_len: int, vocab_size: int, gen: torch.Generator) -> Tensor:
    """(B, L) tokens: each row a random pattern of 2..6 tokens repeated. After one period
    every token is predictable from the token one period earlier."""
    rows = []
    for _ in range(batch):
        period = int(torch.randint(2, 7, (1,), generator=gen))
        pattern = torch.randint(1, vocab_size, (period,), generator=gen)  # never PAD
        rows.append(pattern.repeat(seq_len // period + 1)[:seq_len])
    return torch.stack(rows)  # (B, L)


def train(model: TinyLM, steps: int, batch_size: int, seq_len: int, lr: float, seed: int = 0,
          log_every: int = 0) -> list[float]:
    """AdamW on next-token cross-entropy over ``make_batch`` data; the loss of every step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    vocab = model.head.out_features
    losses = []
    model.train()
    for i in range(steps):
        tokens = make_batch(batch_size, seq_len + 1, vocab, gen)  # (B, L + 1)
        logits = model(tokens[:, :-1])  # (B, L, V)
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (i % log_every == 0 or i == steps - 1):
            print(f"step {i:4d}  loss {loss.item():.3f}")
    model.eval()
    return losses


# -- generation ------------------------------------------------------------------------------
def _check_prompt(model: TinyLM, prompt: Tensor, real: Tensor | None, new: int) -> Tensor:
    real = torch.ones_like(prompt, dtype=torch.bool) if real is None else real
    if real.shape != prompt.shape or real.dtype != torch.bool:
        raise ValueError(f"real must be a bool tensor shaped like prompt {tuple(prompt.shape)}")
    if not real[:, -1].all() or (real[:, :-1] & ~real[:, 1:]).any():
        raise ValueError("prompts must be left-padded: real is False then True in every row, "
                         "and True at the last position")
    if prompt.shape[1] + new > model.max_len:
        raise ValueError(f"prompt {prompt.shape[1]} + {new} new tokens exceed max_len {model.max_len}")
    return real


@torch.no_grad()
def generate(model: TinyLM, prompt: Tensor, real: Tensor | None = None,
             max_new_tokens: int = 16) -> Tensor:
    """Greedy continuation (B, N) of left-padded prompts (B, P) with one decoding state per
    layer: one prefill call, then one call per token. ``real`` (B, P) bool, True = token."""
    real = _check_prompt(model, prompt, real, max_new_tokens)
    b, p = prompt.shape
    states = model.init_states(b, max_length=p + max_new_tokens)
    logits, states = model.step(prompt, positions(real), states, real)  # (B, P, V)
    next_pos = real.sum(1, keepdim=True)  # (B, 1): position of the next token
    token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    out = [token]
    one = torch.ones(b, 1, dtype=torch.bool, device=prompt.device)  # (B, 1): new tokens are real
    for _ in range(max_new_tokens - 1):
        logits, states = model.step(token, next_pos, states, one)  # (B, 1, V)
        next_pos = next_pos + 1
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, 1)  # (B, N)


@torch.no_grad()
def generate_without_state(model: TinyLM, prompt: Tensor, real: Tensor | None = None,
                           max_new_tokens: int = 16) -> Tensor:
    """``generate`` by recomputing the whole sequence at every step (no state): O(L) more work.

    The sequence is laid out at its final length from the start, the positions not generated
    yet being padding that the causal mask hides: variants whose pattern depends on the total
    length (block layouts) then see the length the decoding state was made for (max_length).
    """
    real = _check_prompt(model, prompt, real, max_new_tokens)
    b, p = prompt.shape
    tokens = prompt.new_full((b, p + max_new_tokens), PAD)  # (B, P + N)
    mask = torch.zeros(b, p + max_new_tokens, dtype=torch.bool, device=prompt.device)
    tokens[:, :p], mask[:, :p] = prompt, real
    for t in range(p, p + max_new_tokens):
        logits = model(tokens, mask)  # (B, P + N, V): every position recomputed
        tokens[:, t] = logits[:, t - 1].argmax(-1)
        mask[:, t] = True
    return tokens[:, p:]  # (B, N)


def left_pad(prompts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack 1-D prompts of different lengths, padding on the left: (tokens, real), (B, P)."""
    p = max(len(x) for x in prompts)
    tokens = torch.full((len(prompts), p), PAD, dtype=torch.long)
    real = torch.zeros(len(prompts), p, dtype=torch.bool)
    for i, x in enumerate(prompts):
        tokens[i, p - len(x):], real[i, p - len(x):] = x, True
    return tokens, real


def main(argv: list[str] | None = None) -> None:
    """Train on the synthetic task, then generate with and without the decoding state."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(HERE / "config.yaml"), help="YAML config file")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: config)")
    ap.add_argument("--attention", default=None,
                    help="override the config's attention, in YAML: '{variant: dot_product}'")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: for tensors this small more threads only add overhead)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if args.attention is not None:
        cfg["attention"] = yaml.safe_load(args.attention)
    tcfg = cfg["train"] | ({"steps": args.steps} if args.steps is not None else {})
    torch.manual_seed(tcfg["seed"])
    model = build_model(cfg)
    print(f"attention: {cfg['attention']}  parameters: {sum(p.numel() for p in model.parameters())}")
    start = time.perf_counter()
    train(model, log_every=50, **tcfg)
    print(f"trained in {time.perf_counter() - start:.1f} s")

    gen = torch.Generator().manual_seed(1)
    rows = make_batch(4, 24, cfg["model"]["vocab_size"], gen)  # (4, 24)
    lengths = (12, 9, 7, 10)
    prompt, real = left_pad([row[:n] for row, n in zip(rows, lengths, strict=True)])
    new = 12
    t0 = time.perf_counter()
    slow = generate_without_state(model, prompt, real, new)
    t1 = time.perf_counter()
    truth = torch.stack([row[n:n + new] for row, n in zip(rows, lengths, strict=True)])  # (4, N)
    for i, n in enumerate(lengths):
        print(f"prompt {rows[i, :n].tolist()}\n  -> {slow[i].tolist()}")
    print(f"accuracy vs the pattern: {(slow == truth).float().mean().item():.2f}")
    variant = model.blocks[0].attn.variant
    if not attnreg.get_variant(variant).capabilities.decoding:
        print(f"'{variant}' declares no decoding state: generated by recomputation only")
        return
    fast = generate(model, prompt, real, new)
    t2 = time.perf_counter()
    print(f"with state == without state: {torch.equal(fast, slow)}  "
          f"({(t2 - t1) * 1e3:.0f} ms with the state, {(t1 - t0) * 1e3:.0f} ms without)")


if __name__ == "__main__":
    main()
