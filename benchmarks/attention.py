"""Forward-mode attention: frog's jvp rule against the same attention written with plain operations.

Times vmap(jvp) of causal self-attention with k tangents on q, k and v (all k in one vectorized
pass, as the jvp engine runs it): ``frog.forward_mode.attention.scaled_dot_product_attention`` (softmax's jvp
folded into the product with v: one (L, S) product and one row sum per tangent besides the two
matmuls that carry dS) against softmax(q k^T / sqrt(E) + mask) v in plain operations, whose jvp
PyTorch composes op by op. Also the primal alone (PyTorch's fused SDPA). Median of repeated calls,
interleaved so that both see the same machine; prints ms and the ratio, and a line of JSON.

    python benchmarks/attention.py [--batch 32] [--heads 4] [--lengths 64 256] [--dim 16] [--ks 4 16] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F
from _common import print_result, timed
from torch.func import jvp, vmap

from frog.forward_mode.attention import scaled_dot_product_attention


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention in plain operations (what PyTorch's math backend does)."""
    length = q.shape[-2]
    mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, -math.inf), -1) @ v


def frog_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return scaled_dot_product_attention(q, k, v, is_causal=True)


def measure(q, k, v, tangents, repeats: int, device: str) -> dict[str, float]:
    """Median ms of the primal (fused SDPA) and of vmap(jvp) for frog's and the plain attention."""
    calls = {
        "primal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "frog": lambda: vmap(lambda *t: jvp(frog_attention, (q, k, v), t))(*tangents),
        "plain": lambda: vmap(lambda *t: jvp(plain_attention, (q, k, v), t))(*tangents),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm-up
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call, device))
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    print(f"{'L':>5}{'k':>4}{'SDPA primal ms':>16}{'frog jvp ms':>13}{'plain-ops jvp ms':>18}{'plain/frog':>12}")
    for length in args.lengths:
        shape = (args.batch, args.heads, length, args.dim)
        q, k, v = (torch.randn(shape, device=args.device) for _ in range(3))
        for num in args.ks:
            tangents = [torch.randn(num, *shape, device=args.device) for _ in range(3)]
            ms = measure(q, k, v, tangents, args.repeats, args.device)
            print(f"{length:>5}{num:>4}{ms['primal']:>16.2f}{ms['frog']:>13.2f}{ms['plain']:>18.2f}"
                  f"{ms['plain'] / ms['frog']:>12.2f}", flush=True)
            results[f"L{length}_k{num}"] = {f"{name}_ms": round(t, 3) for name, t in ms.items()}
    print_result("attention", device=args.device, shape=[args.batch, args.heads, args.dim], results=results)


if __name__ == "__main__":
    main()
