"""Guesses under weight perturbation: FC-1024 on Fashion-MNIST, one epoch, k = 16.

Weight perturbation shares each tangent across the batch, so a guess must live in weight space. For
layer l with input x_l (B, in) and a guess gamma_l (B, out) of the gradient at its pre-activation, the
guess tangent is G_l = gamma_l^T x_l in that layer's weight (gamma_l summed over the batch in its bias)
and zero in every other layer: it is the batch gradient that the guess implies. gamma comes from a
local head (Linear(width, 10), trained by its own cross-entropy and SGD) at the hidden layers, times the
ReLU's mask, and at the output layer from the loss itself (softmax - one-hot), so the output layer's
guess tangent is that layer's exact gradient. The remaining k - 3 tangents are frog's random low-rank
ones (u v^T per weight matrix, normal biases).

The estimate is frog's projection: with jvps d = V g, c = (V V^T)^+ d and estimate V^T c. Here g is the
autograd batch gradient, so the estimate is computed exactly as frog computes it from k jvps (the sim
engine's way; true forward mode gives the same numbers up to rounding). Each estimator takes the best
step size of --lrs for plain SGD, one epoch each; writes OUT/weight_guesses.csv and prints a table.
Results: docs/reproducing.md, "Closing the gap".

    python benchmarks/studies/weight_guesses.py [--lrs 0.01 0.033 0.1 0.3 1] [--quick]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from frog.aggregation import project
from frog.training.data import batches, load_dataset
from frog.training.models import make_model
from frog.training.train import evaluate


def lowrank_tangents(params: list[torch.Tensor], count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random tangents (count, n): u v^T in each weight matrix, N(0, 1) in each bias."""
    rows = []
    for _ in range(count):
        parts = []
        for p in params:
            if p.dim() == 2:
                u = torch.randn(p.shape[0], 1, generator=generator)
                v = torch.randn(1, p.shape[1], generator=generator)
                parts.append((u @ v).flatten())
            else:
                parts.append(torch.randn(p.numel(), generator=generator))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def guess_tangents(params: list[torch.Tensor], inputs: list[torch.Tensor], gammas: list[torch.Tensor]) -> torch.Tensor:
    """One tangent (n,) per layer l: gamma_l^T x_l in its weight, gamma_l summed in its bias, zero elsewhere.

    params: [W_1, b_1, W_2, b_2, ...]; inputs[l] (B, in_l) and gammas[l] (B, out_l)."""
    sizes = [p.numel() for p in params]
    rows = []
    for layer, (x, gamma) in enumerate(zip(inputs, gammas, strict=True)):
        row = torch.zeros(sum(sizes))
        start = sum(sizes[: 2 * layer])
        weight = (gamma.T @ x).flatten()
        row[start:start + weight.numel()] = weight
        row[start + weight.numel():start + weight.numel() + gamma.shape[1]] = gamma.sum(0)
        rows.append(row)
    return torch.stack(rows)


def run(kind: str, lr: float, data, quick: bool) -> dict:
    """One epoch of FC-1024 (FC-32 with --quick) with estimator ``kind`` (bp, lowrank, guesses) at ``lr``."""
    torch.manual_seed(0)
    width = 32 if quick else 1024
    model = make_model("fc", data.input_shape, data.num_classes, width=width)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    params = [t for layer in layers for t in (layer.weight, layer.bias)]
    heads = [nn.Linear(width, data.num_classes) for _ in layers[:-1]]
    head_optimizer = torch.optim.SGD([p for h in heads for p in h.parameters()], lr=0.1)
    generator = torch.Generator().manual_seed(1)
    stream = batches(data.train, 64, shuffle=True, generator=torch.Generator().manual_seed(0),
                     device=torch.device("cpu"))
    cosines = []
    for step, (x, y) in enumerate(stream):
        if quick and step == 20:
            break
        inputs, h = [], x.flatten(1)
        for layer in layers:  # the layers' inputs x_l and outputs
            inputs.append(h)
            h = layer(h)
            if layer is not layers[-1]:
                h = F.relu(h)
        loss = F.cross_entropy(h, y, reduction="sum") / len(y)
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        if kind == "bp":
            estimate = grad
        else:
            tangents = lowrank_tangents(params, 16 - (len(layers) if kind == "guesses" else 0), generator)
            if kind == "guesses":
                gammas = []
                head_optimizer.zero_grad()
                for head, x_next in zip(heads, inputs[1:], strict=True):  # x_next: the hidden layer's ReLU output
                    point = x_next.detach().requires_grad_()
                    local = F.cross_entropy(head(point), y)
                    local.backward(inputs=[point, *head.parameters()])
                    gammas.append(point.grad * (x_next > 0))
                head_optimizer.step()
                gammas.append(F.softmax(h.detach(), 1) - F.one_hot(y, data.num_classes))  # the loss's own gradient
                tangents = torch.cat([guess_tangents(params, [i.detach() for i in inputs], gammas), tangents])
            estimate = project(tangents, tangents @ grad)  # frog's projection of the jvps V g
            cosines.append(float(F.cosine_similarity(estimate, grad, dim=0)))
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= lr * estimate[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
    loss, accuracy = evaluate(model, data.test, 256, torch.device("cpu"))
    return {"estimator": kind, "lr": lr, "test_accuracy": f"{accuracy:.4f}", "test_loss": f"{loss:.4f}",
            "mean_cosine_to_gradient": f"{sum(cosines) / len(cosines):.3f}" if cosines else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.033, 0.1, 0.3, 1.0])
    parser.add_argument("--estimators", nargs="+", default=["bp", "lowrank", "guesses"],
                        choices=["bp", "lowrank", "guesses"])
    parser.add_argument("--quick", action="store_true", help="digits, FC-32, 20 steps: checks that the script runs")
    parser.add_argument("--out", default="runs/weight_guesses")
    args = parser.parse_args()
    data = load_dataset("digits" if args.quick else "fashion-mnist", None, split_seed=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "weight_guesses.csv"
    done = list(csv.DictReader(path.open())) if path.exists() else []
    rows = list(done)
    for kind in args.estimators:
        for lr in args.lrs:
            if any(r["estimator"] == kind and float(r["lr"]) == lr for r in done):
                continue
            rows.append(run(kind, lr, data, args.quick))
            print(rows[-1], flush=True)
            with path.open("w", newline="") as handle:  # written as results come: a rerun skips them
                writer = csv.DictWriter(handle, list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    print("\n| estimator | best lr | test accuracy, 1 epoch | mean cosine to the batch gradient |\n|---|---|---|---|")
    for kind in args.estimators:
        best = max((r for r in rows if r["estimator"] == kind), key=lambda r: float(r["test_accuracy"]))
        print(f"| {kind} | {best['lr']} | {best['test_accuracy']} | {best['mean_cosine_to_gradient']} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
