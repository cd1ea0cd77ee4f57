"""torch.optim.LBFGS with forward gradients: held or new tangents per step, with and without the length
correction and a line search.

L-BFGS evaluates its closure several times a step. ``ForwardGradient.same_tangents()`` holds the
tangents for the step, so that its line search and curvature pairs see estimates from one subspace.
Setting: an MLP 5-16-3 (tanh) on 64 fixed random samples (3 classes), k = 16, 20 steps of
``max_iter=5``, 5 seeds (initial weights and tangents); backprop's L-BFGS beside it. Prints the
final training loss per setting (median and all seeds) and a final JSON line.

    python benchmarks/studies/lbfgs.py [--seeds 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common

from _common import print_result

import frog

X = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def loss_of(m: nn.Module) -> torch.Tensor:
    return F.cross_entropy(m(X), Y)


def final_loss(m: nn.Module) -> float:
    with torch.no_grad():
        return float(loss_of(m))


def frog_run(seed: int, steps: int, held: bool, correction: bool, line_search: str | None) -> float:
    m = model(seed)
    optimizer = torch.optim.LBFGS(m.parameters(), lr=1 if line_search else 0.5, max_iter=5,
                                  line_search_fn=line_search)
    fg = frog.ForwardGradient(16, scale_correction=correction, seed=seed)
    for _ in range(steps):
        if held:
            with fg.same_tangents():
                optimizer.step(lambda: fg.fill_grad(m, loss_of))
        else:
            optimizer.step(lambda: fg.fill_grad(m, loss_of))
    return final_loss(m)


def backprop_run(seed: int, steps: int) -> float:
    m = model(seed)
    optimizer = torch.optim.LBFGS(m.parameters(), lr=1, max_iter=5, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_of(m)
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    return final_loss(m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    seeds = range(args.seeds)
    print(f"initial loss {final_loss(model(0)):.3f} (seed 0)")
    results = {}
    for line_search in ("strong_wolfe", None):
        for correction in (False, True):
            for held in (True, False):
                losses = [frog_run(s, args.steps, held, correction, line_search) for s in seeds]
                name = f"line_search={line_search} scale_correction={correction} same_tangents={held}"
                results[name] = losses
                print(f"{name}: median {statistics.median(losses):.3f}, all {[round(v, 3) for v in losses]}")
    results["backprop"] = [backprop_run(s, args.steps) for s in seeds]
    print(f"backprop L-BFGS (strong Wolfe): median {statistics.median(results['backprop']):.3f}")
    print_result("lbfgs", steps=args.steps, median_final_loss={k: statistics.median(v) for k, v in results.items()})


if __name__ == "__main__":
    main()
