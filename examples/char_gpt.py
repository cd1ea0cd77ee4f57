"""A character-level GPT trained with AdamW, by backprop or by frog: the swap is one line.

The model is a small GPT (nanoGPT style): token and position embeddings, pre-norm transformer
blocks whose attention calls ``F.scaled_dot_product_attention`` (causal, with dropout), and an
output layer tied to the token embedding. It learns the GPL-3 text that every Debian system
carries in /usr/share/common-licenses/GPL-3 (any text file works: --text).

    python examples/char_gpt.py --gradient bp --steps 200
    python examples/char_gpt.py --gradient frog --perturbation activity --engine jvp --steps 200
    python examples/char_gpt.py --gradient frog --guess local --steps 200      # guesses from token heads
    python examples/char_gpt.py --gradient local --steps 200                   # local learning, the same heads

frog needs no change to the model: the forward-mode engines run SDPA through frog's attention
(it has a jvp rule), and activity perturbation finds the blocks itself (print them with
``frog.describe_blocks(model)``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import frog


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Characters (B, T) -> (logits (B, T, vocab), mean cross-entropy or None).

    ``checkpoint``: backprop keeps only each block's input and recomputes the block in the backward
    pass (``torch.utils.checkpoint``, per block); frog's forward-mode passes run the blocks plainly.
    """

    def __init__(self, vocab: int, context: int = 64, dim: int = 64, depth: int = 2, heads: int = 4,
                 dropout: float = 0.1, checkpoint: bool = False) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.token = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(context, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.token.weight  # weight tying
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        positions = self.position(torch.arange(idx.shape[1], device=idx.device))  # (T, C): no batch dimension
        x = self.dropout(self.token(idx) + positions)
        for block in self.blocks:
            checkpointed = self.checkpoint and torch.is_grad_enabled()
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        logits = self.head(self.norm(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def load_text(path: str) -> tuple[torch.Tensor, int]:
    """The file's characters as indices (N,) and the vocabulary size."""
    text = Path(path).read_text(encoding="utf-8")
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return torch.tensor([lookup[c] for c in text]), len(chars)


def batch(data: torch.Tensor, size: int, context: int, generator: torch.Generator):
    """``size`` random windows: inputs (B, T) and next characters (B, T)."""
    starts = torch.randint(len(data) - context - 1, (size,), generator=generator)
    windows = torch.stack([data[s: s + context + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="char-level GPT with AdamW, backprop or frog")
    parser.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--gradient", choices=["bp", "frog", "local"], default="frog",
                        help="local: each block trained by its token head's loss (frog.LocalLearning)")
    parser.add_argument("--guess", choices=["none", "local", "topdown", "topdown1"], default="none",
                        help="activity guesses: token heads (LocalHeads), the gradient at the top of the residual "
                             "stream (TopDown), or that with its first-order terms; --gradient local uses them directly")
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks")
    parser.add_argument("--perturbation", choices=["weight", "activity"], default="activity")
    parser.add_argument("--engine", choices=frog.ENGINES, default="jvp")
    parser.add_argument("-k", "--tangents", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def training(args: argparse.Namespace) -> Iterator[dict]:
    """Train as ``args`` say; yields {"test_loss"} (held-out text) before and after training and
    {"step", "loss", "seconds"} after every step."""
    torch.manual_seed(args.seed)
    data, vocab = load_text(args.text)
    held_out = len(data) * 9 // 10  # the last tenth of the text measures the loss
    model = GPT(vocab, context=args.context, depth=args.depth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    heads = frog.LocalHeads(vocab, seed=args.seed)  # one per token block: next-character logits per token
    guess = {"none": None, "local": heads, "topdown": frog.TopDown(heads), "topdown1": frog.TopDown(heads, order=1)}
    if args.gradient == "local":
        fg: frog.GradientEstimator = frog.LocalLearning(guess[args.guess] or heads)
    else:
        fg = frog.ForwardGradient(args.tangents, engine=args.engine, perturbation=args.perturbation, seed=args.seed,
                                  guess=guess[args.guess])
    if args.gradient != "bp" and fg.loss_contract == "per-sample":
        print(frog.describe_blocks(model))

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        if args.gradient == "bp":
            _, loss = model(x, y)
            loss.backward()
        elif fg.loss_contract == "scalar":  # weight perturbation
            loss = fg.fill_grad(model, lambda m: m(x, y)[1])  # instead of loss.backward()
        else:  # activity perturbation and local learning want per-sample losses: token losses (B, T), averaged per row
            loss = fg.fill_grad(model, lambda m: F.cross_entropy(m(x)[0].transpose(1, 2), y, reduction="none"),
                                targets=y)
        optimizer.step()
        return loss

    def evaluate() -> dict:
        x, y = batch(data[held_out:], 64, args.context, torch.Generator().manual_seed(0))
        model.eval()
        with torch.no_grad():
            loss = model(x, y)[1].item()
        model.train()
        return {"test_loss": loss}

    yield evaluate()
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        x, y = batch(data[:held_out], args.batch_size, args.context, generator)
        start = time.perf_counter()
        loss = train_step(x, y).item()
        yield {"step": step, "loss": loss, "seconds": time.perf_counter() - start}
    yield evaluate()


def main(argv: list[str] | None = None) -> list[dict]:
    records = []
    for record in training(parse(argv)):
        if "step" in record:
            print(f"step {record['step']}: loss {record['loss']:.4f}  {1e3 * record['seconds']:.0f} ms", flush=True)
        else:
            print(f"held-out loss {record['test_loss']:.4f}", flush=True)
        records.append(record)
    return records


if __name__ == "__main__":
    main()
