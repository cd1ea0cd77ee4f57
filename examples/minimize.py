"""Minimize a function of a tensor with ``fg.grad`` (no backward pass), next to autograd's gradient.

The function: a 64-dimensional Rosenbrock valley, f(x) = sum 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2,
minimum 0 at x = (1, ..., 1), from x = (-1, 0, ..., 0). Both runs take plain gradient-descent steps
x <- x - lr g at the same step size: g = fg.grad(f, x) estimates the gradient from k jvps (forward
mode only) and has the gradient's expected length by default.

    python examples/minimize.py --steps 2000 -k 16
"""

from __future__ import annotations

import argparse

import torch

import frog


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="gradient descent with fg.grad and with autograd")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("-k", "--tangents", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = torch.zeros(args.dim, dtype=torch.float64)
    start[0] = -1.0
    fg = frog.ForwardGradient(args.tangents, seed=args.seed)  # frog: projection onto k random directions
    values = {}
    for method in ("frog", "autograd"):
        x = start.clone()
        for _ in range(args.steps):
            if method == "frog":
                g = fg.grad(rosenbrock, x)
            else:
                x.requires_grad_(True)
                (g,) = torch.autograd.grad(rosenbrock(x), x)
                x = x.detach()
            x = x - args.lr * g
        values[method] = rosenbrock(x).item()
        print(f"{method}: f = {values[method]:.4f} after {args.steps} steps (start {rosenbrock(start).item():.1f})")
    return {"start": rosenbrock(start).item(), **values}


if __name__ == "__main__":
    main()
