"""Time per training step (fill_grad + SGD step) of the jvp and sim engines against backprop,
as the number of tangents k and the width of the network grow.

(a) FC 784-1024-1024-10, batch 64: k = 1 .. 256 with activity perturbation (a tangent per block
    output, shared by the batch: cheap tangents), k = 1 .. --max-weight-k (64) with weight
    perturbation (a tangent per parameter: k x n random numbers a step);
(b) FC 784-W-W-10, batch 64, k = 16, activity perturbation: W = 256 .. 4096.

Every time is the median of --repeats steps after a warm-up step (backprop, a few ms a step: of
10 x --repeats). Prints ms per step and the ratio to backprop on the same network, then a final JSON line.

    python benchmarks/scaling.py [--quick] [--repeats 5] [--max-weight-k 64] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse

import torch
from _common import median_time, print_result
from torch import nn

import frog

KS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
WIDTHS = [256, 512, 1024, 2048, 4096]
ENGINES = ("jvp", "sim")


def make_model(width: int, device: str) -> nn.Sequential:
    """FC 784-width-width-10 as an nn.Sequential of blocks (Linear + ReLU), as activity perturbation needs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(784, width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, 10)),
    ).to(device)


def median_ms(step, repeats: int, device: str) -> float:
    """Median ms of ``repeats`` calls of ``step`` after a warm-up call."""
    return 1e3 * median_time(step, repeats, device)


class Network:
    """A model, its SGD optimizer and one fixed batch."""

    def __init__(self, width: int, device: str) -> None:
        self.model = make_model(width, device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.x = torch.randn(64, 784, device=device)
        self.y = torch.randint(0, 10, (64,), device=device)

    def backprop_step(self) -> None:
        self.optimizer.zero_grad()
        nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        self.optimizer.step()

    def forward_gradient_step(self, engine: str, k: int, perturbation: str):
        estimator = frog.ForwardGradient(k, "project", engine=engine, seed=0, perturbation=perturbation)
        reduction = "none" if perturbation == "activity" else "mean"

        def loss_fn(m: nn.Module) -> torch.Tensor:
            return nn.functional.cross_entropy(m(self.x), self.y, reduction=reduction)

        def step() -> None:
            estimator.fill_grad(self.model, loss_fn)
            self.optimizer.step()

        return step


def print_table(title: str, column: str, rows: dict[int, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{column:>6}{'backprop ms':>13}" + "".join(f"{e + ' ms':>10}{'x bp':>7}" for e in ENGINES))
    for key, ms in rows.items():
        print(f"{key:>6}{ms['backprop']:>13.1f}"
              + "".join(f"{ms[e]:>10.1f}{ms[e] / ms['backprop']:>7.1f}" for e in ENGINES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-weight-k", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2 repeats; k <= 64 (weight: <= 16), width <= 2048")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, repeats = args.device, 2 if args.quick else args.repeats
    ks = [k for k in KS if k <= 64] if args.quick else KS
    weight_ks = [k for k in ks if k <= (min(16, args.max_weight_k) if args.quick else args.max_weight_k)]
    widths = WIDTHS[:-1] if args.quick else WIDTHS

    tables: dict[str, dict[int, dict[str, float]]] = {"k_activity": {}, "k_weight": {}, "width_activity": {}}
    fc = Network(1024, device)
    backprop = median_ms(fc.backprop_step, 10 * repeats, device)
    for name, perturbation, values in (("k_activity", "activity", ks), ("k_weight", "weight", weight_ks)):
        for k in values:
            tables[name][k] = {"backprop": backprop, **{
                engine: median_ms(fc.forward_gradient_step(engine, k, perturbation), repeats, device)
                for engine in ENGINES}}
    for width in widths:
        net = Network(width, device)
        tables["width_activity"][width] = {"backprop": median_ms(net.backprop_step, 10 * repeats, device), **{
            engine: median_ms(net.forward_gradient_step(engine, 16, "activity"), repeats, device)
            for engine in ENGINES}}

    print(f"ms per training step (fill_grad + SGD), batch 64, device {device}, threads {torch.get_num_threads()}, "
          f"median of {repeats}")
    print_table("(a) FC 784-1024-1024-10, activity perturbation", "k", tables["k_activity"])
    print_table("(a) FC 784-1024-1024-10, weight perturbation", "k", tables["k_weight"])
    print_table("(b) FC 784-W-W-10, k = 16, activity perturbation", "W", tables["width_activity"])
    print_result("scaling", device=device, repeats=repeats,
                 ms={name: {key: {m: round(v, 2) for m, v in ms.items()} for key, ms in rows.items()}
                     for name, rows in tables.items()},
                 ratios={name: {key: {e: round(ms[e] / ms["backprop"], 2) for e in ENGINES}
                                for key, ms in rows.items()} for name, rows in tables.items()})


if __name__ == "__main__":
    main()
